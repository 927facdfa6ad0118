"""Randomise every parameter of a module, so random-weight parity tests cannot pass vacuously.

Upstream initialisations set adaLN modulation, final layers and some gains to zero: a network
initialised that way outputs zeros and any two implementations "agree". Here nothing is left at
zero and scales are chosen so activations stay O(1) through deep stacks.
"""

from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def randomize_(module: nn.Module, seed: int = 0, *, scale: float = 1.0) -> nn.Module:
    """Fill every parameter of ``module`` with seeded random values (none zero); returns it.

    Matrices and kernels: N(0, scale^2 / fan_in). Biases: N(0, 0.1^2). Other vectors and scalars
    (norm gains, activation parameters, learned embeddings): 1 + N(0, 0.1^2) for gains named
    ``weight``/``gamma``/``scale``/``gain``, N(0, 1) otherwise.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, param in sorted(module.named_parameters(), key=lambda kv: kv[0]):
        leaf = name.rsplit(".", 1)[-1]
        values = torch.randn(param.shape, generator=gen, dtype=torch.float32)
        if param.dim() >= 2 and not leaf.startswith(("empty", "pos", "cls", "token")):
            fan_in = param[0].numel()
            values *= scale / math.sqrt(fan_in)
        elif leaf.endswith("bias"):
            values *= 0.1
        elif leaf in ("weight", "gamma", "scale", "gain") or leaf.endswith(("_weight", "_gain")):
            values = 1.0 + 0.1 * values
        values = values.to(param.dtype)
        # randn returns an exact zero a few times per billion draws; nudge those off zero
        values[values == 0] = 1e-3
        param.copy_(values)
    return module
