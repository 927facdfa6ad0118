"""Random, realistic example inputs for each stage tensor (for tracing and parity checks)."""

from __future__ import annotations

import torch

from ..stages import StageSpec, Tensor, TensorSpec

CLIP_START, CLIP_END, CLIP_VOCAB = 49406, 49407, 49408


def example_inputs(spec: StageSpec, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {t.name: _example(t, t.concrete(batch), gen) for t in spec.inputs}


def _example(tensor: TensorSpec, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    name = tensor.name
    if name == Tensor.TOKENS:
        return _tokens(shape, gen)
    if name == Tensor.FRAMES:  # RGB in [0, 1]
        return torch.rand(shape, generator=gen)
    if name == Tensor.SEGMENTS:  # RGB in [-1, 1]
        return torch.rand(shape, generator=gen) * 2 - 1
    if name == Tensor.WAVEFORM:
        return (0.3 * torch.randn(shape, generator=gen)).clamp(-1, 1)
    if name == Tensor.MEL:  # natural-log magnitudes of speech-like level
        return torch.randn(shape, generator=gen) - 4.0
    if name == Tensor.T:
        return torch.rand(shape, generator=gen) * 0.96
    if name == Tensor.DT:
        return torch.full(shape, 0.04)
    if name == Tensor.CFG:
        return torch.full(shape, 4.5)
    if name in (Tensor.CLIP_FEATURES, Tensor.TEXT_FEATURES):  # L2-normalised CLIP outputs
        return torch.nn.functional.normalize(torch.randn(shape, generator=gen), dim=-1)
    return torch.randn(shape, generator=gen)


def _tokens(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    batch, length = shape
    tokens = torch.zeros(shape, dtype=torch.int64)
    for row in range(batch):
        n = int(torch.randint(1, length - 1, (1,), generator=gen))
        tokens[row, 0] = CLIP_START
        tokens[row, 1:n + 1] = torch.randint(1, CLIP_START, (n,), generator=gen)
        tokens[row, n + 1] = CLIP_END
    return tokens
