"""The HTTP side of mmsep-serve, independent of Ray: a form -> Separator request, limits, answers.

``POST /v1/separate`` takes a multipart form: ``mix`` (audio file) and/or ``video`` (file),
``text`` (repeatable), ``negative_text``, ``seed``, ``steps``, ``cfg``, ``generate``,
``duration``. Answers: ``audio/wav`` for one text, a zip of ``<k>.wav`` for several; 400 for bad
media or parameters (the runtime's one-line message), 408 for a body that stalls, 413 for a body
over the upload limit or media (or generated audio) over the duration limit, 415 for a body that
is not a form, 503 when the replica already holds its queue limit. Uploads live in a per-request
temporary folder that is removed whatever the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import math
import os
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmsep.runtime.atomic import remove_stale_partials, temporary_name
from mmsep.runtime.errors import InputError
from mmsep.runtime.requests import check_duration

FILE_FIELDS = ("mix", "video")
VALUE_FIELDS = ("negative_text", "seed", "steps", "cfg", "generate", "duration")
UPLOAD_NAME = "mmsep-serve-upload"


class HttpError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    max_upload_bytes: int
    max_seconds: float
    max_queue: int


class Upload:
    """A request's uploaded files in their own temporary folder (removed on exit), named as
    ``atomic.temporary_name`` names a temporary: by machine and process, so that the folders a
    killed replica left are found (``remove_stale_uploads``)."""

    def __init__(self, work_dir: str | None):
        self.dir = Path(work_dir or tempfile.gettempdir()) / temporary_name(UPLOAD_NAME)
        self.dir.mkdir(mode=0o700)
        self.names: dict[str, str] = {}  # saved path -> the client's file name

    def public(self, message: str) -> str:
        """``message`` with the saved paths replaced by the client's file names."""
        for path, name in self.names.items():
            message = message.replace(path, name)
        return message

    def __enter__(self) -> Upload:
        return self

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    async def save(self, field: str, upload) -> str:
        suffix = Path(upload.filename or "").suffix[:16]
        path = self.dir / f"{field}{suffix}"
        with open(path, "wb") as f:
            while chunk := await upload.read(1 << 20):
                f.write(chunk)
        self.names[str(path)] = f"{field} ({upload.filename or 'unnamed upload'})"
        return str(path)


def remove_stale_uploads(work_dir: str | None) -> None:
    """Remove the upload folders (and other temporaries) in ``work_dir`` whose process on this
    machine has ended: a replica killed mid-request (out of memory, the drain at shutdown run
    out) never removed its request's uploads. Those of running replicas are kept; what cannot
    be removed is left (tidying up does not stop a replica from serving)."""
    with contextlib.suppress(OSError):
        remove_stale_partials(work_dir or tempfile.gettempdir())


FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
BODY_IDLE_SECONDS = 30.0  # a client that sends nothing for this long gives its queue place up


def check_form_request(content_type: str | None, query: str) -> None:
    """415 unless the body is a form, 400 for parameters in the URL: anything else would be
    read as an empty form, a request for generated audio."""
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind not in FORM_TYPES:
        raise HttpError(415, f"send the request as a form ({FORM_TYPES[0]}), not "
                             f"{kind or 'a body without a content type'}")
    if query:
        raise HttpError(400, "parameters go in the form, not in the URL's query string")


def check_form_complete(content_type: str | None, body: Path) -> None:
    """400 for a multipart body (the file ``body``) without its closing boundary (an upload cut
    short): the parser would drop the unfinished part and run what is left as another
    request."""
    kind, _, params = (content_type or "").partition(";")
    if kind.strip().lower() != "multipart/form-data":
        return
    match = re.search(r'boundary="?([^";]+)"?', params)
    if match is None:
        raise InputError("not a multipart form (its content type names no boundary)")
    closing = b"--" + match.group(1).strip().encode("latin-1") + b"--"
    with open(body, "rb") as f:
        if f.read(len(closing)) == closing or _holds(f, b"\r\n" + closing):
            return
    raise InputError("the form ends before its closing boundary (an upload cut short); "
                     "send it again")


def _holds(f, marker: bytes, block: int = 1 << 20) -> bool:
    """Whether the file ``f`` holds ``marker``, searched from its end (where a form closes)."""
    end = f.seek(0, os.SEEK_END)
    while end > 0:
        start = max(0, end - block)
        f.seek(start)
        if marker in f.read(end - start + len(marker) - 1):
            return True
        end = start
    return False


async def receive_body(request, path: Path, limit: int,
                       idle_seconds: float = BODY_IDLE_SECONDS) -> None:
    """The whole body written to ``path`` (never held in memory: a replica holds up to
    --max-queue requests), or 413 as soon as it passes ``limit`` bytes (declared or streamed),
    or 408 when no byte comes for ``idle_seconds``."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HttpError(413, f"request body is over the upload limit ({_mb(limit)})")
    size = 0
    chunks = request.stream().__aiter__()
    with open(path, "wb") as f:
        while True:
            try:
                chunk = await asyncio.wait_for(chunks.__anext__(), idle_seconds)
            except StopAsyncIteration:
                return
            except asyncio.TimeoutError:
                raise HttpError(408, f"the request body stalled (nothing for {idle_seconds:g} "
                                     "s)") from None
            size += len(chunk)
            if size > limit:
                raise HttpError(413, f"request body is over the upload limit ({_mb(limit)})")
            f.write(chunk)


def _mb(n: int) -> str:
    return f"{n / 2 ** 20:g} MB"


async def request_options(form, upload: Upload, limits: Limits, window_seconds: float) -> dict:
    """The form as ``Separator.process`` keyword arguments; 400/413 for what cannot be run.
    ``window_seconds``: the model's window, the length generated without media or duration."""
    known = {*FILE_FIELDS, *VALUE_FIELDS, "text"}
    unknown = sorted(set(form.keys()) - known)
    if unknown:
        raise InputError(f"unknown form field {', '.join(unknown)} (known: "
                         f"{', '.join(sorted(known))})")
    repeated = sorted(f for f in (*FILE_FIELDS, *VALUE_FIELDS) if len(form.getlist(f)) > 1)
    if repeated:
        raise InputError(f"form field {', '.join(repeated)} given more than once (only text "
                         "repeats)")
    options: dict = {}
    for field in FILE_FIELDS:
        value = form.get(field)
        if value is None:
            continue
        if isinstance(value, str):
            raise InputError(f"{field} must be an uploaded file")
        options[field] = await upload.save(field, value)
        seconds = await asyncio.to_thread(media_seconds, options[field])  # off the event loop
        if seconds is not None and seconds > limits.max_seconds:
            raise HttpError(413, f"{options[field]}: {seconds:.1f} s of media is over the limit of "
                                 f"{limits.max_seconds:g} s")
    texts = form.getlist("text")
    if texts:
        options["text"] = texts if len(texts) > 1 else texts[0]
    for field in VALUE_FIELDS:
        value = form.get(field)
        if value is not None:
            options[field] = _value(field, value)
    _check_generated_length(options, limits, window_seconds)
    return options


def _check_generated_length(options: dict, limits: Limits, window_seconds: float) -> None:
    duration = options.get("duration")
    if isinstance(duration, float) and duration > limits.max_seconds:
        raise HttpError(413, f"duration {duration:g} s is over the limit of "
                             f"{limits.max_seconds:g} s")
    media = any(field in options for field in FILE_FIELDS)
    if duration is None and not media and window_seconds > limits.max_seconds:
        raise HttpError(413, f"without media or duration the output is one window "
                             f"({window_seconds:g} s), over the limit of {limits.max_seconds:g} "
                             "s; give a duration")


def _value(field: str, text):
    """Numbers and flags from form text; what does not parse goes on unchanged, so that the
    runtime's own check answers with its message."""
    if not isinstance(text, str):
        raise InputError(f"{field} must be a form value, not a file")
    if field == "generate":
        if text.lower() in ("true", "1", "yes", "on"):
            return True
        if text.lower() in ("false", "0", "no", "off", ""):
            return False
        raise InputError("generate must be true or false")
    if field in ("seed", "steps"):
        try:
            return int(text)
        except ValueError:
            return text
    if field in ("cfg", "duration"):
        try:
            value = float(text)
        except ValueError:
            return text
        if field == "duration" and not math.isfinite(value):
            check_duration(value)  # 400 here: an infinite one is no size limit's case (413)
        return value
    return text


def media_seconds(path: str) -> float | None:
    """Duration of a media file as the runtime will read it: libsndfile's frame count where
    libsndfile reads the file (the runtime tries it first, and it reads formats FFmpeg does not),
    else from the container, else its video (or audio) stream's, found from its packets where
    the header states none (a recording written to a pipe); None when it does not open: the
    runtime then answers with its own message."""
    import av

    from mmsep.runtime.media_tracks import stream_duration, stream_start

    seconds = _libsndfile_seconds(path)
    if seconds is not None:
        return seconds
    try:
        with av.open(path) as container:
            if container.duration is not None:
                return container.duration / av.time_base
            stated = [s for s in container.streams if s.duration and s.time_base]
            if stated:
                return max(float(s.duration * s.time_base) for s in stated)
            streams = [*container.streams.video, *container.streams.audio]
            if not streams:
                return None
            return stream_duration(container, streams[0], stream_start(container, streams[0]))
    except (av.FFmpegError, OSError, ValueError):
        return None


def _libsndfile_seconds(path: str) -> float | None:
    import soundfile as sf

    try:
        info = sf.info(path)
    except (sf.LibsndfileError, RuntimeError, TypeError):
        return None  # not a format libsndfile reads: FFmpeg's turn
    return info.frames / info.samplerate if info.samplerate > 0 else None


def wav_bytes(audio: np.ndarray, sample_rate: int) -> bytes:
    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, np.clip(audio, -1.0, 1.0), sample_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def answer_body(result, several: bool) -> tuple[bytes, str]:
    """One text: a WAV; several: a zip of ``<k>.wav`` in text order."""
    if not several:
        return wav_bytes(result.audio[0], result.sample_rate), "audio/wav"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for k, audio in enumerate(result.audio):
            archive.writestr(f"{k}.wav", wav_bytes(audio, result.sample_rate))
    return buffer.getvalue(), "application/zip"


def model_facts(model_dir) -> dict:
    from mmsep.model_files import read_manifest

    return read_manifest(model_dir)["model"]
