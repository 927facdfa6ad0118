"""Window plan and equal-power crossfade join against a float64 overlap-add written out here."""

import math

import numpy as np
import pytest

from mmsep.runtime.windows import CrossfadeJoiner, WindowPlan, fades, join


def test_counts_and_starts():
    plan = WindowPlan(length=1000, window=300, overlap=50, sample_rate=100)
    assert plan.hop == 250
    # windows until one reaches the end: 0..300, 250..550, 500..800, 750..1050
    assert plan.count == 4 and plan.starts == [0, 250, 500, 750]
    assert plan.start_seconds == [0.0, 2.5, 5.0, 7.5]
    assert plan.starts[-1] + plan.window >= plan.length > plan.starts[-2] + plan.window
    assert WindowPlan(300, 300, 50, 100).count == 1
    assert WindowPlan(10, 300, 50, 100).count == 1
    assert WindowPlan(301, 300, 50, 100).count == 2
    assert WindowPlan(551, 300, 50, 100).count == 3


def test_cut_pads_the_last_window():
    plan = WindowPlan(length=750, window=300, overlap=100, sample_rate=100)
    audio = np.arange(1, 751, dtype=np.float32)
    assert plan.count == 4
    np.testing.assert_array_equal(plan.cut(audio, 1), audio[200:500])
    last = plan.cut(audio, 3)
    assert last.shape == (300,)
    np.testing.assert_array_equal(last[:150], audio[600:])
    assert not last[150:].any()


@pytest.mark.parametrize("overlap", [0, 1, 50, 150])
def test_overlap_bounds_and_fades(overlap):
    fade_in, fade_out = fades(overlap)
    np.testing.assert_allclose(fade_in ** 2 + fade_out ** 2, 1.0, atol=1e-6)
    if overlap > 1:
        assert np.all(np.diff(fade_in) > 0) and np.all(np.diff(fade_out) < 0)
        np.testing.assert_allclose(fade_in, fade_out[::-1], atol=1e-7)


def test_overlap_out_of_range():
    with pytest.raises(ValueError, match="overlap"):
        WindowPlan(1000, 300, 151, 100)
    with pytest.raises(ValueError, match="overlap"):
        WindowPlan(1000, 300, -1, 100)


def _reference_join(windows, length, window, overlap):
    """Per-sample float64 overlap-add: weight cos/sin of the position inside each overlap."""
    hop = window - overlap
    out = np.zeros(length)
    for w, win in enumerate(windows):
        for i in range(window):
            n = w * hop + i
            if n >= length:
                break
            gain = 1.0
            if w > 0 and i < overlap:  # fading in
                gain = math.sin((i + 0.5) * math.pi / 2 / overlap)
            if w < len(windows) - 1 and i >= window - overlap:  # fading out
                gain = math.cos((i - (window - overlap) + 0.5) * math.pi / 2 / overlap)
            out[n] += gain * win[i]
    return out


@pytest.mark.parametrize("length,window,overlap", [(1000, 300, 50), (300, 300, 40),
                                                   (123, 300, 40), (1001, 200, 0),
                                                   (905, 200, 100)])
def test_join_matches_reference(length, window, overlap):
    plan = WindowPlan(length, window, overlap, 100)
    rng = np.random.default_rng(0)
    windows = rng.standard_normal((plan.count, window)).astype(np.float32)
    out = join(plan, windows)
    assert out.shape == (length,) and out.dtype == np.float32
    np.testing.assert_allclose(out, _reference_join(windows, length, window, overlap),
                               atol=1e-5)


def test_join_reconstructs_a_signal_cut_into_windows_in_power():
    """Equal-power: uncorrelated windows keep their power through the overlaps."""
    plan = WindowPlan(20000, 4000, 2000, 100)
    rng = np.random.default_rng(1)
    windows = rng.standard_normal((plan.count, plan.window)).astype(np.float32)
    out = join(plan, windows)
    overlap_region = out[2000:4000]
    assert abs(np.mean(overlap_region ** 2) - 1.0) < 0.1


def test_streaming_push_returns_finalised_pieces():
    plan = WindowPlan(1000, 300, 50, 100)
    windows = np.random.default_rng(2).standard_normal((plan.count, 300)).astype(np.float32)
    joiner = CrossfadeJoiner(plan)
    sizes = []
    pieces = []
    for win in windows:
        pieces.append(joiner.push(win))
        sizes.append(pieces[-1].size)
    assert joiner.done
    assert sizes == [250, 250, 250, 250]
    np.testing.assert_array_equal(np.concatenate(pieces), join(plan, windows))
    with pytest.raises(ValueError, match="all windows"):
        joiner.push(windows[0])
