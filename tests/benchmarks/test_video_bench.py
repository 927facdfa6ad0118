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
