"""Reference video preprocessing: frame selection rule, shapes, ranges, resize correctness."""

from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

from mmsep.models.video_reference import (centre_crop_offsets, clip_frames, select_frames,
                                          short_side_size, sync_frames)


def _mmaudio_loop(timestamps, rate, count):
    """MMAudio's read_frames loop (targets k / rate instead of a running sum), held at the end."""
    out, k = [], 0
    for i, t in enumerate(timestamps):
        while k < count and t >= k / rate - 1e-6:
            out.append(i)
            k += 1
    return out + [len(timestamps) - 1] * (count - len(out))


def _first_reaching(times, rate, count):
    """Exact rational rule: first frame with time >= k / rate, else the last frame."""
    return [next((i for i, t in enumerate(times) if t >= Fraction(k) / Fraction(rate)),
                 len(times) - 1) for k in range(count)]


@pytest.mark.parametrize("src_fps,time_base", [(30, Fraction(1, 15360)), (24, Fraction(1, 12288)),
                                               (Fraction(30000, 1001), Fraction(1, 30000)),
                                               (25, Fraction(1, 25))])
@pytest.mark.parametrize("rate", [8, 25])
def test_constant_frame_rates(src_fps, time_base, rate):
    """Timestamps as a decoder gives them: float(pts * time_base), pts on the codec's grid."""
    n = int(8 * src_fps) + 1
    pts = [round(Fraction(i) / src_fps / time_base) for i in range(n)]
    exact = [p * time_base for p in pts]
    ts = np.array([float(t) for t in exact])
    count = 8 * rate
    idx = select_frames(ts, rate, count)
    assert idx.dtype == np.int64 and idx.shape == (count,)
    assert idx.tolist() == _first_reaching(exact, rate, count)
    if src_fps == rate:
        assert idx.tolist() == list(range(count))


def test_thirty_to_twenty_five_by_hand():
    ts = np.arange(31) / 30
    # k / 25 s: 0, .04, .08, .12, .16, .2 -> frames at 0, 2/30, 3/30, 4/30, 5/30, 6/30 (exact tie)
    assert select_frames(ts, 25, 6).tolist() == [0, 2, 3, 4, 5, 6]


def test_slower_source_repeats_frames():
    ts = np.arange(10) / 5.0  # 5 fps, 2 s
    idx = select_frames(ts, 8, 16)
    assert idx.tolist() == _first_reaching([Fraction(i, 5) for i in range(10)], 8, 16)
    assert idx.tolist() == [0, 1, 2, 2, 3, 4, 4, 5, 5, 6, 7, 7, 8, 9, 9, 9][:16]
    assert len(set(idx.tolist())) < len(idx)


def test_variable_frame_rate_and_decode_order():
    ts = [0.0, 0.05, 0.06, 0.2, 0.21, 0.5, 0.52]
    assert select_frames(ts, 10, 6).tolist() == [0, 3, 3, 5, 5, 5]
    # out-of-order timestamps: the first frame *in decode order* reaching each target
    assert select_frames([0.0, 0.08, 0.04, 0.12], 25, 4).tolist() == [0, 1, 1, 3]
    # frames before the window start (negative times) are never chosen
    assert select_frames([-0.04, -0.02, 0.01, 0.05], 25, 2).tolist() == [2, 3]
    gen = np.random.default_rng(0)
    for _ in range(20):
        steps = gen.uniform(0.001, 0.2, size=80)
        ts = np.concatenate([[gen.uniform(-0.05, 0.05)], steps]).cumsum()
        for rate in (8, 25):
            count = int(ts[-1] * rate) + 5
            assert select_frames(ts, rate, count).tolist() == _mmaudio_loop(ts, rate, count)


def test_short_video_holds_last_frame():
    ts = np.arange(50) / 25  # 2 s at 25 fps, asked for 8 s
    idx = select_frames(ts, 25, 200)
    assert idx[:50].tolist() == list(range(50))
    assert (idx[50:] == 49).all()
    assert select_frames([0.3], 8, 4).tolist() == [0, 0, 0, 0]


def test_window_start_offset():
    ts = np.arange(300) / 30
    idx = select_frames(ts, 25, 50, start=3.0)
    assert idx.tolist() == [90 + i for i in select_frames(np.arange(210) / 30, 25, 50)]


def test_bad_inputs():
    with pytest.raises(ValueError, match="non-empty"):
        select_frames([], 25, 3)
    with pytest.raises(ValueError, match="NaN"):
        select_frames([0.0, float("nan")], 25, 3)
    frames = np.zeros((3, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="3 frames but 2 timestamps"):
        clip_frames(frames, [0.0, 0.1], 1.0)
    with pytest.raises(ValueError, match=r"uint8 RGB of shape \(T, H, W, 3\)"):
        clip_frames(frames.astype(np.float32), [0.0, 0.1, 0.2], 1.0)
    with pytest.raises(ValueError, match="duration must be positive"):
        sync_frames(frames, [0.0, 0.1, 0.2], 0.0)


def _smooth_video(n, h, w, seed=0):
    gen = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    frames = np.empty((n, h, w, 3), np.uint8)
    for i in range(n):
        a = gen.uniform(1, 4, size=(3, 2))
        ph = gen.uniform(0, 6, size=3)
        for c in range(3):
            frames[i, :, :, c] = np.round(127.5 + 110 * np.sin(a[c, 0] * xx * 3 + a[c, 1] * yy * 2
                                                                + ph[c]))
    return frames


def _psnr(a, b):
    err = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    return 10 * np.log10(1.0 / np.mean(err ** 2))


def test_shapes_and_ranges_for_eight_seconds():
    frames = _smooth_video(4, 36, 64)[np.arange(240) % 4]  # 30 fps, 8 s
    ts = np.arange(240) / 30
    clip = clip_frames(frames, ts, 8.0)
    assert clip.shape == (64, 3, 384, 384) and clip.dtype == torch.float32
    assert 0.0 <= clip.min() and clip.max() <= 1.0
    sync = sync_frames(torch.from_numpy(frames), torch.from_numpy(ts), 8.0)
    assert sync.shape == (200, 3, 224, 224) and sync.dtype == torch.float32
    assert -1.0 <= sync.min() and sync.max() <= 1.0
    # values sit on the uint8 grid
    q_clip, q_sync = clip[::16] * 255, (sync[::25] + 1) * 127.5
    assert torch.allclose(q_clip, q_clip.round(), atol=1e-3)
    assert torch.allclose(q_sync, q_sync.round(), atol=1e-3)
    # held/repeated frames are identical, distinct source frames differ
    idx = select_frames(ts, 25, 200)
    for a, b in [(0, 1), (5, 6), (10, 13)]:
        assert torch.equal(sync[a], sync[b]) == (idx[a] % 4 == idx[b] % 4)


@pytest.mark.parametrize("h,w", [(90, 160), (161, 97), (225, 399)])
def test_matches_mmaudio_torchvision_transforms(h, w):
    """Bit-identical to MMAudio's load_video transforms (torchvision v2) on the selected frames."""
    from torchvision.transforms import v2

    clip_t = v2.Compose([v2.Resize((384, 384), interpolation=v2.InterpolationMode.BICUBIC),
                         v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
    sync_t = v2.Compose([v2.Resize(224, interpolation=v2.InterpolationMode.BICUBIC),
                         v2.CenterCrop(224), v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                         v2.Normalize(mean=[0.5] * 3, std=[0.5] * 3)])
    frames = _smooth_video(6, h, w, seed=h)
    frames[2] = np.random.default_rng(1).integers(0, 256, size=(h, w, 3), dtype=np.uint8)  # noise
    ts = np.array([0.0, 0.1, 0.3, 0.35, 0.5, 0.7])
    for fn, rate, transform in [(clip_frames, 8, clip_t), (sync_frames, 25, sync_t)]:
        ours = fn(frames, ts, 0.8)
        chunk = torch.from_numpy(frames[select_frames(ts, rate, int(0.8 * rate))])
        expected = transform(chunk.permute(0, 3, 1, 2))
        assert ours.shape == expected.shape
        assert torch.equal(ours, expected.as_subclass(torch.Tensor))


@pytest.mark.parametrize("h,w", [(480, 854), (300, 200), (120, 160)])
def test_resize_against_pil_bicubic(h, w):
    frames = _smooth_video(1, h, w, seed=w)
    image = Image.fromarray(frames[0])

    clip = clip_frames(frames, [0.0], 0.125)  # one CLIP frame
    ref = np.asarray(image.resize((384, 384), Image.BICUBIC), np.float64) / 255
    assert _psnr(clip[0].permute(1, 2, 0).numpy(), ref) > 40

    sync = sync_frames(frames, [0.0], 0.04)  # one sync frame
    rh, rw = short_side_size(h, w)
    assert min(rh, rw) == 224 and abs(rh / rw - h / w) < 0.01
    top, left = centre_crop_offsets(rh, rw)
    ref = np.asarray(image.resize((rw, rh), Image.BICUBIC), np.float64)[top:top + 224,
                                                                        left:left + 224]
    assert _psnr((sync[0].permute(1, 2, 0).numpy() + 1) / 2, ref / 255) > 40


def test_crop_geometry():
    assert short_side_size(720, 1280) == (224, 398)
    assert short_side_size(1280, 720) == (398, 224)
    assert short_side_size(224, 224) == (224, 224)
    assert centre_crop_offsets(224, 398) == (0, 87)
    assert centre_crop_offsets(224, 399) == (0, 88)  # 87.5 -> 88 (half to even)
    assert centre_crop_offsets(224, 397) == (0, 86)  # 86.5 -> 86
