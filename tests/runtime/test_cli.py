"""mmsep-run: outputs, --mux, --json, naming; every bad input -> exit 2, one line, no output."""

import json
import re
import shutil
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf

from mmsep.runtime.atomic import MACHINE
from mmsep.runtime.cli import main
from mmsep.runtime.example import tones
from tests.helpers import without_fp16_copies

SR = 44100


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def video_packets(path):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return [(bytes(p), p.pts, p.is_keyframe) for p in container.demux(stream)
                if p.dts is not None], stream.codec_context.name


def test_video_text_mux_json(model_dir, media, tmp_path, capsys):
    out, muxed = tmp_path / "dog.wav", tmp_path / "dog.mp4"
    code, stdout, stderr = run_cli(["--model", model_dir, "--video", media["av"], "--text",
                                    "a dog", "--steps", 1, "-o", out, "--mux", muxed, "--json"],
                                   capsys)
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["outputs"] == [str(out)] and summary["mux"] == str(muxed)
    assert summary["backend"] == "ort-cpu" and summary["mode"] == "separation"
    assert summary["precision"] == "fp32"  # auto: fp32 on the CPU
    assert set(summary["timings_s"]) >= {"load", "decode", "features", "conditioning",
                                         "sampling", "vae_decode", "vocode", "write", "total"}
    assert summary["real_time_factor"] > 0 and summary["windows"] == 3
    audio, rate = sf.read(out, dtype="float32")
    assert rate == SR and audio.size == round(summary["audio_seconds"] * SR)
    assert np.isfinite(audio).all() and np.abs(audio).max() > 0

    # the video stream is copied packet for packet, the separated audio added as AAC
    original, codec = video_packets(media["av"])
    copied, copied_codec = video_packets(muxed)
    assert copied_codec == codec and len(copied) == len(original)
    assert [p[0] for p in copied] == [p[0] for p in original]
    assert [p[2] for p in copied] == [p[2] for p in original]
    with av.open(str(muxed)) as container:
        (stream,) = container.streams.audio
        assert stream.codec_context.name == "aac" and stream.rate == SR
        # the MP4 muxer stores the title in the track's name
        assert "a dog" in (stream.metadata.get("title"), stream.metadata.get("name"))
        decoded = np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(stream)])
    assert abs(decoded.size - audio.size) < 4096  # AAC frames round up; priming is trimmed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dog.mp4", "dog.wav"]


def test_precision_option(model_dir, media, tmp_path, capsys):
    """--precision fp16 runs the mixed-precision graphs (here on the CPU); a model directory
    without them refuses it in one line with exit code 2 and writes nothing."""
    args = ["--model", model_dir, "--mix", media["av"], "--steps", 2, "--json"]
    outputs = {}
    for precision in ("fp32", "fp16"):
        out = tmp_path / f"{precision}.wav"
        code, stdout, stderr = run_cli([*args, "--precision", precision, "-o", out], capsys)
        assert code == 0, stderr
        assert json.loads(stdout)["precision"] == precision
        outputs[precision] = sf.read(out, dtype="float32")[0]
    difference = np.linalg.norm(outputs["fp16"] - outputs["fp32"])
    assert 0 < difference < 0.1 * np.linalg.norm(outputs["fp32"])

    copy = without_fp16_copies(model_dir, tmp_path / "fp32-only")
    code, _, stderr = run_cli(["--model", copy, "--mix", media["av"], "--precision", "fp16",
                               "-o", tmp_path / "no.wav"], capsys)
    assert code == 2 and len(stderr.strip().splitlines()) == 1
    assert "has no fp16 graphs" in stderr and not (tmp_path / "no.wav").exists()


def test_multi_text_naming_flac_and_default_names(model_dir, tmp_path, capsys, monkeypatch):
    mix = tmp_path / "street.wav"
    sf.write(mix, tones(1.2, 48000), 48000)
    code, _, stderr = run_cli(["--model", model_dir, "--mix", mix, "--text", "car", "--text",
                               "bird", "--steps", 1, "-o", tmp_path / "sep.flac",
                               "--subtype", "PCM_24", "--quiet"], capsys)
    assert code == 0 and stderr == ""
    for k in (0, 1):
        info = sf.info(tmp_path / f"sep_{k}.flac")
        assert info.format == "FLAC" and info.subtype == "PCM_24" and info.samplerate == SR
        assert info.frames == round(1.2 * SR)
    monkeypatch.chdir(tmp_path)
    code, _, stderr = run_cli(["--model", model_dir, "--mix", mix, "--steps", 1], capsys)
    assert code == 0 and "wrote street_separated.wav" in stderr
    code, _, _ = run_cli(["--model", model_dir, "--text", "wind", "--duration", 0.3, "--steps",
                          1, "-q"], capsys)
    assert code == 0 and sf.info(tmp_path / "generated.wav").frames == round(0.3 * SR)


def _tampered(model_dir, tmp_path):
    copy = tmp_path / "tampered"
    shutil.copytree(model_dir, copy)
    data = bytearray((copy / "vocoder.onnx").read_bytes())
    data[100] ^= 1
    (copy / "vocoder.onnx").write_bytes(bytes(data))
    return copy


def _incomplete(model_dir, tmp_path):
    copy = tmp_path / "incomplete"
    shutil.copytree(model_dir, copy)
    (copy / "sync.onnx").unlink()
    return copy


def _wav(tmp_path, name, data):
    path = tmp_path / name
    sf.write(path, data, SR, subtype="FLOAT")
    return path


BAD = {
    "missing video": (lambda t, m: ["--video", t / "nope.mp4"], "nope.mp4: file not found"),
    "corrupt video": (lambda t, m: ["--video", _junk(t)], "junk.mp4: unreadable"),
    "truncated video": (lambda t, m: ["--video", _truncated(t, m)], "cut.mp4"),
    "audio as video": (lambda t, m: ["--video", _wav(t, "a.wav", tones(1, SR))],
                       "a.wav: has no video stream"),
    "no audio track": (lambda t, m: ["--video", m["silent_video"]], "no audio track"),
    "missing mix": (lambda t, m: ["--mix", t / "nope.wav"], "nope.wav: file not found"),
    "empty text": (lambda t, m: ["--mix", _wav(t, "a.wav", tones(1, SR)), "--text", " "],
                   "--text is empty"),
    "empty negative text": (lambda t, m: ["--text", "x", "--negative-text", ""],
                            "--negative-text is empty"),
    "mix and generate": (lambda t, m: ["--mix", _wav(t, "a.wav", tones(1, SR)), "--generate"],
                         "--mix and --generate: --generate makes audio from a noise mixture"),
    "mix and duration": (lambda t, m: ["--mix", _wav(t, "a.wav", tones(1, SR)), "--duration",
                                       2], "--duration sets the length of generated audio; "
                                           "with --mix the output"),
    "video and duration": (lambda t, m: ["--video", m["av"], "--duration", 2],
                           "with --video alone the video's audio track is the mixture"),
    "nan mix": (lambda t, m: ["--mix", _wav(t, "n.wav", np.full(SR, np.nan, np.float32))],
                "NaN or infinite"),
    "silent mix": (lambda t, m: ["--mix", _wav(t, "s.wav", np.zeros(SR, np.float32))],
                   "silent"),
    "short mix": (lambda t, m: ["--mix", _wav(t, "s.wav", tones(0.05, SR))],
                  "minimum is 0.1 s"),
    "no model": (lambda t, m: ["--model", t / "none", "--text", "x"], "does not exist"),
    "tampered model": (lambda t, m: ["--model", _tampered(m["model"], t), "--text", "x"],
                       "tampered or incomplete"),
    "incomplete model": (lambda t, m: ["--model", _incomplete(m["model"], t), "--text", "x"],
                         "missing file sync.onnx"),
    "steps": (lambda t, m: ["--text", "x", "--steps", 0], "--steps"),
    "cfg": (lambda t, m: ["--text", "x", "--cfg", -1], "--cfg"),
    "seed": (lambda t, m: ["--text", "x", "--seed", -1], "--seed"),
    "overlap": (lambda t, m: ["--text", "x", "--overlap", 1.5], "overlap must be between"),
    "max batch": (lambda t, m: ["--text", "x", "--max-batch", 0], "--max-batch"),
    "flac float": (lambda t, m: ["--text", "x", "-o", t / "o.flac", "--subtype", "FLOAT"],
                   "FLAC cannot store FLOAT"),
    "trt": (lambda t, m: ["--text", "x", "--backend", "trt"], "TensorRT is not installed"),
    "mux without video": (lambda t, m: ["--text", "x", "--mux", t / "o.mp4"],
                          "--mux needs --video"),
    "unknown option": (lambda t, m: ["--text", "x", "--bogus"], "No such option"),
    "missing out dir": (lambda t, m: ["--text", "x", "-o", t / "no" / "o.wav"],
                        "does not exist"),
    "stdout": (lambda t, m: ["--text", "x", "-o", "-"], "--output -: outputs go to files"),
    "missing out dir/": (lambda t, m: ["--text", "x", "-o", f"{t / 'stems'}/"],
                         "stems/: directory does not exist"),
}


def _junk(tmp_path):
    path = tmp_path / "junk.mp4"
    path.write_bytes(b"\x00\x01garbage" * 100)
    return path


def _truncated(tmp_path, media):
    path = tmp_path / "cut.mp4"
    path.write_bytes(media["av"].read_bytes()[:4000])
    return path


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_exit_2_one_line_no_output(case, model_dir, media, tmp_path, capsys):
    make_args, message = BAD[case]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    args = make_args(inputs, {**media, "model": model_dir})
    if "--model" not in args:
        args = ["--model", model_dir, *args]
    if "-o" not in args:
        args += ["-o", out_dir / "out.wav"]
    code, stdout, stderr = run_cli([*args, "--steps", 1] if "--steps" not in args else args,
                                   capsys)
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mmsep-run: error: "), stderr
    assert message in lines[0]
    assert "Traceback" not in stderr and stdout == ""
    assert list(out_dir.iterdir()) == []


def test_internal_failure_exit_1(model_dir, tmp_path, capsys, monkeypatch):
    from mmsep.runtime.backends import OrtBackend
    from mmsep.runtime.errors import BackendError

    def fail(self, stage, inputs, on_device=False):
        raise BackendError(stage, "ONNX Runtime failed: out of memory")

    monkeypatch.setattr(OrtBackend, "run", fail)
    code, _, stderr = run_cli(["--model", model_dir, "--text", "x", "--steps", 1, "-o",
                               tmp_path / "o.wav"], capsys)
    assert code == 1
    # the first stage to run is the model's own business; the message names it
    assert re.fullmatch(r"mmsep-run: internal error: stage '\w+': ONNX Runtime failed: out of "
                        r"memory", stderr.strip()), stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["processing", "muxing"])
def test_ctrl_c_leaves_nothing(where, model_dir, media, tmp_path, capsys, monkeypatch):
    if where == "processing":
        from mmsep.runtime.separator import Separator

        def interrupt(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(Separator, "process", interrupt)
    else:
        from mmsep.runtime import mux

        original = mux._AacTrack.encode_until

        def interrupt(self, seconds):
            if seconds is not None and seconds > 1.0:
                raise KeyboardInterrupt  # after the wav and part of the mp4 were written
            return original(self, seconds)

        monkeypatch.setattr(mux._AacTrack, "encode_until", interrupt)
    code, _, stderr = run_cli(["--model", model_dir, "--video", media["av"], "--steps", 1,
                               "-o", tmp_path / "o.wav", "--mux", tmp_path / "o.mp4"], capsys)
    assert code == 130 and "interrupted; nothing was written" in stderr
    assert list(tmp_path.iterdir()) == []


def test_a_mux_container_that_cannot_hold_the_video_is_refused_up_front(model_dir, tmp_path,
                                                                       capsys, monkeypatch):
    """An FFV1 video cannot go into .mov: refused before the model loads, nothing written."""
    from mmsep.runtime.separator import Separator

    video = tmp_path / "ffv1.mkv"
    with av.open(str(video), "w") as out:
        stream = out.add_stream("ffv1", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(10):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 20 * i, np.uint8),
                                               format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    monkeypatch.setattr(Separator, "__init__", lambda *a, **k: pytest.fail("model loaded"))
    code, _, stderr = run_cli(["--model", model_dir, "--video", video, "--text", "a", "-o",
                               tmp_path / "a.wav", "--mux", tmp_path / "a.mov"], capsys)
    assert (code, stderr.strip()) == (
        2, f"mmsep-run: error: --mux {tmp_path / 'a.mov'}: .mov cannot hold the video's ffv1 "
           "stream ('mov' format does not support 'ffv1' codec); use .mkv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ffv1.mkv"]


def test_a_mixture_without_a_query_is_warned_about(model_dir, tmp_path, capsys):
    mix = _wav(tmp_path, "m.wav", tones(1, SR))
    code, _, stderr = run_cli(["--model", model_dir, "--mix", mix, "-o", tmp_path / "o.wav",
                               "--steps", "1"], capsys)
    assert code == 0 and (tmp_path / "o.wav").is_file()
    assert stderr.startswith("mmsep-run: warning: no --video or --text: nothing told the model "
                             "which source to separate\n")


def test_the_no_query_warning_comes_after_the_checks_and_before_the_progress(model_dir, tmp_path,
                                                                            capsys):
    mix = _wav(tmp_path, "m.wav", tones(16, SR))  # three 8 s windows: three batches of one
    code, _, stderr = run_cli(["--model", model_dir, "--mix", mix, "-o", tmp_path / "o.wav",
                               "--steps", "1", "--max-batch", "1"], capsys)
    lines = stderr.splitlines()
    assert code == 0 and lines[0] == ("mmsep-run: warning: no --video or --text: nothing told "
                                      "the model which source to separate"), stderr
    assert "batch" in lines[1] and lines[-1].startswith("wrote ")
    silent = _wav(tmp_path, "s.wav", np.zeros(SR, np.float32))
    code, _, stderr = run_cli(["--model", model_dir, "--mix", silent, "-o", tmp_path / "s_.wav",
                               "--steps", "1"], capsys)
    lines = stderr.strip().splitlines()  # a refusal is the one line it was, no warning first
    assert code == 2 and len(lines) == 1 and lines[0].startswith("mmsep-run: error: "), stderr


def test_the_default_model_directory_is_named_when_it_is_missing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, stderr = run_cli(["--mix", _wav(tmp_path, "m.wav", tones(1, SR))], capsys)
    assert (code, stderr.strip()) == (2, "mmsep-run: error: no --model given, and the default "
                                         "model directory models/tiny does not exist; pass "
                                         "--model with a directory mmsep-export wrote")


def test_an_interrupt_while_outputs_are_renamed_waits_for_all_of_them(model_dir, tmp_path,
                                                                      capsys, monkeypatch):
    """SIGTERM arriving between two renames into place: both outputs are the new ones (it
    left one new and one old, saying nothing was written)."""
    import os
    import signal

    from mmsep.runtime import atomic

    old = tmp_path / "old.wav"
    sf.write(old, tones(0.5, 44100), 44100)
    outputs = [tmp_path / "out_0.wav", tmp_path / "out_1.wav"]
    for path in outputs:
        shutil.copy(old, path)
    real_replace, calls = os.replace, []

    def replace_then_interrupt(src, dst):
        real_replace(src, dst)
        calls.append(dst)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(atomic.os, "replace", replace_then_interrupt)
    code, _, err = run_cli(["--model", model_dir, "--text", "a", "--text", "b", "--generate",
                            "--duration", 0.5, "--steps", 1, "-q", "-o", tmp_path / "out.wav"],
                           capsys)
    assert code == 0, err
    assert "interrupted while the outputs were being put in place; they were all written" in err
    assert sorted(Path(p) for p in calls) == outputs
    assert all(path.read_bytes() != old.read_bytes() for path in outputs)


def test_what_a_killed_run_left_is_removed_by_the_next(model_dir, tmp_path, capsys):
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = tmp_path / f".out.partial-{MACHINE}-{gone.pid}-{'0' * 12}.wav"
    stale.write_bytes(b"half an output")
    other = tmp_path / f".other.partial-{MACHINE}-{gone.pid}-{'0' * 12}.wav"  # not its output:
    other.write_bytes(b"another program's")  # left to the program that writes other.wav
    code, _, err = run_cli(["--model", model_dir, "--text", "a", "--generate", "--duration", 0.5,
                            "--steps", 1, "-q", "-o", tmp_path / "out.wav"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, "out.wav"]


@pytest.mark.parametrize("reader", ["full disk", "gone"])
def test_a_json_summary_that_cannot_be_printed(model_dir, tmp_path, reader):
    """The outputs are in place; a full disk behind the redirection is exit 2 naming standard
    output, a reader that went away (| head) exit 141 without a word, as other tools."""
    import subprocess

    if reader == "full disk" and not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system")
    command = [sys.executable, "-m", "mmsep.runtime.cli", "--model", str(model_dir), "--text",
               "x", "--steps", "1", "--duration", "0.5", "--json", "-o", str(tmp_path / "a.wav")]
    if reader == "full disk":
        with open("/dev/full", "w") as full:
            done = subprocess.run(command, stdout=full, stderr=subprocess.PIPE, text=True)
        assert done.returncode == 2
        assert done.stderr.strip() == ("mmsep-run: error: standard output: cannot write (No "
                                       "space left on device)")
    else:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        proc.stdout.close()
        assert proc.wait(timeout=300) == 141
        assert proc.stderr.read() == ""
    assert sf.info(tmp_path / "a.wav").duration == pytest.approx(0.5, abs=0.01)
