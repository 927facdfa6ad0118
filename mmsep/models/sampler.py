"""Reference sampler: fixed-step Euler from noise (t=0) to data (t=1) with classifier-free guidance.

This is the PyTorch reference that exported denoiser graphs and the torch-free runtime are checked
against; it favours clarity (two network calls per step, fp32 accumulator) over speed.

Generation mode: a separation network with a standard-normal "mixture" behaves as a plain
video/text-to-audio generator. ``initial_noise`` defines both noises for a seed with numpy so the
runtime reproduces them without torch.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from .flow import FlowConfig, MMAudioFlow

CONDITION_KEYS = ("clip_f", "sync_f", "text_f")


def initial_noise(batch: int, config: FlowConfig, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, noise_mixture), each float32 (batch, latent_seq_len, latent_dim), for ``seed``.

    ``rng = numpy.random.default_rng(seed)``; x0 is its first standard-normal draw of that shape,
    the noise mixture (used in place of a mixture latent for plain generation with a separation
    network) the second.
    """
    shape = (batch, config.latent_seq_len, config.latent_dim)
    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal(shape, dtype=np.float32)
    mix = rng.standard_normal(shape, dtype=np.float32)
    return torch.from_numpy(x0), torch.from_numpy(mix)


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
    branches see the same ``x_mix``. With step i at t_i = i / steps and dt = 1 / steps:
    ``v = cfg * v(x, t, cond) + (1 - cfg) * v(x, t, uncond)``, ``x <- x + dt * v``. ``cfg == 1``
    skips the unconditional branch. Network calls run in the network's dtype, the Euler update in
    fp32 (fp64 for a float64 network).
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
    guided = cfg != 1
    if guided:
        text_u = (cast(_batch("negative_text_f", negative_text_f, batch))
                  if negative_text_f is not None else empty["text_f"])
        uncond_c = net.prepare_conditions(empty["clip_f"], empty["sync_f"], text_u)
    mix = cast(x_mix) if x_mix is not None else None

    acc = torch.promote_types(dtype, torch.float32)
    x = x0.to(device=device, dtype=acc)
    dt = 1.0 / steps
    for i in range(steps):
        t = torch.full((batch,), i / steps, device=device, dtype=torch.float32)
        xi = x.to(dtype)
        v = net.velocity(xi, t, cond_c, mix).to(acc)
        if guided:
            v_u = net.velocity(xi, t, uncond_c, mix).to(acc)
            v = cfg * v + (1 - cfg) * v_u
        x = x + dt * v
    return x.to(x0.dtype)
