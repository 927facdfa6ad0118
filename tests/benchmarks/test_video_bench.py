"""benchmarks/video.py: usage errors, and its serial stand-in for the producer thread gives the
same windows. No timing is asserted."""

import subprocess
import sys
from pathlib import Path

import numpy as np

from mmsep.runtime.example import pattern_frame
from mmsep.runtime.video import VideoSource, WindowFrames
from tests.runtime.test_video import geometry

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "video.py"


def test_no_clip_is_a_usage_error(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "give --video, --synthetic, --example or --long" in proc.stderr


def test_serial_windows_match_and_count_all_time_as_waited():
    sys.path.insert(0, str(ROOT))
    from benchmarks.video import SerialWindows

    frames = np.stack([pattern_frame(i, 60, 80) for i in range(60)])
    starts = [0.0, 0.5]
    plain = WindowFrames(VideoSource.from_array(frames, 25), starts, geometry())
    serial = SerialWindows(WindowFrames(VideoSource.from_array(frames, 25), starts, geometry()))
    for _ in starts:
        for x, y in zip(plain.next_window(), serial.next_window()):
            np.testing.assert_array_equal(x, y)
    assert serial.work_s == serial.wait_s > 0
    serial.close()
    plain.close()


def test_a_short_run_reports_the_device_path(tiny_model_dir, tmp_path):
    """One small clip end to end: the host side of the device path uploads yuv420p planes, and
    the device path's model inputs (the graph on ORT CPU here) are PIL's, to the grey level."""
    import json

    out = tmp_path / "video.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model", str(tiny_model_dir),
                           "--example", "2", "--runs", "1", "--steps", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    (clip,) = json.loads(out.read_text())["clips"]
    assert clip["device_path_host"]["upload"] == "yuv420p planes"
    for model_input in ("clip", "sync"):
        assert clip["device_path_fidelity"][model_input] == {"max_abs": 0.0, "mean": 0.0}
    assert clip["yuv_calibration_s"] > 0 and clip["per_frame_cpu"]["graph_ort_cpu_s"] > 0
    before, after = clip["end_to_end"]["before"], clip["end_to_end"]["after"]
    assert before["decode_hidden"] == 0 < before["decode"]  # serial: the producer thread is off
    assert after["decode"] > 0 and after["wall"] > 0
