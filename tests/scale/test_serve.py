"""mmsep-serve: the real command on a local Ray instance, real HTTP on loopback."""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from mmsep.runtime import Separator
from mmsep.runtime.example import tones

requests = pytest.importorskip("requests")
REPO = Path(__file__).resolve().parents[2]
MAX_QUEUE = 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wav(seconds: float, seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, tones(seconds, 44100, seed=seed), 44100, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """mmsep-serve in a subprocess with its own local Ray instance (Ray's memory monitor off:
    the test machine is shared)."""
    pytest.importorskip("ray.serve", reason="the ray extra is not installed")
    work = tmp_path_factory.mktemp("serve_work")
    port = _free_port()
    env = {**os.environ, "RAY_memory_monitor_refresh_ms": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmsep.scale.serve_cli", "--model", str(model_dir), "--host",
         "127.0.0.1", "--port", str(port), "--backend", "ort-cpu", "--precision", "fp32",
         "--max-queue",
         str(MAX_QUEUE), "--max-upload-mb", "1", "--max-seconds", "3", "--batch-wait-ms",
         "300", "--work-dir", str(work), "--cpus-per-replica", "1"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        assert proc.poll() is None, "mmsep-serve exited"
        try:
            if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                break
        except (requests.ConnectionError, requests.Timeout):  # not up yet, or a busy machine
            pass
        assert time.monotonic() < deadline, "mmsep-serve did not come up"
        time.sleep(1)
    yield url, work, proc
    proc.send_signal(signal.SIGTERM)  # no-op if the last test stopped it
    assert proc.wait(timeout=120) == 0


def _post(url, files=None, data=None, timeout=300):
    return requests.post(f"{url}/v1/separate", files=files, data=data, timeout=timeout)


def test_health_model_and_unknown_routes(server, model_dir):
    url, _, _ = server
    assert requests.get(f"{url}/healthz", timeout=30).text == "ok"
    facts = requests.get(f"{url}/v1/model", timeout=30).json()
    assert facts["preset"] == "tiny" and facts["sample_rate"] == 44100
    assert facts["backend"] == "ort-cpu" and facts["max_batch"] == 4
    assert facts["precision"] == "fp32"
    assert requests.get(f"{url}/v2/separate", timeout=30).status_code == 404


def test_sixteen_concurrent_requests_are_answered_in_shared_batches(server, model_dir):
    url, work, _ = server

    def one(i):
        return _post(url, files={"mix": (f"m{i}.wav", _wav(1.0, seed=i), "audio/wav")},
                     data={"text": "a tone", "seed": str(i), "steps": "1"})

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, range(16)))
    assert [a.status_code for a in answers] == [200] * 16
    assert all(a.headers["content-type"] == "audio/wav" for a in answers)
    assert max(int(a.headers["x-mmsep-batch-requests"]) for a in answers) > 1
    audio, sr = sf.read(io.BytesIO(answers[5].content), dtype="float32")
    assert sr == 44100 and audio.shape == (44100,)
    with Separator(model_dir, backend="ort-cpu") as sep:
        alone = sep.process(mix=tones(1.0, 44100, seed=5), text="a tone", seed=5, steps=1)
    # PCM_16 on the wire, and the mix itself went through PCM_16
    reference = np.clip(alone.audio[0], -1, 1)
    assert np.corrcoef(audio, reference)[0, 1] > 0.999
    assert list(work.iterdir()) == []


def test_several_texts_answer_a_zip(server):
    url, work, _ = server
    answer = _post(url, files={"mix": ("m.wav", _wav(1.0), "audio/wav")},
                   data={"text": ["a tone", "noise"], "steps": "1"})
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(answer.content)) as archive:
        assert archive.namelist() == ["0.wav", "1.wav"]
        assert sf.info(io.BytesIO(archive.read("1.wav"))).frames == 44100
    assert list(work.iterdir()) == []


@pytest.mark.parametrize("files, data, status, message", [
    ({"mix": ("broken.wav", b"RIFF0000WAVEjunk", "audio/wav")}, {"text": "x"}, 400,
     "mix (broken.wav): "),
    ({"mix": ("m.wav", _wav(1.0), "audio/wav")}, {"text": "x", "steps": "0"}, 400,
     "steps must be an integer between 1 and 1000, got 0"),
    ({"mix": ("m.wav", _wav(1.0), "audio/wav")}, {"text": "x", "seed": "abc"}, 400,
     "seed must be a non-negative integer, got 'abc'"),
    ({"mix": ("m.wav", _wav(1.0), "audio/wav")}, {"text": " "}, 400, "text is empty"),
    ({"mix": ("m.wav", _wav(1.0), "audio/wav")}, {"colour": "red"}, 400,
     "unknown form field colour"),
    ([("mix", ("a.wav", _wav(1.0), "audio/wav")), ("mix", ("b.wav", _wav(1.0), "audio/wav"))],
     {"text": "x", "seed": ["1", "2"]}, 400,
     "form field mix, seed given more than once (only text repeats)"),
    ({"mix": ("big.wav", b"\0" * (2 << 20), "audio/wav")}, {"text": "x"}, 413,
     "request body is over the upload limit (1 MB)"),
    ({"mix": ("long.wav", _wav(4.0), "audio/wav")}, {"text": "x"}, 413,
     "mix (long.wav): 4.0 s of media is over the limit of 3 s"),
    (None, {"text": "x", "generate": "true", "duration": "5"}, 413,
     "duration 5 s is over the limit of 3 s"),
    (None, {"text": "x", "generate": "true", "duration": "inf"}, 400,
     "duration must be a number of seconds from 0.1 to 36000, got inf"),
    (None, {"text": "x", "generate": "true", "duration": "abc"}, 400,
     "duration must be a number of seconds from 0.1 to 36000, got 'abc'"),
])
def test_errors_have_their_status_and_one_line_message(server, files, data, status, message):
    url, work, _ = server
    answer = _post(url, files=files, data=data)
    assert answer.status_code == status, answer.text
    assert answer.json()["error"].startswith(message)
    assert list(work.iterdir()) == []


@pytest.mark.parametrize("send, status, message", [
    (dict(json={"text": "a dog"}), 415, "send the request as a form (multipart/form-data), not "
                                        "application/json"),
    (dict(data=_wav(1.0), headers={"content-type": "audio/wav"}), 415,
     "send the request as a form (multipart/form-data), not audio/wav"),
    (dict(), 415, "send the request as a form (multipart/form-data), not a body without a "
                  "content type"),
    (dict(params={"text": "a dog"}, data={"generate": "true"}), 400,
     "parameters go in the form, not in the URL's query string"),
])
def test_what_is_not_a_form_is_refused_not_read_as_an_empty_one(server, send, status, message):
    url, work, _ = server
    answer = requests.post(f"{url}/v1/separate", timeout=300, **send)
    assert (answer.status_code, answer.json()["error"]) == (status, message)


def test_an_upload_cut_short_is_refused(server):
    """Without its closing boundary the parser would drop the unfinished mix and generate."""
    url, work, _ = server
    prepared = requests.Request("POST", f"{url}/v1/separate", data={"text": "x", "steps": "1"},
                                files={"mix": ("m.wav", _wav(1.0), "audio/wav")}).prepare()
    answer = requests.post(prepared.url, data=prepared.body[:-200], timeout=300,
                           headers={"content-type": prepared.headers["Content-Type"]})
    assert answer.status_code == 400
    assert answer.json()["error"].startswith("the form ends before its closing boundary")
    assert list(work.iterdir()) == []


def test_overload_answers_503(server):
    url, work, _ = server

    def one(i):
        return _post(url, files={"mix": (f"m{i}.wav", _wav(1.0, seed=i), "audio/wav")},
                     data={"text": "a tone", "seed": str(i), "steps": "1"}).status_code

    with ThreadPoolExecutor(3 * MAX_QUEUE) as pool:
        codes = list(pool.map(one, range(3 * MAX_QUEUE)))
    assert set(codes) == {200, 503} and codes.count(200) >= MAX_QUEUE
    answer = _post(url, files={"mix": ("m.wav", _wav(1.0), "audio/wav")},
                   data={"text": "x", "steps": "1"})
    assert answer.status_code == 200  # and it recovers
    assert list(work.iterdir()) == []


@pytest.mark.parametrize("case, says", [
    ("no model", "does not exist (create one with mmsep-export)"),
    ("empty model", "no manifest.json; not an mmsep model directory"),
    ("incomplete model", "missing file vocoder.onnx"),
    ("port in use", "cannot listen there (Address already in use)"),
    ("work dir is a file", "--work-dir {tmp}/afile/up lies under {tmp}/afile, which is not a "
                           "directory"),
])
def test_what_would_fail_under_ray_is_refused_before_it_starts(model_dir, tmp_path, capsys,
                                                               case, says):
    from mmsep.scale.serve_cli import main

    (tmp_path / "empty").mkdir()
    (tmp_path / "afile").write_text("mine")
    shutil.copytree(model_dir, tmp_path / "incomplete")
    (tmp_path / "incomplete" / "vocoder.onnx").unlink()
    args = {"no model": ["--model", tmp_path / "nope"],
            "empty model": ["--model", tmp_path / "empty"],
            "incomplete model": ["--model", tmp_path / "incomplete"],
            "work dir is a file": ["--model", model_dir, "--work-dir", tmp_path / "afile/up"],
            }.get(case)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        if args is None:
            args = ["--model", model_dir, "--port", taken.getsockname()[1]]
        with pytest.raises(SystemExit) as exit_:
            main([str(a) for a in args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("mmsep-serve: error: ") and len(err.splitlines()) == 1
    assert says.format(tmp=tmp_path) in err


def test_a_model_that_does_not_load_on_the_replicas_is_one_line_exit_2(model_dir, tmp_path):
    """Only a replica's hash check finds this model's flaw (its sizes are right): the command
    says what the replica said and exits 2, as for a model refused before Ray starts."""
    pytest.importorskip("ray.serve", reason="the ray extra is not installed")
    model = tmp_path / "tampered"
    shutil.copytree(model_dir, model)
    data = bytearray((model / "vocoder.onnx").read_bytes())
    data[100] ^= 1
    (model / "vocoder.onnx").write_bytes(bytes(data))
    env = {**os.environ, "RAY_memory_monitor_refresh_ms": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "mmsep.scale.serve_cli", "--model", str(model), "--port",
         str(_free_port()), "--backend", "ort-cpu", "--cpus-per-replica", "1"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert last == (f"mmsep-serve: error: {model / 'vocoder.onnx'}: SHA-256 does not match the "
                    "manifest (tampered or incomplete)")


def test_a_cluster_where_serve_already_runs_is_refused_and_left_running(local_ray, model_dir):
    """Joining a cluster whose Ray Serve another program started: its HTTP address cannot be
    changed (mmsep-serve said it listened on --port, where nothing answered), and stopping
    would shut that Serve down with everyone's applications; so it is refused, untouched."""
    from ray import serve

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Other:
        def __call__(self, request):
            return "other"

    serve.start(http_options={"host": "127.0.0.1", "port": _free_port()})
    try:
        serve.run(Other.bind(), name="other", route_prefix="/other")
        env = {**os.environ, "RAY_memory_monitor_refresh_ms": "0"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "mmsep.scale.serve_cli", "--model", str(model_dir),
             "--ray-address", local_ray.get_runtime_context().gcs_address, "--port",
             str(_free_port()), "--backend", "ort-cpu", "--cpus-per-replica", "1"],
            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            code = proc.wait(timeout=180)
        except subprocess.TimeoutExpired:  # it serves: stop it as a user would
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=180)
        err = proc.stderr.read().strip()
        assert code == 2, err[-2000:]
        assert err.splitlines()[-1] == (
            "mmsep-serve: error: Ray Serve already runs on this Ray cluster (applications: "
            "other) with its own HTTP address; mmsep-serve starts Serve on --host and --port "
            "and shuts it down when it stops: give a cluster where Serve is not running")
        assert list(serve.status().applications) == ["other"]
    finally:
        serve.shutdown()


def test_sigterm_lets_the_running_request_finish(server):
    """Last in this module: it stops the module's server."""
    url, work, proc = server
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(_post, url, {"mix": ("m.wav", _wav(2.0), "audio/wav")},
                             {"text": "a tone", "steps": "300"})
        time.sleep(1.5)  # the request is running
        proc.send_signal(signal.SIGTERM)
        assert answer.result().status_code == 200
    assert sf.info(io.BytesIO(answer.result().content)).frames == 2 * 44100
    assert proc.wait(timeout=180) == 0



@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this system")
def test_a_closed_terminal_stops_the_server_as_sigterm_does():
    """SIGHUP ends the wait like SIGTERM, so that running requests are drained (the default
    action killed the server at once)."""
    from mmsep.scale.serve_cli import _wait_for_signal

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    guarded = []  # stands in for the default action, which would end this test run
    signal.signal(signal.SIGHUP, lambda *_: guarded.append(True))
    timers = [threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGHUP)),
              threading.Timer(10, os.kill, (os.getpid(), signal.SIGINT))]  # ends it anyway
    started = time.monotonic()
    try:
        for timer in timers:
            timer.start()
        _wait_for_signal()
    finally:
        for timer in timers:
            timer.cancel()
        for signum, handler in saved.items():
            signal.signal(signum, handler)
    assert not guarded and time.monotonic() - started < 5
