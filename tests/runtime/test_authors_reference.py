"""The runtime against the authors' inference, re-stated in PyTorch from sony/mmaudiosep.

``authors_inference`` follows ``mmaudiosep/eval_utils.py`` ``separate()`` and ``generate()``: the
mixture audio (in ``generate()``: ``0.9 * randn`` audio of one window) goes through the mel
converter and the VAE encoder; its DiagonalGaussianDistribution (log-variance clamped to [-30, 20],
std = exp(logvar / 2)) gives ``x_cond = mean + std * eps``, not normalised; missing video uses the
learned empty features; the ODE is fixed-step Euler on ``linspace(0, 1, steps + 1)`` with ``cfg *
v(cond) + (1 - cfg) * v(empty)`` where both branches see ``x_cond`` (``v(cond)`` alone when ``cfg <
1``, ``ode_wrapper``); the result is un-normalised before decoding. Two things are mmsep's, not the
authors': the order of the random draws (README: x0 first, then the window's noise audio in
generation mode, then eps; the authors draw eps before x0, and the noise audio from torch's global
generator), and the time grid: mmsep steps at t_i = i / steps with dt = 1 / steps exactly, where the
authors' float32 ``torch.linspace`` can be one float32 ulp off (on this random tiny network, at CFG
4.5, that ulp alone moves the final latent by 6e-5 relative). The grid here is exact (float64) so
that the comparison measures the conventions and the exported graphs, not that rounding.
"""

import json
import shutil

import numpy as np
import pytest

from mmsep.runtime import Separator
from mmsep.runtime.example import tones
from tests.helpers import TINY_SEED, TINY_WINDOW_SECONDS, rel_l2

torch = pytest.importorskip("torch")

PRESETS = ("tiny", "tiny_16k")
STEPS, CFG, SEED = 3, 4.5, 11


@pytest.fixture(scope="module")
def exported(model_dir, tmp_path_factory):
    """preset -> (model directory, its PyTorch components); "tiny" is the shared test model."""
    from mmsep.export.exporter import export_model
    from mmsep.models import build_components

    cache = {}

    def get(preset):
        if preset not in cache:
            comps = build_components(preset, duration=TINY_WINDOW_SECONDS, seed=TINY_SEED)
            path = model_dir
            if preset != "tiny":
                path = tmp_path_factory.mktemp("models") / preset
                with torch.no_grad():
                    export_model(comps, path, log=lambda msg: None)
            cache[preset] = path, comps
        return cache[preset]

    return get


@torch.no_grad()
def authors_inference(comps, audio, clip_f, sync_f, text_f, x0, eps, steps, cfg):
    """separate() (or generate(), given its noise audio) for a batch of one window each."""
    net, vae = comps.flow, comps.vae
    bs = x0.shape[0]
    mel = comps.mel(audio)
    moments = vae.encoder((mel - vae.data_mean) / vae.data_std)  # VAE.encode(normalize=True)
    mean, logvar = torch.chunk(moments, 2, dim=1)
    std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))
    x_cond = mean.transpose(1, 2) + std.transpose(1, 2) * eps
    empty_clip, empty_sync, empty_text = net.empty_conditions(bs)
    cond = (empty_clip if clip_f is None else clip_f, empty_sync if sync_f is None else sync_f,
            text_f)
    x = x0
    ts = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    for i in range(steps):
        t = (ts[i] * torch.ones(bs, dtype=torch.float64)).float()
        flow = net(x, t, *cond, x_mix=x_cond)
        if cfg >= 1:
            flow = cfg * flow + (1 - cfg) * net(x, t, empty_clip, empty_sync, empty_text,
                                                x_mix=x_cond)
        x = x + float(ts[i + 1] - ts[i]) * flow
    audio_latent = x * net.latent_std + net.latent_mean  # net.unnormalize before decoding
    return x, comps.vocoder(vae.decode(audio_latent.transpose(1, 2)))


def _request(comps, sep, media, mode, query, cfg=CFG):
    """Runs the request on the runtime and re-draws its numbers in the documented order."""
    from mmsep.runtime import tokenize

    info = sep.info
    window, sr = info.window_samples, info.sample_rate
    video = media["av"] if query == "video+text" else None
    kwargs = dict(text="a dog barking", video=video, steps=STEPS, cfg=cfg, seed=SEED,
                  keep_latents=True)
    rng = np.random.default_rng(SEED)
    x0 = rng.standard_normal((1, *info.latent_shape), dtype=np.float32)
    if mode == "separation":
        audio = tones(window / sr, sr, seed=5)
        result = sep.process(mix=audio, **kwargs)
    else:
        result = sep.process(generate=True, duration=window / sr, **kwargs)
        audio = np.float32(0.9) * rng.standard_normal(window, dtype=np.float32)
    eps = rng.standard_normal(info.latent_shape, dtype=np.float32)
    assert result.mode == mode and result.windows == 1 and audio.size == window
    text_f = comps.clip.encode_text(torch.from_numpy(tokenize(["a dog barking"])))
    clip_f = sync_f = None
    if video is not None:
        clip_f, sync_f = _runtime_frame_features(comps, sep, video)
    want, wave = authors_inference(comps, torch.from_numpy(audio)[None], clip_f, sync_f, text_f,
                                   torch.from_numpy(x0), torch.from_numpy(eps)[None], STEPS, cfg)
    return result, want, wave


def _runtime_frame_features(comps, sep, video):
    """PyTorch CLIP and Synchformer features of the frames the runtime prepares for window 0.

    The runtime resizes with PIL where the public code uses torchvision; that difference is
    bounded on its own in tests/runtime/test_video.py (pixels against the reference
    preprocessing) and test_separator.py (a video request against mm.sample on the reference
    preprocessing, 6e-5). On these random networks at CFG 4.5 it alone moves the final latent by
    6e-5 to 1e-4, so here both sides start from the same frames and the comparison measures the
    conventions and the exported graphs."""
    from mmsep.runtime.video import VideoSource, WindowFrames

    frames = WindowFrames(VideoSource(video), [0.0], sep.info.geometry)
    try:
        clip_in, segments = frames.next_window()
    finally:
        frames.close()
    clip_f = comps.clip.encode_image(torch.from_numpy(np.ascontiguousarray(clip_in)))
    sync_f = comps.synchformer(torch.from_numpy(np.ascontiguousarray(segments))).flatten(0, 1)
    return clip_f[None], sync_f[None]


@pytest.mark.parametrize("query", ["text", "video+text"])
@pytest.mark.parametrize("mode", ["separation", "generation"])
@pytest.mark.parametrize("preset", PRESETS)
def test_runtime_equals_the_authors_inference(exported, media, preset, mode, query):
    path, comps = exported(preset)
    sep = Separator(path, "ort-cpu")
    result, want, wave = _request(comps, sep, media, mode, query)
    err = rel_l2(result.latents, want)
    wave_err = rel_l2(result.audio[0], wave[0, :result.length])
    print(f"{preset} {mode} {query}: final latent rel L2 {err:.2e}, waveform {wave_err:.2e}")
    assert err <= 1e-4
    assert wave_err <= 1e-3


@pytest.mark.parametrize("cfg", [0.0, 0.5])
def test_guidance_below_one_is_the_conditional_branch_alone(exported, media, cfg):
    path, comps = exported("tiny")
    sep = Separator(path, "ort-cpu")
    result, want, _ = _request(comps, sep, media, "separation", "text", cfg=cfg)
    assert rel_l2(result.latents, want) <= 1e-4
    at_one, _, _ = _request(comps, sep, media, "separation", "text", cfg=1.0)
    assert np.array_equal(result.latents, at_one.latents)


def test_normalized_mean_convention_gives_the_previous_numbers(model_dir, tmp_path):
    """Exported with --mixture-latent normalized-mean: x_mix is the normalised posterior mean and
    a separation request draws nothing after x0."""
    from mmsep.export.exporter import export_model
    from mmsep.models import build_components
    from mmsep.models.sampler import sample
    from mmsep.runtime import tokenize

    comps = build_components("tiny", duration=TINY_WINDOW_SECONDS, seed=TINY_SEED)
    out = tmp_path / "tiny"
    shutil.copytree(model_dir, out)
    with torch.no_grad():
        export_model(comps, out, mixture_latent="normalized-mean", log=lambda msg: None)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["geometry"]["mixture_latent"] == "normalized-mean"
    sep = Separator(out, "ort-cpu")
    sr, window = sep.sample_rate, sep.info.window_samples
    mix = tones(window / sr, sr, seed=2)
    result = sep.process(mix=mix, text="rain", steps=2, cfg=CFG, seed=4, keep_latents=True)
    x0 = np.random.default_rng(4).standard_normal((1, *sep.info.latent_shape), dtype=np.float32)
    with torch.no_grad():
        net = comps.flow
        mean = comps.vae.encode_mean(comps.mel(torch.from_numpy(mix)[None])).transpose(1, 2)
        x_mix = (mean - net.latent_mean) / net.latent_std
        text_f = comps.clip.encode_text(torch.from_numpy(tokenize(["rain"])))
        want = sample(net, torch.from_numpy(x0), {"text_f": text_f}, x_mix, steps=2, cfg=CFG)
    assert rel_l2(result.latents, want) <= 1e-4
    # the default (posterior-sample) model differs on the same request
    other = Separator(model_dir, "ort-cpu").process(mix=mix, text="rain", steps=2, cfg=CFG,
                                                    seed=4, keep_latents=True)
    assert rel_l2(other.latents, want) > 1e-2
