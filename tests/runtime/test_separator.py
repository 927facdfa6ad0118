"""Separator end to end on the tiny model (ORT CPU), and against the PyTorch reference sampler."""

import warnings

import numpy as np
import pytest

from mmsep.runtime import Separator
from mmsep.runtime.errors import BackendError, InputError
from mmsep.runtime.example import tones
from tests.helpers import TINY_SEED as SEED
from tests.helpers import rel_l2
from tests.runtime.media import decode_rgb, window_video_features

SR = 44100
STEPS = 2


def check_audio(audio, length, stems=None):
    assert audio.dtype == np.float32
    assert audio.shape == ((length,) if stems is None else (stems, length))
    assert np.isfinite(audio).all() and np.abs(audio).max() > 0


def test_video_only_uses_the_audio_track(separator, media):
    result = separator.process(video=media["av"], steps=STEPS)
    mixture_len = result.audio.shape[-1]
    assert abs(mixture_len / SR - 3.5) < 0.1  # the AAC track's length
    assert result.mode == "separation" and result.windows == 3
    check_audio(result.audio[0], mixture_len)
    assert set(result.timings) >= {"decode", "features", "conditioning", "sampling",
                                   "vae_decode", "vocode"}


def test_text_only_and_video_plus_text(separator, media):
    mix = tones(1.7, SR)
    check_audio(separator.separate(mix=mix, text="a dog barking", steps=STEPS), mix.size)
    both = separator.separate(mix=mix, video=media["pcm"], text="a dog barking", steps=STEPS)
    check_audio(both, mix.size)


def test_multi_text_one_batch_and_seeds(separator):
    mix = tones(1.0, SR)  # shorter than a window: padded, output trimmed
    result = separator.process(mix=mix, text=["a dog", "rain on a roof"], steps=STEPS, seed=5)
    assert result.items == 2 and result.batches == 1 and result.windows == 1
    check_audio(result.audio, mix.size, stems=2)
    assert not np.allclose(result.audio[0], result.audio[1])
    again = separator.separate(mix=mix, text=["a dog", "rain on a roof"], steps=STEPS, seed=5)
    np.testing.assert_array_equal(again, result.audio)
    other = separator.separate(mix=mix, text="a dog", steps=STEPS, seed=6)
    assert not np.allclose(other, result.audio[0])


def test_generation_modes(separator, media):
    text_only = separator.process(text="birds singing", steps=STEPS)
    assert text_only.mode == "generation"
    check_audio(text_only.audio[0], separator.info.window_samples)
    timed = separator.process(text="birds singing", steps=STEPS, duration=0.5)
    check_audio(timed.audio[0], round(0.5 * SR))
    for_video = separator.process(video=media["silent_video"], generate=True, steps=STEPS)
    assert for_video.mode == "generation"
    frames, _ = decode_rgb(media["silent_video"])  # 25 fps: the video lasts len(frames) / 25 s
    check_audio(for_video.audio[0], round(len(frames) / 25 * SR))


def test_long_input_streams_windows_in_batches(separator):
    mix = tones(5.0, SR)  # 2 s windows, 1 s overlap: 4 windows
    seen = []
    sep = Separator(separator.model.path, "ort-cpu", max_batch=3)
    result = sep.process(mix=mix, steps=1, progress=lambda done, total: seen.append((done, total)))
    assert result.windows == 4 and result.batches == 2
    assert seen == [(1, 2), (2, 2)]
    check_audio(result.audio[0], mix.size)


def test_text_features_are_cached(separator):
    a = separator.text_features("a cached query")
    assert separator.text_features("a cached query") is a
    assert separator.text_features(None) is separator.model.empty_features()["text_features"]


def test_unconditional_branch_is_computed_once_per_load(model_dir):
    sep = Separator(model_dir, "ort-cpu")
    batches = []
    run = sep.backend.run

    def counting(stage, inputs, **kw):
        if stage == "conditioner":
            batches.append(inputs["text_features"].shape[0])
        return run(stage, inputs, **kw)

    sep.backend.run = counting
    sep.process(text=["rain", "wind"], duration=1.0, steps=1)
    sep.process(text="rain", duration=1.0, steps=1)
    assert batches == [2, 1]  # the conditional branch only; the empty branch came from the load
    sep.process(text="rain", negative_text="speech", duration=1.0, steps=1)
    sep.process(text="rain", negative_text="speech", duration=1.0, steps=1)
    assert batches == [2, 1, 1, 1, 1]  # a negative text adds one batch-1 run, then is cached


@pytest.mark.parametrize("kwargs,message", [
    (dict(text=""), "text is empty"),
    (dict(text=[]), "list of texts is empty"),
    (dict(text=["ok", "  "]), "text is empty"),
    (dict(negative_text=""), "negative text is empty"),
    (dict(steps=0), "steps must be an integer between 1 and 1000"),
    (dict(cfg=float("nan")), "cfg must be a number"),
    (dict(seed=-1), "seed must be a non-negative integer"),
    (dict(duration=0.01), "duration must be a number of seconds from 0.1 to 36000, got 0.01"),
    (dict(duration=1e9), "duration must be a number of seconds from 0.1 to 36000"),
    (dict(duration=True), "duration must be a number of seconds"),
    (dict(text=5), "text must be a string or a list of strings, got int"),
    (dict(mix=np.zeros(SR, np.float32)), "mixture array: mixture is silent"),
    (dict(mix=tones(0.05, SR)), "minimum is 0.1 s"),
    (dict(mix=np.full(SR, np.nan, np.float32)), "NaN or infinite"),
    (dict(mix=tones(1.0, SR), generate=True), "mixture was given together with generate"),
    (dict(mix=tones(1.0, SR), duration=1.0), "duration sets the length of generated audio"),
    (dict(video=np.zeros((4, 8, 8, 3), np.uint8)), "positive, finite frame rate"),
    (dict(video=np.zeros((4, 8, 8, 3), np.uint8), video_fps="25"), "positive, finite frame"),
    (dict(video=np.zeros((4, 8, 8, 3), np.uint8), video_fps=float("inf")), "finite frame rate"),
    (dict(video=np.zeros((4, 90, 8, 3), np.uint8), video_fps=25),
     "frames of 8x90 are more elongated than 8:1"),
    (dict(mix=tones(1.0, SR), video=np.zeros((4, 0, 8, 3), np.uint8), video_fps=4),
     r"H and W positive, got uint8 \(4, 0, 8, 3\)"),
    (dict(mix=np.stack([tones(1.0, SR)] * 2)), r"audio of shape \(2, 44100\) has more channels "
                                                 r"than samples; give \(samples, channels\)"),
    (dict(mix=np.zeros((SR, 0), np.float32)), r"audio of shape \(44100, 0\) has no channels"),
    (dict(video=np.zeros((10, 8, 8, 3), np.uint8), video_fps=1e-4, generate=True),
     "video is 100000.000 s long; generated audio takes 0.1 to 36000 s; choose its length "
     r"\(duration, --duration\)"),
    (dict(generate="no"), "generate must be True or False, got 'no'"),
    (dict(mix=tones(1.0, SR), video_fps=25), "video_fps is the frame rate of a video given as "
                                             "a frame array"),
])
def test_bad_requests(separator, kwargs, message):
    with pytest.raises(InputError, match=message):
        separator.process(**kwargs)


def test_video_without_audio_needs_a_mixture(separator, media):
    with pytest.raises(InputError, match="silent.mp4: no mixture given and the video has no audio"):
        separator.process(video=media["silent_video"])


def test_bad_options(model_dir):
    with pytest.raises(InputError, match=r"overlap must be between 0 and 1 s"):
        Separator(model_dir, "ort-cpu", overlap=1.5)
    for kwargs, message in ((dict(max_batch=0), "max_batch must be a positive integer, got 0"),
                            (dict(max_batch=True), "max_batch must be a positive integer"),
                            (dict(max_batch=2.0), "max_batch must be a positive integer"),
                            (dict(verify="no"), "verify must be True or False, got 'no'"),
                            (dict(overlap="1"), "overlap must be a number of seconds"),
                            (dict(threads="4"), "threads must be a non-negative integer"),
                            (dict(precision="bf17"), "precision must be one of auto, fp16")):
        with pytest.raises(InputError, match=message):
            Separator(model_dir, "ort-cpu", **kwargs)
    with pytest.raises(InputError, match="model_dir must be a path, got int"):
        Separator(5)


def test_a_text_longer_than_clip_reads_is_warned_about_once(separator):
    long = " ".join(["rain"] * 80)  # 80 tokens and start and end: 82
    with pytest.warns(UserWarning, match=r"text 'rain rain .*\.\.\.' takes 82 CLIP tokens; the "
                                         r"model reads 77 \(start, the first 75, end\)"):
        separator.text_features(long)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        separator.text_features(long)  # cached: said once
        separator.text_features(" ".join(["rain"] * 75))  # 77 exactly: nothing cut


def test_numpy_scalars_are_numbers(separator):
    result = separator.process(duration=np.float32(1.0), cfg=np.int64(3), steps=np.int64(1),
                               seed=np.uint8(2))
    assert result.audio.shape == (1, SR)


def test_callbacks_and_request_lists_are_checked_before_any_work(separator):
    with pytest.raises(TypeError, match="sink must be callable, got int"):
        separator.process(duration=1.0, steps=1, sink=5)
    with pytest.raises(TypeError, match="progress must be callable, got int"):
        separator.process(duration=1.0, steps=1, progress=5)
    for requests in ({"duration": 1.0}, None):
        with pytest.raises(TypeError, match="requests must be a list of dicts"):
            separator.process_many(requests)
    refused, done = separator.process_many(["duration=1", dict(duration=1.0, steps=1)])
    assert isinstance(refused, TypeError) and str(refused) == (
        "a request must be a dict of process() options, got str")
    assert done.audio.shape == (1, SR)


def test_a_closed_separator_refuses_work_and_loads_nothing_again(model_dir):
    sep = Separator(model_dir, "ort-cpu")
    sep.close()
    with pytest.raises(RuntimeError, match="this Separator is closed"):
        sep.process(duration=1.0, steps=1)
    with pytest.raises(RuntimeError, match="this Separator is closed"):
        sep.process_many([{"duration": 1.0}])
    with pytest.raises(BackendError, match="the backend is closed"):
        sep.backend.run("vocoder", {})  # a request that was running when close() came
    assert sep.backend._sessions == {}


# -- against the PyTorch reference ------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(model_dir):
    torch = pytest.importorskip("torch")
    import json

    from mmsep.export.manifest import sha256_state
    from mmsep.export.wrappers import stage_modules
    from mmsep.models import build_components

    manifest = json.loads((model_dir / "manifest.json").read_text())
    comps = build_components("tiny", duration=manifest["model"]["window_seconds"], seed=SEED)
    modules = stage_modules(comps)  # the default convention: posterior-sample
    # the reference networks are the exported ones
    for name in ("denoiser", "mix_encoder"):
        assert sha256_state(modules[name]) == manifest["stages"][name]["weights_sha256"]
    torch.set_grad_enabled(False)
    yield comps, modules["mix_encoder"].eval()
    torch.set_grad_enabled(True)


def _windows(length, window, overlap):
    hop = window - overlap
    count = 1 if length <= window else 1 + -(-(length - window) // hop)
    return [w * hop for w in range(count)]


def _reference_latents(reference, *, mix, texts, seed, steps, cfg, video=None, generation=False,
                       negative_text=None):
    import torch

    from mmsep.models.sampler import initial_noise, sample
    from mmsep.runtime import tokenize

    comps, mix_encoder = reference
    config = comps.flow.config
    window = config.lengths.audio_samples
    starts = _windows(mix.size if mix is not None else window, window, SR)  # 1 s overlap
    items = [(w, k) for w in range(len(starts)) for k in range(len(texts))]  # window-major
    noise = initial_noise(len(items), config, seed, windows=len(starts), generation=generation)
    text_f = comps.clip.encode_text(torch.from_numpy(tokenize(texts)))
    conditions = {"text_f": torch.stack([text_f[k] for _, k in items])}
    if generation:
        waves = noise.noise_audio
    else:
        waves = torch.from_numpy(np.stack([np.pad(mix[s:s + window],
                                                  (0, max(0, s + window - mix.size)))
                                           for s in starts]))
    latents = mix_encoder(waves, noise.posterior_noise)
    x_mix = torch.stack([latents[w] for w, _ in items])
    if video is not None:
        clip_f, sync_f = window_video_features(comps, video, [s / SR for s in starts])
        conditions["clip_f"] = torch.stack([clip_f[w] for w, _ in items])
        conditions["sync_f"] = torch.stack([sync_f[w] for w, _ in items])
    negative = (None if negative_text is None else
                comps.clip.encode_text(torch.from_numpy(tokenize([negative_text]))))
    return sample(comps.flow, noise.x0, conditions, x_mix=x_mix, steps=steps, cfg=cfg,
                  negative_text_f=negative).numpy()


def test_matches_reference_text_multi_window(model_dir, reference):
    """3 windows x 2 texts = 6 items in batches of 4 (window 1's items straddle two batches)."""
    mix = tones(3.5, SR, seed=3)
    sep = Separator(model_dir, "ort-cpu", max_batch=4)
    texts = ["a dog barking", "rain"]
    result = sep.process(mix=mix, text=texts, steps=3, cfg=4.5, seed=7, keep_latents=True)
    assert result.items == 6 and result.batches == 2
    want = _reference_latents(reference, mix=mix, texts=texts, seed=7, steps=3, cfg=4.5)
    err = rel_l2(result.latents, want)
    print(f"runtime vs PyTorch reference, final latents, text x 3 windows: rel L2 {err:.2e}")
    assert err < 1e-3


def test_matches_reference_video_and_text(model_dir, reference, media):
    mix = tones(2.6, SR, seed=4)
    sep = Separator(model_dir, "ort-cpu")
    result = sep.process(mix=mix, video=media["av"], text="engine", steps=2, cfg=3.0, seed=1,
                         negative_text="speech", keep_latents=True)
    want = _reference_latents(reference, mix=mix, texts=["engine"], seed=1, steps=2, cfg=3.0,
                              video=media["av"], negative_text="speech")
    err = rel_l2(result.latents, want)
    print(f"runtime vs PyTorch reference, final latents, video + text + negative text: "
          f"rel L2 {err:.2e}")
    assert err < 1e-3


def test_matches_reference_generation(separator, reference):
    result = separator.process(text="thunder", steps=2, cfg=4.5, seed=3, keep_latents=True)
    assert result.mode == "generation"
    want = _reference_latents(reference, mix=None, texts=["thunder"], seed=3, steps=2, cfg=4.5,
                              generation=True)
    err = rel_l2(result.latents, want)
    print(f"runtime vs PyTorch reference, final latents, generation: rel L2 {err:.2e}")
    assert err < 1e-3
