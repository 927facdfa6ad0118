"""Video preprocessing: decode alone, today's preprocessing, the device-resize path, and end to
end with decoding serial (before) and overlapped with the model (after), per clip; JSON out.

    python benchmarks/video.py --model models/tiny --synthetic 10 --example 10 --json video.json
    python benchmarks/video.py --model models/tiny --backend ort-cuda --video clip.mp4 --json g.json
    python benchmarks/video.py --model models/tiny --long 3600 --json rss.json   # peak RSS only

Clips: ``--video`` files, ``--synthetic S`` (an S-second 1280x720 30 fps H.264 + AAC clip made
here) and ``--example S`` (``mmsep.runtime.example``'s clip); generated clips live in a temporary
directory. ``--long S`` instead generates an S-second 720p video (a few distinct frames repeated,
low bitrate, so that an hour encodes quickly), runs one generation request over it with the
output discarded, and reports the process's peak RSS. BENCHMARKS.md explains the fields.
"""

from __future__ import annotations

import json
import multiprocessing
import resource
import statistics
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path
from unittest import mock

import click
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(ROOT))

from benchmarks.json_out import json_option, write_json  # noqa: E402
from benchmarks import machine  # noqa: E402
from mmsep.closing import Closing  # noqa: E402
from mmsep.runtime import many as pipeline  # noqa: E402
from mmsep.runtime.requests import TIMING_KEYS  # noqa: E402
from mmsep.runtime.errors import InputError  # noqa: E402
from mmsep.runtime.separator import Separator  # noqa: E402
from mmsep.runtime.backends import BACKENDS  # noqa: E402
from mmsep.runtime.example import make_video, pattern_frame  # noqa: E402
from mmsep.runtime.pixels import YuvFrames, yuv_frame  # noqa: E402
from mmsep.runtime.resize import FrameResizer  # noqa: E402
from mmsep.runtime.video import VideoSource, WindowFrames  # noqa: E402
from mmsep.runtime.windows import WindowPlan  # noqa: E402

SCHEMA = "mmsep-video-benchmark/1"
HD = (720, 1280)  # (height, width)


class SerialWindows(Closing):
    """``PrefetchedWindows`` without the thread: each window is made when asked for (the
    behaviour before overlapping), with the same timing attributes."""

    def __init__(self, frames: WindowFrames):
        self._frames = frames
        self.work_s = self.wait_s = 0.0

    def next_window(self):
        started = time.perf_counter()
        try:
            return self._frames.next_window()
        finally:
            spent = time.perf_counter() - started
            self.work_s += spent
            self.wait_s += spent

    def close(self) -> None:
        self._frames.close()


class _UploadTaker:
    """What ``WindowFrames`` asks of a device resizer besides ``run``, as ONNX Runtime CUDA's
    ``FrameResizer`` answers: it takes yuv420p planes and every resolution, and its outputs
    need no lane of their own."""

    takes_yuv = True

    @staticmethod
    def accepts(height: int, width: int) -> bool:
        return True

    open_lane = staticmethod(FrameResizer.open_lane)
    close_lane = staticmethod(FrameResizer.close_lane)


class _Recorder(_UploadTaker):
    """A stand-in resizer that returns nothing, so that the host side of the device path
    (decode, the yuv420p planes or RGB, gathering the distinct frames) is timed alone. It notes
    the kind of each upload; ``first_upload`` keeps a copy of one."""

    def __init__(self):
        self.kinds = set()

    def run(self, frames, clip_index, sync_index, lane=0):
        self.kinds.add("yuv420p planes" if isinstance(frames, YuvFrames) else "rgb")
        return None, None


def yuv_calibration(path: Path) -> float:
    """Seconds to measure swscale's conversion for the clip's first frame (``pixels``): paid
    once per process, colour tags and frame size, so it is reported apart."""
    started = time.perf_counter()
    for _, frame in VideoSource(path).frames():
        yuv_frame(frame)
        break
    return round(time.perf_counter() - started, 4)


def first_upload(path: Path, starts, geometry, takes_yuv: bool = True) -> tuple:
    """(frames, clip_index, sync_index) of the first window's upload to a resizer that takes
    yuv420p planes or not, copied (the runtime reuses its upload buffers)."""
    kept = []

    class Keeper(_UploadTaker):
        def run(self, frames, clip_index, sync_index, lane=0):
            kept.append((each_plane(frames, np.copy), clip_index, sync_index))
            return None, None

    keeper = Keeper()
    keeper.takes_yuv = takes_yuv
    with WindowFrames(VideoSource(path), starts[:1], geometry, resizer=keeper) as frames:
        frames.next_window()
    return kept[0]


def decode_only(path: Path) -> dict:
    import av

    started, cpu = time.perf_counter(), time.process_time()
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frames = sum(1 for _ in container.decode(stream))
    return {"seconds": time.perf_counter() - started, "cpu_s": time.process_time() - cpu,
            "frames": frames}


def preprocess(path: Path, starts, geometry, resizer=None) -> dict:
    """Wall and CPU (all threads) seconds to produce every window's inputs, one after the
    other."""
    started, cpu = time.perf_counter(), time.process_time()
    frames = WindowFrames(VideoSource(path), starts, geometry, resizer=resizer)
    try:
        for _ in starts:
            frames.next_window()
    finally:
        frames.close()
    return {"seconds": time.perf_counter() - started, "cpu_s": time.process_time() - cpu}


def device_times(resizer, window, repeats: int = 5) -> dict:
    """Per window: ``run_s`` (upload + resize, synchronous) and ``device_s`` (the graph alone,
    its inputs already on the device), medians after a warm-up."""
    frames, clip_index, sync_index = window
    resizer.run(frames, clip_index, sync_index)  # builds the session
    run_s = []
    for _ in range(repeats):
        started = time.perf_counter()
        resizer.run(frames, clip_index, sync_index)
        run_s.append(time.perf_counter() - started)
    row = {"frames_uploaded": int(frames.shape[0]), "run_s": statistics.median(run_s)}
    if not isinstance(resizer, FrameResizer):  # TensorRT's: upload and resize are one call
        return row
    ort = resizer._ort
    session = resizer._session(frames)
    binding = session.io_binding()
    for name, value in resizer.graph_inputs(frames, clip_index, sync_index).items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(
            value, resizer.device, resizer.device_id))
    for name in ("clip", "segments"):
        binding.bind_output(name, resizer.device, resizer.device_id)
    device_s = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        device_s.append(time.perf_counter() - started)
    return {**row, "device_s": statistics.median(device_s[1:])}


def fidelity(resizer, to_host, path: Path, start: float, geometry) -> dict:
    """The device path's model inputs for the window at ``start`` against the host path's (PIL),
    in grey levels: the largest difference and the mean (a shift) per model input."""
    row = {}
    with WindowFrames(VideoSource(path), [start], geometry) as host, \
            WindowFrames(VideoSource(path), [start], geometry, resizer=resizer) as device:
        pairs = zip(host.next_window(), device.next_window())
        for name, span, (want, got) in zip(("clip", "sync"), (1.0, 2.0), pairs):
            diff = (to_host(got).astype(np.float64) - want) * (255 / span)
            row[name] = {"max_abs": float(np.abs(diff).max()), "mean": float(diff.mean())}
    return row


def each_plane(frames, change):
    """``change`` applied to an upload: a uint8 RGB array, or each plane of ``YuvFrames``."""
    if isinstance(frames, YuvFrames):
        return YuvFrames(*(change(plane) for plane in frames[:3]), frames.conversion)
    return change(frames)


def first_frames(frames, count: int):
    """The first ``count`` frames of an upload (uint8 RGB array or ``YuvFrames``)."""
    return each_plane(frames, lambda planes: planes[:count])


def per_frame_cpu(resizer, frames, geometry) -> dict:
    """Seconds per frame (both model inputs) of PIL and of the resize graph on ORT CPU (from
    the upload's pixels: yuv420p planes or RGB)."""
    from mmsep.runtime.video import clip_image, sync_image

    count = frames.shape[0]
    index = np.arange(count)
    resizer.run(first_frames(frames, 1), index[:1], index[None, :1])  # builds the session
    started = time.perf_counter()
    resizer.run(frames, index, index[None])
    graph_s = (time.perf_counter() - started) / count
    if isinstance(frames, YuvFrames):
        frames = frames.rgb()
    started = time.perf_counter()
    for frame in frames:
        clip_image(frame, geometry.clip_image_size)
        sync_image(frame, geometry.sync_image_size)
    pil_s = (time.perf_counter() - started) / count
    return {"frame": list(frames.shape[1:3]), "pil_s": round(pil_s, 4),
            "graph_ort_cpu_s": round(graph_s, 4)}


def end_to_end(sep, path: Path, steps: int, runs: int) -> dict:
    """Median of ``runs`` requests each with decoding serial (before) and overlapped (after),
    alternated within the same run, each mode first in turn."""
    results = {"before": [], "after": []}
    for r in range(runs):
        for kind in (("before", "after") if r % 2 == 0 else ("after", "before")):
            if kind == "before":
                with mock.patch.object(pipeline, "PrefetchedWindows", SerialWindows):
                    timings = sep.process(video=path, steps=steps).timings
            else:
                timings = sep.process(video=path, steps=steps).timings
            stages = sum(timings[k] for k in TIMING_KEYS)
            results[kind].append({**timings, "stages_sum": stages})
    out = {}
    for kind, rows in results.items():
        keys = rows[0].keys()
        out[kind] = {k: round(statistics.median(r[k] for r in rows), 4) for k in keys}
    return out


def preprocessing_passes(path: Path, starts, geometry, runs: int) -> dict:
    """``decode_only``, ``preprocess_pil`` and ``device_path_host``, alternated over ``runs``
    passes: the median of each field. ``first_pass_s`` is the device path's first pass, which
    also allocates the decoder's and the upload's buffers."""
    passes = {"decode_only": [], "preprocess_pil": [], "device_path_host": []}
    recorder = _Recorder()
    for _ in range(runs):
        passes["decode_only"].append(decode_only(path))
        passes["preprocess_pil"].append(preprocess(path, starts, geometry))
        passes["device_path_host"].append(preprocess(path, starts, geometry, recorder))
    row = {name: {key: statistics.median(p[key] for p in results) for key in results[0]}
           for name, results in passes.items()}
    row["device_path_host"]["first_pass_s"] = passes["device_path_host"][0]["seconds"]
    row["device_path_host"]["upload"] = " + ".join(sorted(recorder.kinds))
    return row


def measure_clip(sep, name: str, path: Path, steps: int, runs: int) -> dict:
    info, geometry = sep.info, sep.info.geometry
    source = VideoSource(path)
    plan = WindowPlan(round(source.duration * info.sample_rate), info.window_samples,
                      round(sep.overlap * info.sample_rate), info.sample_rate)
    starts = plan.start_seconds
    row = {"clip": name, "duration_s": round(source.duration, 3), "windows": len(starts),
           "yuv_calibration_s": yuv_calibration(path),  # once per process and colour tags
           **preprocessing_passes(path, starts, geometry, runs)}
    resizer = sep._resizer or _cpu_resizer(sep)
    window = first_upload(path, starts, geometry, resizer.takes_yuv)
    to_host = sep.backend.to_host if sep._resizer else (lambda value: value.numpy())
    row["device_path_fidelity"] = fidelity(resizer, to_host, path, starts[0], geometry)
    if sep._resizer is not None:
        row["per_window"] = device_times(sep._resizer, window)
    else:  # the per-backend choice: the graph on ORT CPU against PIL, per frame
        row["per_frame_cpu"] = per_frame_cpu(resizer, first_frames(window[0], 8), geometry)
    for key in ("seconds", "cpu_s"):  # CPU time: a fairer ratio on a shared machine
        decode_s = row["decode_only"][key]
        row[f"pil_over_decode_{key}"] = round(row["preprocess_pil"][key] / decode_s, 2)
        row[f"device_path_host_over_decode_{key}"] = round(row["device_path_host"][key]
                                                           / decode_s, 2)
    row["end_to_end"] = end_to_end(sep, path, steps, runs)
    return row


def _cpu_resizer(sep):
    import onnxruntime

    return FrameResizer(onnxruntime, "cpu", 0, sep.info.clip_image_size, sep.info.sync_image_size)


def long_video(path: Path, seconds: float, fps: int = 25) -> Path:
    """An H.264 720p video of ``seconds``: 8 distinct frames cycled, 1 s GOPs, low bitrate."""
    import av

    frames = [av.VideoFrame.from_ndarray(pattern_frame(i * 9, *HD), format="rgb24")
              for i in range(8)]
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.height, stream.width = HD
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "ultrafast", "g": str(fps), "crf": "40"}
        for i in range(int(seconds * fps)):
            frame = frames[(i // fps) % len(frames)]  # a new picture every second
            frame.pts, frame.time_base = i, Fraction(1, fps)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def peak_rss(sep, path: Path, steps: int) -> dict:
    started = time.perf_counter()
    result = sep.process(video=path, generate=True, steps=steps, sink=lambda k, samples: None)
    return {"windows": result.windows, "seconds": round(time.perf_counter() - started, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "timings_s": {k: round(v, 3) for k, v in result.timings.items()}}


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False,
                                                      path_type=Path), required=True,
              help="Model directory (mmsep-export's output).")
@click.option("--backend", type=click.Choice(BACKENDS), default="ort-cpu", show_default=True,
              help="Runtime backend; ort-cuda and trt resize frames on the GPU.")
@click.option("--video", "videos", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              multiple=True, help="A clip to measure (repeatable).")
@click.option("--synthetic", type=click.FloatRange(1, 600), help="Seconds of generated 720p.")
@click.option("--example", type=click.FloatRange(1, 600), help="Seconds of the example clip.")
@click.option("--long", "long_s", type=click.FloatRange(10, 36000),
              help="Only the peak-RSS check over a generated 720p video of this length.")
@click.option("--serial", is_flag=True, help="With --long: decode serially (as before the "
              "overlap), for comparison.")
@click.option("--steps", type=click.IntRange(1, 100), default=4, show_default=True,
              help="Euler steps of the end-to-end requests.")
@click.option("--runs", type=click.IntRange(1, 20), default=3, show_default=True,
              help="Passes of each preprocessing measure and requests per end-to-end mode.")
@json_option("Also write the figures to this JSON file.")
def main(model_dir, backend, videos, synthetic, example, long_s, serial, steps, runs,
         json_path):
    """Measure video preprocessing and its overlap with the model."""
    if not (videos or synthetic or example or long_s):
        raise click.UsageError("give --video, --synthetic, --example or --long")
    report = {"schema": SCHEMA, "machine": machine.machine_info(), "versions": machine.versions(),
              "model": str(model_dir), "steps": steps, "runs": runs}
    try:
        sep = Separator(model_dir, backend=backend)
    except InputError as exc:  # a missing model, a backend this machine cannot run
        raise click.UsageError(str(exc)) from None
    with tempfile.TemporaryDirectory() as tmp, sep:
        report["backend"] = sep.backend_name
        if long_s:
            path = Path(tmp) / "long.mp4"
            # encoded in a child process: x264's buffers must not count in this one's peak RSS
            child = multiprocessing.get_context("spawn").Process(target=long_video,
                                                                 args=(path, long_s))
            child.start()
            child.join()
            if child.exitcode != 0:
                raise click.ClickException(f"generating the {long_s:g} s video failed")
            with mock.patch.object(pipeline, "PrefetchedWindows",
                                   SerialWindows if serial else pipeline.PrefetchedWindows):
                report["long"] = {"video_seconds": long_s, "serial": serial,
                                  **peak_rss(sep, path, steps)}
        else:
            clips = [(p.name, p) for p in videos]
            if synthetic:
                clips.append(("synthetic-720p", make_video(Path(tmp) / "hd.mp4", synthetic,
                                                           fps=30, size=HD)))
            if example:
                clips.append(("example", make_video(Path(tmp) / "example.mp4", example,
                                                    fps=25, size=(192, 256))))
            report["clips"] = [measure_clip(sep, name, path, steps, runs)
                               for name, path in clips]
    text = json.dumps(report, indent=2)
    if json_path is not None:
        write_json(json_path, report)
    click.echo(text)


if __name__ == "__main__":
    main()
