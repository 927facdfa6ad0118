"""A mixture given as the video file itself is that video's own audio track: the output is put on
the same time line as when the video alone is given (its audio track's first sample), whatever
the spelling of the path."""

from __future__ import annotations

import os

import numpy as np
import pytest

from mmsep.runtime import Separator
from tests.runtime.test_timeline import write_clip


@pytest.fixture(scope="module")
def late_audio_clip(tmp_path_factory):
    """Video from 5 s, its audio track from 6 s (the file's own time)."""
    return write_clip(tmp_path_factory.mktemp("clip") / "cut.mp4", video_start=5.0,
                      audio_start=6.0)


def test_mix_naming_the_video_file_is_its_own_audio_track(model_dir, late_audio_clip, tmp_path):
    link = tmp_path / "same.mp4"
    os.symlink(late_audio_clip, link)
    request = dict(text="a tone", steps=1, seed=2)
    with Separator(model_dir, "ort-cpu") as sep:
        alone = sep.process(video=late_audio_clip, **request)
        for mix in (late_audio_clip, str(link)):
            both = sep.process(video=late_audio_clip, mix=mix, **request)
            assert both.video_start == pytest.approx(alone.video_start)
            np.testing.assert_allclose(both.audio, alone.audio, rtol=1e-5, atol=1e-6)
    assert alone.video_start == pytest.approx(6.0, abs=1100 / 44100)  # AAC priming: one frame
