"""Reference sampler: fixed-step Euler from noise (t=0) to data (t=1) with classifier-free guidance.

This is the PyTorch reference that exported denoiser graphs and the torch-free runtime are checked
against; it favours clarity (two network calls per step, fp32 accumulator) over speed.

The mixture latent (``x_mix``) follows one of two conventions (``mmsep.stages.MIXTURE_LATENTS``,
chosen at export and recorded in the manifest); ``mixture_latent`` computes it. Generation mode
with a separation network is the authors' ``generate()``: the "mixture" is white-noise audio
(``GENERATION_NOISE_SCALE`` * standard normal, one window long) encoded the same way.
``initial_noise`` draws every random number of a request for a seed, with numpy, in the order the
runtime draws them, so PyTorch and the runtime agree without torch in the runtime.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from ..stages import (GENERATION_NOISE_SCALE, NORMALIZED_MEAN, POSTERIOR_SAMPLE, euler_schedule,
                      guidance_strength)
from .flow import FlowConfig, MMAudioFlow

CONDITION_KEYS = ("clip_f", "sync_f", "text_f")


class RequestNoise(NamedTuple):
    x0: torch.Tensor  # (items, N, C) initial latents
    noise_audio: torch.Tensor | None  # (windows, L) generation mode's white-noise mixtures
    posterior_noise: torch.Tensor | None  # (windows, N, C) noise of the posterior samples


def initial_noise(items: int, config: FlowConfig, seed: int, *, windows: int | None = None,
                  convention: str = POSTERIOR_SAMPLE, generation: bool = False) -> RequestNoise:
    """Every random draw of one request, float32, in the runtime's order.

    ``rng = numpy.random.default_rng(seed)``; first ``x0 = rng.standard_normal((items, N, C))``
    for all items; then, per window in window order (``windows`` defaults to ``items``), what that
    window needs: in ``generation`` mode (a separation network without a mixture) first its noise
    audio ``GENERATION_NOISE_SCALE * rng.standard_normal(L)`` (L: the window's samples), then,
    under ``posterior-sample``, its posterior noise ``rng.standard_normal((N, C))``. A generation
    network draws x0 only.
    """
    windows = items if windows is None else windows
    latent = (config.latent_seq_len, config.latent_dim)
    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal((items, *latent), dtype=np.float32)
    audio, posterior = [], []
    for _ in range(windows if config.separation else 0):
        if generation:
            audio.append(GENERATION_NOISE_SCALE
                         * rng.standard_normal(config.lengths.audio_samples, dtype=np.float32))
        if convention == POSTERIOR_SAMPLE:
            posterior.append(rng.standard_normal(latent, dtype=np.float32))
    return RequestNoise(torch.from_numpy(x0),
                        torch.from_numpy(np.stack(audio)) if audio else None,
                        torch.from_numpy(np.stack(posterior)) if posterior else None)


def mixture_latent(waveform: torch.Tensor, mel: nn.Module, vae: nn.Module,
                   latent_mean: torch.Tensor, latent_std: torch.Tensor, *,
                   convention: str = POSTERIOR_SAMPLE,
                   noise: torch.Tensor | None = None) -> torch.Tensor:
    """The mixture latent (B, N, C) of waveforms (B, L) in [-1, 1] under ``convention``.

    ``posterior-sample``: ``mean + std * noise`` of the VAE posterior of the waveform's mel,
    unnormalised (``noise`` standard normal (B, N, C)), as the authors' ``separate()`` and
    ``generate()``. ``normalized-mean``: ``(mean - latent_mean) / latent_std``; no noise.
    ``latent_mean`` / ``latent_std`` are the flow network's statistics (1, 1, C).
    """
    if convention == POSTERIOR_SAMPLE:
        if noise is None:
            raise ValueError("the posterior-sample mixture latent needs its noise (B, N, C)")
        mean, std = vae.encode_posterior(mel(waveform))
        return mean.transpose(1, 2) + std.transpose(1, 2) * noise
    if convention == NORMALIZED_MEAN:
        return (vae.encode_mean(mel(waveform)).transpose(1, 2) - latent_mean) / latent_std
    raise ValueError(f"unknown mixture latent convention {convention!r}; expected "
                     f"{POSTERIOR_SAMPLE!r} or {NORMALIZED_MEAN!r}")


def guided_euler_step(x, dt, cfg, v_cond, v_uncond=None):
    """One Euler step along the guided velocity: ``x + dt * (cfg * v_cond + (1 - cfg) *
    v_uncond)``, or ``x + dt * v_cond`` without an unconditional branch. The one formula of this
    sampler, the exported denoiser stage and the benchmarks' baseline; ``dt`` and ``cfg`` are
    numbers or tensors that broadcast against ``x``."""
    v = v_cond if v_uncond is None else cfg * v_cond + (1.0 - cfg) * v_uncond
    return x + dt * v


def _batch(name: str, x: torch.Tensor, batch: int) -> torch.Tensor:
    if x.dim() != 3 or x.shape[0] not in (1, batch):
        raise ValueError(f"{name}: expected (B, T, C) with B = 1 or {batch}, got {tuple(x.shape)}")
    return x.expand(batch, -1, -1)


@torch.no_grad()
def sample(net: MMAudioFlow, x0: torch.Tensor,
           conditions: Mapping[str, torch.Tensor | None] | None = None,
           x_mix: torch.Tensor | None = None, steps: int = 25, cfg: float = 4.5,
           negative_text_f: torch.Tensor | None = None) -> torch.Tensor:
    """Integrate the guided velocity from x0 (t=0) to t=1; returns x1 like x0 (B, N, C).

    ``conditions`` maps clip_f / sync_f / text_f to features (batch 1 or B); a missing or None
    modality uses the network's learned empty feature. The unconditional branch uses the empty
    features for all modalities (``negative_text_f`` in place of the empty text when given); both
    branches see the same ``x_mix``. Steps at t_i = i / steps with dt = 1 / steps
    (``mmsep.stages.euler_schedule``), each ``guided_euler_step``: ``v = cfg * v(x, t, cond) + (1 -
    cfg) * v(x, t, uncond)``, ``x <- x + dt * v``. ``cfg <= 1`` skips the unconditional branch
    (``guidance_strength``: below 1 the conditional velocity alone, as the authors). Network calls
    run in the network's dtype, the Euler update in fp32 (fp64 for a float64 network).
    """
    conditions = dict(conditions or {})
    unknown = sorted(set(conditions) - set(CONDITION_KEYS))
    if unknown:
        raise ValueError(f"unknown condition keys {unknown}; expected some of {CONDITION_KEYS}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if x0.dim() != 3:
        raise ValueError(f"x0: expected (B, N, C), got {tuple(x0.shape)}")
    param = net.latent_mean
    dtype, device, batch = param.dtype, param.device, x0.shape[0]

    def cast(x: torch.Tensor) -> torch.Tensor:
        return x.to(device=device, dtype=dtype)

    empty = dict(zip(CONDITION_KEYS, net.empty_conditions(batch)))
    cond = {k: cast(_batch(k, conditions[k], batch)) if conditions.get(k) is not None else empty[k]
            for k in CONDITION_KEYS}
    cond_c = net.prepare_conditions(cond["clip_f"], cond["sync_f"], cond["text_f"])
    cfg = guidance_strength(cfg)
    guided = cfg != 1
    if guided:
        text_u = (cast(_batch("negative_text_f", negative_text_f, batch))
                  if negative_text_f is not None else empty["text_f"])
        uncond_c = net.prepare_conditions(empty["clip_f"], empty["sync_f"], text_u)
    mix = cast(x_mix) if x_mix is not None else None

    acc = torch.promote_types(dtype, torch.float32)
    x = x0.to(device=device, dtype=acc)
    times, dt = euler_schedule(steps)
    for start in times:
        t = torch.full((batch,), start, device=device, dtype=torch.float32)
        xi = x.to(dtype)
        v = net.velocity(xi, t, cond_c, mix).to(acc)
        v_u = net.velocity(xi, t, uncond_c, mix).to(acc) if guided else None
        x = guided_euler_step(x, dt, cfg, v, v_u)
    return x.to(x0.dtype)
