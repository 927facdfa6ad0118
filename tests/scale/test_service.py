"""The HTTP side of mmsep-serve without Ray: what is a form request, and a body that stalls."""

import asyncio
import functools

import pytest

from mmsep.runtime.errors import InputError
from mmsep.scale import service
from mmsep.scale.service import (HttpError, Limits, Upload, check_form_complete,
                                 check_form_request, media_seconds, receive_body,
                                 request_options)


@pytest.mark.parametrize("content_type, query, status", [
    ("multipart/form-data; boundary=x", "", None),
    ("application/x-www-form-urlencoded", "", None),
    ("Multipart/Form-Data; boundary=x", "", None),
    ("application/json", "", 415),
    (None, "", 415),
    ("multipart/form-data; boundary=x", "text=dog", 400),
])
def test_only_forms_without_a_query_string_are_requests(content_type, query, status):
    if status is None:
        check_form_request(content_type, query)
        return
    with pytest.raises(HttpError) as refused:
        check_form_request(content_type, query)
    assert refused.value.status == status


class _Request:
    """What read_limited_body reads of a Starlette request: headers and the body stream."""

    def __init__(self, chunks, stall_after: int | None = None):
        self.headers, self._chunks, self._stall_after = {}, chunks, stall_after

    async def stream(self):
        for i, chunk in enumerate(self._chunks):
            if i == self._stall_after:
                await asyncio.sleep(3600)  # a client that stops sending
            yield chunk


def test_a_body_is_written_whole_and_a_stalled_one_is_given_up(tmp_path):
    body = tmp_path / "body"
    asyncio.run(receive_body(_Request([b"ab", b"cd"]), body, 10, idle_seconds=1.0))
    assert body.read_bytes() == b"abcd"
    with pytest.raises(HttpError) as stalled:
        asyncio.run(receive_body(_Request([b"ab", b"cd"], stall_after=1), body, 10,
                                 idle_seconds=0.05))
    assert stalled.value.status == 408 and "stalled" in str(stalled.value)
    with pytest.raises(HttpError) as large:
        asyncio.run(receive_body(_Request([b"abcdef", b"ghijkl"]), body, 10))
    assert large.value.status == 413 and body.stat().st_size <= 10  # not written past it


def _multipart() -> tuple[str, bytes]:
    """A form as requests encodes it: (content type, body)."""
    import requests

    prepared = requests.Request("POST", "http://localhost/", data={"text": "a dog", "steps": "2"},
                                files={"mix": ("m.wav", b"RIFF" + b"\0" * 100)}).prepare()
    return prepared.headers["Content-Type"], prepared.body


def test_a_form_cut_short_is_refused_not_run_without_its_last_part(tmp_path, monkeypatch):
    content_type, body = _multipart()
    saved = tmp_path / "body"

    def check(kind: str, data: bytes) -> None:
        saved.write_bytes(data)
        check_form_complete(kind, saved)

    check(content_type, body)
    check(content_type, body + b"\r\nan epilogue, ignored")
    check(content_type.replace("boundary=", 'boundary="') + '"', body)
    # the search from the end crosses its blocks: a boundary split between two is found
    monkeypatch.setattr(service, "_holds", functools.partial(service._holds, block=7))
    check(content_type, body + b"\r\n" + b"x" * 30)
    for cut in (len(body) - 4, len(body) // 2, 10):
        with pytest.raises(InputError, match="ends before its closing boundary"):
            check(content_type, body[:cut])
    with pytest.raises(InputError, match="names no boundary"):
        check("multipart/form-data", body)
    check("application/x-www-form-urlencoded", b"text=a+dog")


def test_media_without_a_stated_duration_is_timed_by_its_packets(tmp_path):
    """A recording written to a pipe (a browser's WebM, a live remux) states no duration."""
    import io

    import av
    import numpy as np

    class Pipe(io.RawIOBase):
        def __init__(self):
            self.data = bytearray()

        def writable(self):
            return True

        def write(self, b):
            self.data += b
            return len(b)

    pipe = Pipe()
    with av.open(pipe, "w", format="matroska") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(50):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i, np.uint8), format="rgb24")
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    path = tmp_path / "piped.mkv"
    path.write_bytes(bytes(pipe.data))
    with av.open(str(path)) as container:
        assert container.duration is None and container.streams.video[0].duration is None
    assert media_seconds(str(path)) == pytest.approx(5.0)
    path.write_bytes(b"not media")
    assert media_seconds(str(path)) is None


@pytest.mark.parametrize("fields, status, message", [
    ({"text": "x"}, 413, "without media or duration the output is one window (8 s), over the "
                         "limit of 5 s; give a duration"),
    ({"text": "x", "generate": "true"}, 413, "without media or duration the output is one "
                                             "window (8 s)"),
    ({"text": "x", "duration": "6"}, 413, "duration 6 s is over the limit of 5 s"),
    ({"text": "x", "duration": "4"}, None, None),
])
def test_generated_audio_is_held_to_the_duration_limit(tmp_path, fields, status, message):
    """A text-only request generates one window unless it says how long: that length counts."""
    import re

    FormData = pytest.importorskip("starlette.datastructures",
                                   reason="the ray extra is not installed").FormData
    form = FormData(list(fields.items()))
    with Upload(str(tmp_path)) as upload:
        run = request_options(form, upload, Limits(2 ** 20, 5.0, 4), window_seconds=8.0)
        if status is None:
            assert asyncio.run(run)["duration"] == 4.0
            return
        with pytest.raises(HttpError, match=re.escape(message)) as refused:
            asyncio.run(run)
    assert refused.value.status == status


@pytest.mark.parametrize("format, suffix", [("MAT5", ".mat"), ("HTK", ".htk"), ("WAV", ".wav")])
def test_audio_only_libsndfile_reads_is_held_to_the_duration_limit(tmp_path, format, suffix):
    """The runtime reads a mixture with libsndfile first; formats FFmpeg cannot open (MATLAB,
    HTK) were not timed at all, and ran at any length."""
    import io

    import soundfile as sf

    from mmsep.runtime.example import tones

    datastructures = pytest.importorskip("starlette.datastructures",
                                         reason="the ray extra is not installed")
    data = io.BytesIO()
    sf.write(data, tones(5.0, 16000, seed=1), 16000, format=format, subtype="PCM_16")
    data.seek(0)
    mix = datastructures.UploadFile(data, filename=f"long{suffix}")
    form = datastructures.FormData([("mix", mix), ("text", "x")])
    with Upload(str(tmp_path)) as upload:
        with pytest.raises(HttpError) as refused:
            asyncio.run(request_options(form, upload, Limits(2 ** 20, 3.0, 4), 8.0))
        assert refused.value.status == 413
        assert upload.public(str(refused.value)) == (
            f"mix (long{suffix}): 5.0 s of media is over the limit of 3 s")


def test_uploads_of_a_killed_replica_are_removed_when_a_replica_starts(tmp_path):
    """A replica killed mid-request (out of memory, or when the drain at shutdown runs out)
    leaves its request's uploads; the next replica to start on that folder removes them and
    keeps those of replicas still running."""
    import subprocess
    import sys

    from mmsep.scale.service import remove_stale_uploads

    killed = ("import os, sys; from mmsep.scale.service import Upload; "
              "upload = Upload(sys.argv[1]); (upload.dir / 'mix.wav').write_bytes(b'x'); "
              "os._exit(9)")
    subprocess.run([sys.executable, "-c", killed, str(tmp_path)], check=False)
    assert len(list(tmp_path.iterdir())) == 1
    with Upload(str(tmp_path)) as live:
        remove_stale_uploads(str(tmp_path))
        assert list(tmp_path.iterdir()) == [live.dir]
    assert list(tmp_path.iterdir()) == []
