"""Never lose a user's data: outputs that are inputs are refused, writes are safe under faults."""

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf

from mmsep.model_files import sha256_file
from mmsep.runtime import audio_writer
from mmsep.runtime.atomic import atomic_output
from mmsep.runtime.errors import InputError
from mmsep.runtime.example import tones
from mmsep.runtime.mux import MUX_FORMATS, mux
from mmsep.runtime.paths import check_output_dir, check_outputs
from mmsep.runtime.separator import Separator
from tests.runtime.media import decode_rgb
from tests.runtime.test_cli import run_cli

SR = 44100
GENERATE = ["--text", "x", "--duration", 0.3, "--steps", 1, "-q"]


def listing(directory) -> list[str]:
    return sorted(p.name for p in Path(directory).iterdir())


# ---- path identity --------------------------------------------------------------------------

def test_check_outputs_compares_files_not_spellings(tmp_path, monkeypatch):
    mix = tmp_path / "mix.wav"
    mix.write_bytes(b"RIFF")
    (tmp_path / "link.wav").symlink_to(mix)
    os.link(mix, tmp_path / "hard.wav")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    for spelling in ("../mix.wav", str(mix), "../sub/../mix.wav", "../link.wav", "../hard.wav"):
        with pytest.raises(InputError, match=re.escape(f"--output {spelling} is the same file as "
                                                       f"--mix {mix}; choose another path")):
            check_outputs({"--output": spelling}, {"--mix": mix})
    # a path that does not exist yet is compared after resolving links and ".."
    (tmp_path / "dirlink").symlink_to(tmp_path / "sub")
    with pytest.raises(InputError, match="--mux .* is the same file as --output"):
        check_outputs({"--output": tmp_path / "sub" / "o.mp4",
                       "--mux": tmp_path / "dirlink" / "o.mp4"}, {"--mix": mix})
    check_outputs({"--output": "../other.wav", "--mux": "o.mp4"}, {"--mix": mix})  # distinct


def test_check_output_dir(tmp_path):
    weights = tmp_path / "weights"
    (weights / "ext_weights").mkdir(parents=True)
    ckpt = tmp_path / "ckpts" / "ft.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"x")
    inputs = {"--checkpoint": ckpt, "--weights-dir": weights}
    for out, says in ((ckpt, "is --checkpoint"), (ckpt.parent, "contains --checkpoint"),
                      (tmp_path, "contains --checkpoint"), (weights, "is --weights-dir"),
                      (weights / "ext_weights" / "m", "lies inside --weights-dir")):
        with pytest.raises(InputError, match=says):
            check_output_dir(out, inputs)
    check_output_dir(tmp_path / "models" / "tiny", inputs)


# ---- mmsep-run: outputs that are inputs ---------------------------------------------------------

def _clashes(tmp, media, model_dir):
    video = tmp / "clip.mp4"
    video.write_bytes(Path(media["av"]).read_bytes())
    mix = tmp / "mix.wav"
    sf.write(mix, tones(1.0, SR), SR)
    os.link(mix, tmp / "hard.wav")
    sf.write(tmp / "song_1.wav", tones(1.0, SR), SR)
    (tmp / "soft.wav").symlink_to(mix)
    (tmp / "model.wav").symlink_to(Path(model_dir).resolve() / "denoiser.onnx")
    return {
        "output is the mix": (["--mix", mix, "--text", "dog", "-o", mix], "--output", "--mix"),
        "output is the video": (["--video", video, "-o", video], "--output", "--video"),
        "mux is the video": (["--video", video, "-o", tmp / "o.wav", "--mux", video], "--mux",
                             "--video"),
        "relative spelling": (["--mix", mix, "-o", "../t/./mix.wav"], "--output", "--mix"),
        "hard link": (["--mix", mix, "-o", tmp / "hard.wav"], "--output", "--mix"),
        "symbolic link": (["--mix", mix, "-o", tmp / "soft.wav"], "--output", "--mix"),
        "one stem of several": (["--mix", tmp / "song_1.wav", "--text", "a", "--text", "b",
                                 "-o", tmp / "song.wav"], "--output (text 1)", "--mix"),
        "link to a model file": (["--mix", mix, "-o", tmp / "model.wav"], "--output",
                                 "the model's denoiser.onnx"),
    }


CLASHES = ["output is the mix", "output is the video", "mux is the video", "relative spelling",
           "hard link", "symbolic link", "one stem of several", "link to a model file"]


@pytest.mark.parametrize("case", CLASHES)
def test_an_output_never_replaces_an_input(case, model_dir, media, tmp_path, capsys,
                                           monkeypatch):
    tmp = tmp_path / "t"
    tmp.mkdir()
    args, first, second = _clashes(tmp, media, model_dir)[case]
    monkeypatch.chdir(tmp)
    before = {p: sha256_file(p) for p in [*tmp.iterdir(), *Path(model_dir).iterdir()]}
    names = listing(tmp)

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the outputs were checked")

    monkeypatch.setattr(Separator, "__init__", never)
    code, _, stderr = run_cli(["--model", model_dir, "--steps", 1, *args], capsys)
    assert code == 2, stderr
    (line,) = stderr.strip().splitlines()
    assert line.startswith(f"mmsep-run: error: {first}"), line
    if second is not None:
        assert f"is the same file as {second}" in line
    assert {p: sha256_file(p) for p in before} == before and listing(tmp) == names


def test_a_model_file_is_never_an_output(model_dir, tmp_path, capsys):
    mix = tmp_path / "mix.wav"
    sf.write(mix, tones(1.0, SR), SR)
    model = tmp_path / "model"
    model.mkdir()
    for f in Path(model_dir).iterdir():
        os.link(f, model / f.name)
    (model / "notes.wav").write_bytes(b"kept")
    code, _, stderr = run_cli(["--model", model, "--mix", mix, "-o", model / "notes.wav"], capsys)
    assert code == 2 and f"is the same file as the model's notes.wav {model}" in stderr
    assert (model / "notes.wav").read_bytes() == b"kept"


# ---- formats -----------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix,fmt,subtype", [(".wav", "WAV", "PCM_16"),
                                                (".flac", "FLAC", "PCM_16"),
                                                (".ogg", "OGG", "VORBIS"),
                                                (".WAV", "WAV", "PCM_16")])
def test_the_extension_picks_the_format(suffix, fmt, subtype, model_dir, tmp_path, capsys):
    out = tmp_path / f"gen{suffix}"
    code, _, stderr = run_cli(["--model", model_dir, *GENERATE, "-o", out], capsys)
    assert code == 0, stderr
    info = sf.info(out)
    assert (info.format, info.subtype, info.samplerate) == (fmt, subtype, SR)
    assert info.frames == round(0.3 * SR)
    assert listing(tmp_path) == [out.name]


@pytest.mark.parametrize("args,message", [
    (["-o", "{t}/out.xyz"], "--output {t}/out.xyz: unknown extension .xyz; use one of .wav, "
                            ".flac, .ogg"),
    (["-o", "{t}/out.mp3"], "unknown extension .mp3"),
    (["-o", "{t}/.flac"], "--output {t}/.flac: give a file name before the extension"),
    (["-o", "{t}/out.wav", "--format", "flac"], "--format flac does not match --output"),
    (["-o", "{t}/out.ogg", "--subtype", "PCM_24"], "OGG output is Vorbis-encoded"),
    (["--video", "{v}", "--generate", "-o", "{t}/o.wav", "--mux", "{t}/o.avi"],
     "--mux {t}/o.avi: unsupported extension; use one of .mp4, .m4v, .mov, .mkv"),
    (["--video", "{v}", "--generate", "-o", "{t}/o.wav", "--mux", "{t}"], "{t}: is a directory"),
])
def test_unknown_or_mismatched_formats_are_refused_up_front(args, message, model_dir, media,
                                                            tmp_path, capsys):
    args = [a.format(t=tmp_path, v=media["av"]) for a in args]
    code, _, stderr = run_cli(["--model", model_dir, *GENERATE, *args], capsys)
    assert code == 2 and message.format(t=tmp_path) in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1 and listing(tmp_path) == []


def test_an_existing_directory_means_the_default_name_inside(model_dir, tmp_path, capsys):
    mix = tmp_path / "street.wav"
    sf.write(mix, tones(0.5, SR), SR)
    out = tmp_path / "separated"
    out.mkdir()
    code, _, stderr = run_cli(["--model", model_dir, "--mix", mix, "--steps", 1, "-q", "-o",
                               out, "--format", "flac"], capsys)
    assert code == 0, stderr
    assert listing(out) == ["street_separated.flac"] and listing(tmp_path) == ["separated",
                                                                               "street.wav"]


@pytest.mark.parametrize("suffix", list(MUX_FORMATS))
def test_every_mux_container_is_written_and_readable(suffix, media, tmp_path):
    out = tmp_path / f"muxed{suffix}"
    stem = tones(2.0, SR).astype(np.float32)
    mux(media["av"], stem[None], SR, out, titles=["a dog"])
    with av.open(str(out)) as container:
        assert MUX_FORMATS[suffix] in container.format.name.split(",")
        (stream,) = container.streams.audio
        assert stream.codec_context.name == "aac" and stream.rate == SR
        decoded = np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(stream)])
    assert abs(decoded.size - stem.size) < 4096
    # the video stream is copied, not re-encoded: the same pictures come out
    original, copied = decode_rgb(media["av"])[0], decode_rgb(out)[0]
    assert len(copied) == len(original)
    assert all(np.array_equal(a, b) for a, b in zip(original, copied))
    assert listing(tmp_path) == [out.name]


# ---- faults while writing ----------------------------------------------------------------------

class FullDisk:
    """A file whose writes fail with ENOSPC once ``room`` bytes are on it, like a full disk."""

    def __init__(self, path, room):
        self.raw, self.room = open(path, "w+b", buffering=0), room

    def write(self, data):
        if self.raw.tell() + len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.raw.write(data)

    def __getattr__(self, name):
        return getattr(self.raw, name)


@pytest.mark.parametrize("fmt", ["wav", "flac", "ogg"])
@pytest.mark.parametrize("room", [0, 30, 20_000])
def test_a_full_disk_fails_cleanly_and_keeps_the_previous_file(fmt, room, model_dir, tmp_path,
                                                               capsys, monkeypatch):
    out = tmp_path / f"out.{fmt}"
    out.write_bytes(b"the previous output")
    monkeypatch.setattr(audio_writer, "open_output_file", lambda path: FullDisk(path, room))
    code, _, stderr = run_cli(["--model", model_dir, "--text", "x", "--duration", 2, "--steps", 1,
                               "-q", "-o", out], capsys)
    assert code == 2
    assert stderr.strip() == f"mmsep-run: error: {out}: cannot write (No space left on device)"
    assert out.read_bytes() == b"the previous output" and listing(tmp_path) == [out.name]


_LIMITED = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
from mmsep.runtime.cli import main
main(sys.argv[1:])
"""


@pytest.mark.parametrize("what", ["audio", "mux"])
def test_a_file_size_limit_fails_cleanly_in_a_real_process(what, model_dir, media, tmp_path):
    out, muxed = tmp_path / "out.ogg", tmp_path / "out.mp4"
    out.write_bytes(b"previous audio")
    muxed.write_bytes(b"previous video")
    if what == "audio":  # a 3 s wav is 265 kB
        limit, args = 100_000, ["--text", "x", "--duration", 3, "-o", tmp_path / "out.wav"]
        (tmp_path / "out.wav").write_bytes(b"previous wav")
    else:  # the ogg (34 kB) fits, the muxed video (118 kB) does not
        limit, args = 60_000, ["--video", media["av"], "-o", out, "--mux", muxed]
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    proc = subprocess.run([sys.executable, "-c", _LIMITED.format(limit=limit), "--model",
                           model_dir, "--steps", "1", "-q", *map(str, args)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr
    target = tmp_path / "out.wav" if what == "audio" else muxed
    assert proc.stderr.strip() == f"mmsep-run: error: {target}: cannot write (File too large)"
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_concurrent_writers_of_one_path_leave_one_complete_file(tmp_path):
    path = tmp_path / "out.wav"
    signals = [tones(1.0, SR, freqs=(f,)).astype(np.float32) for f in (220.0, 880.0)]
    step = threading.Barrier(2, timeout=60)
    failures = []

    def writer(samples):
        try:
            with atomic_output(path) as tmp, \
                    audio_writer.AudioWriter(tmp, SR, subtype="FLOAT") as out:
                for chunk in np.array_split(samples, 8):
                    step.wait()  # both files are open and half written at the same time
                    out.write(chunk)
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)
            step.abort()

    threads = [threading.Thread(target=writer, args=(s,)) for s in signals]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
    written, _ = sf.read(path, dtype="float32")
    assert any(np.array_equal(written, s) for s in signals)
    assert listing(tmp_path) == ["out.wav"]


def test_two_mmsep_run_processes_on_one_output(model_dir, separator, tmp_path):
    out = tmp_path / "out.wav"
    command = [sys.executable, "-m", "mmsep.runtime.cli", "--model", str(model_dir), "--backend",
               "ort-cpu", "--text",
               "x", "--duration", "2", "--steps", "1", "--subtype", "FLOAT", "-o", str(out),
               "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([*command, "--seed", str(seed)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for seed in (1, 2)]
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
        assert json.loads(stdout)["outputs"] == [str(out)]
    written, rate = sf.read(out, dtype="float32")
    expected = [separator.separate(text="x", duration=2, steps=1, seed=seed) for seed in (1, 2)]
    assert rate == SR and any(np.allclose(written, e, atol=1e-6) for e in expected)
    assert listing(tmp_path) == ["out.wav"]


# ---- the atomic helper ------------------------------------------------------------------------

def test_atomic_output_unique_durable_and_clean(tmp_path, monkeypatch):
    path = tmp_path / "x.wav"
    synced, replaced = [], []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}"))
                        or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: replaced.append((str(a), len(synced)))
                        or real_replace(a, b))
    with atomic_output(path) as first, atomic_output(path) as second:
        assert first != second and first.suffix == ".wav" and first.name.startswith(".x.partial-")
        first.write_bytes(b"one")
        second.write_bytes(b"two")
    # each file is flushed to disk before its rename, the directory after it
    assert replaced == [(str(second), 1), (str(first), 3)]
    assert synced == [str(second), str(tmp_path), str(first), str(tmp_path)]
    assert path.read_bytes() == b"one" and listing(tmp_path) == ["x.wav"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    with pytest.raises(KeyboardInterrupt), atomic_output(path) as tmp:
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt
    assert path.read_bytes() == b"one" and listing(tmp_path) == ["x.wav"]


# ---- the model directory while a run uses it ------------------------------------------------

def test_a_loaded_separator_is_unaffected_when_its_model_is_re_exported(model_dir, media,
                                                                         tmp_path):
    pytest.importorskip("torch", reason="uses the exporter's directory swap")
    from mmsep.export.exporter import swap_into_place
    from mmsep.runtime.errors import ModelDirError

    mix = tmp_path / "mix.wav"
    sf.write(mix, tones(2.5, SR), SR)
    request = dict(mix=mix, video=media["av"], text="dog", steps=1, seed=3)
    for name in ("live", "lazy"):
        shutil.copytree(model_dir, tmp_path / name)

    def re_export(directory):  # what mmsep-export does: a new directory swapped in by renames
        new = tmp_path / f".{directory.name}.partial"
        new.mkdir()
        (new / "manifest.json").write_text('{"format_version": 2}')  # would not even load
        swap_into_place(new, directory)
        assert listing(directory) == ["manifest.json"]

    with Separator(tmp_path / "live", backend="ort-cpu") as sep:
        before = sep.separate(**request)  # every stage is loaded now
        re_export(tmp_path / "live")
        np.testing.assert_array_equal(sep.separate(**request), before)
    with Separator(tmp_path / "lazy", backend="ort-cpu") as sep:  # stages load on first use
        re_export(tmp_path / "lazy")
        with pytest.raises(ModelDirError, match="lazy was replaced or removed while in use"):
            sep.separate(**request)
    assert sorted(listing(tmp_path)) == ["lazy", "live", "mix.wav"]


def test_sigterm_mid_run_leaves_nothing(model_dir, tmp_path):
    out = tmp_path / "out.wav"
    out.write_bytes(b"previous")
    proc = subprocess.Popen([sys.executable, "-m", "mmsep.runtime.cli", "--model", str(model_dir),
                             "--backend", "ort-cpu", "--text", "x", "--duration", "600",
                             "--max-batch", "1", "--steps", "1", "-q", "-o", str(out)],
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        while not any(p.stat().st_size > 44 for p in tmp_path.glob(".out.partial-*.wav")):
            assert proc.poll() is None, proc.stderr.read()  # samples are being written
            time.sleep(0.05)
    finally:
        proc.terminate()
    code, stderr = proc.wait(timeout=120), proc.stderr.read().strip()
    assert (code, stderr) == (130, "mmsep-run: interrupted; nothing was written")
    assert listing(tmp_path) == ["out.wav"] and out.read_bytes() == b"previous"
