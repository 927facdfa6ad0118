"""The fine-tuning recipe: what trains, how the input projection starts, the loss, the EMA.

Facts from the authors' code (github sony/mmaudiosep) and MMAudio (github hkchengrex/MMAudio):

- Trainable: the audio input projection and the joint MM-DiT blocks. ``freeze_params_from_mmaudio``
  (mmaudiosep/runner.py, on by default: ``freeze_params: True``) freezes the clip/sync/text input
  projections, clip/text condition projections, the global-condition MLP, the timestep embedder,
  the sync position embedding, the learned empty clip/sync features, the fused (single-stream)
  blocks and the final layer; the latent statistics and the empty text feature never train.
  ``--train-fused`` also trains the fused blocks and the final layer.
- Input projection: ``load_weights_from_mmaudio`` drops every ``audio_input_proj`` tensor of the
  pretrained network, so the projection keeps the fresh network's initialisation (PyTorch's
  default for its convolutions: ``initialize_weights`` only touches ``nn.Linear``). ``zero-mix``
  (mmsep's alternative) keeps the pretrained weights and reads the mixture through zeros.
- Flow matching (mmaudio/model/flow_matching.py, config ``sampling``): min_sigma 0,
  ``x_t = (1 - t) x0 + t x1``, target velocity ``x1 - x0``, squared error averaged over the
  latent; t = sigmoid(N(0, 1)) (``log_normal_sample`` with mean 0, scale 1).
- Latents: ``x1 = normalize(mean + std * eps)`` and the mixture latent
  ``normalize(mix_mean + mix_std * eps)`` with the same ``eps`` (runner.train_fn).
- Query dropout: with probability 0.1 the video (clip and sync together) is replaced by the
  learned empty features, independently with probability 0.1 the text
  (``null_condition_probability``); the mixture is never dropped.
- EMA: the authors keep a post-hoc EMA (``sigma_rels`` 0.05 and 0.1, every step from step 0,
  ``step_size_correction``) and ship the one synthesised at sigma_rel 0.05; here the online
  power-function EMA at sigma_rel 0.05 (Karras et al., EDM2) is kept with the same per-update
  decay as theirs (``PowerEMA``), which is what that synthesis approximates.
- Optimiser: AdamW, lr 1e-4, betas (0.9, 0.95), weight decay 1e-6, eps 1e-8 (1e-6 with bf16),
  gradient norm clipped at 1; linear warm-up over W steps, then x0.1 and x0.01 once 80 % and
  90 % of the steps have run after it (the authors' ``SequentialLR``: their step milestones,
  240k and 270k of 300k, count from the end of the warm-up).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import nn

from mmsep.models.checkpoint import convert_to_separation
from mmsep.models.flow import MMAudioFlow

SIGMA_MIN = 0.0
TIME_MEAN, TIME_SCALE = 0.0, 1.0
NULL_CONDITION_PROBABILITY = 0.1
EMA_SIGMA_REL = 0.05
LEARNING_RATE = 1e-4
ADAM_BETAS = (0.9, 0.95)
WEIGHT_DECAY = 1e-6
GRAD_CLIP = 1.0
LR_DROPS = ((0.8, 0.1), (0.9, 0.01))  # (fraction of the steps, factor from there on)
INIT_INPUT_PROJ = ("reinit", "zero-mix")
_TRAINED = ("audio_input_proj.", "joint_blocks.")
_TRAINED_WITH_FUSED = _TRAINED + ("fused_blocks.", "final_layer.")


def separation_start(net: MMAudioFlow, init_input_proj: str, seed: int) -> MMAudioFlow:
    """The separation network fine-tuning starts from (a copy; ``net`` is not changed).

    A separation network is returned as is (continued fine-tuning). A generation network gets
    the doubled input projection: ``zero-mix`` keeps the pretrained weights for the noisy half
    and zeros for the mixture half (step 0 is the pretrained generator), ``reinit`` draws the
    whole audio input projection afresh (seeded PyTorch default initialisation), as the authors.
    """
    if init_input_proj not in INIT_INPUT_PROJ:
        raise ValueError(f"init_input_proj must be one of {INIT_INPUT_PROJ}, "
                         f"got {init_input_proj!r}")
    if net.config.separation:
        return copy.deepcopy(net)
    sep = convert_to_separation(net)
    if init_input_proj == "reinit":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for module in sep.audio_input_proj.modules():
                if module is not sep.audio_input_proj and hasattr(module, "reset_parameters"):
                    module.reset_parameters()
    return sep


def set_trainable(net: nn.Module, train_fused: bool = False) -> list[str]:
    """Freeze everything but the recipe's trainable parts; returns the trainable names."""
    prefixes = _TRAINED_WITH_FUSED if train_fused else _TRAINED
    names = []
    for name, param in net.named_parameters():
        param.requires_grad_(name.startswith(prefixes))
        if param.requires_grad:
            names.append(name)
    return names


def sample_time(batch: int, gen: torch.Generator) -> torch.Tensor:
    return torch.sigmoid(torch.randn(batch, generator=gen) * TIME_SCALE + TIME_MEAN)


def drop_queries(net: MMAudioFlow, features: dict[str, torch.Tensor], video_keep: torch.Tensor,
                 text_keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """Replace the video features (clip and sync) where ``video_keep`` is False and the text
    where ``text_keep`` is False by the network's learned empty features."""
    batch = video_keep.shape[0]
    empty = dict(zip(("clip_f", "sync_f", "text_f"), net.empty_conditions(batch)))
    keep = {"clip_f": video_keep, "sync_f": video_keep, "text_f": text_keep}
    return {k: torch.where(keep[k][:, None, None].to(v.device), v, empty[k].to(v.dtype))
            for k, v in features.items()}


def cfm_loss(net: nn.Module, x1: torch.Tensor, x_mix: torch.Tensor,
             features: dict[str, torch.Tensor], t: torch.Tensor,
             x0: torch.Tensor) -> torch.Tensor:
    """Per-item conditional flow-matching loss (B,); ``net`` may be DDP-wrapped."""
    tt = t[:, None, None]
    xt = (1 - (1 - SIGMA_MIN) * tt) * x0 + tt * x1
    v = net(xt, t, features["clip_f"], features["sync_f"], features["text_f"], x_mix)
    target = x1 - (1 - SIGMA_MIN) * x0
    return (v.float() - target).pow(2).mean(dim=(1, 2))


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Learning-rate multiplier at optimiser step ``step`` (0-based)."""
    drop = 1.0
    for fraction, factor in LR_DROPS:
        if step - warmup >= fraction * total:
            drop = factor
    return min(1.0, (step + 1) / (warmup + 1)) * drop


def ema_gamma(sigma_rel: float) -> float:
    """EDM2's power-function exponent for a relative EMA width ``sigma_rel``: the largest root of
    ``sigma_rel^2 (g + 2)^2 (g + 3) = g + 1``."""
    s2 = sigma_rel ** 2
    roots = np.roots([s2, s2 * 7, s2 * 16 - 1, s2 * 12 - 1])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


class PowerEMA:
    """EMA of the trainable parameters. The first update copies them; the n-th (n >= 2) decays
    by ``sqrt(b(n + 1) b(n + 2))`` with ``b(k) = (1 - 1/k)^(gamma + 1)``: the authors' EMA
    (nitrous_ema's KarrasEMA with ``step_size_correction``, one update per step, which counts
    its steps from 1 and first copies the network)."""

    def __init__(self, net: nn.Module, sigma_rel: float = EMA_SIGMA_REL):
        self.gamma = ema_gamma(sigma_rel)
        self.updates = 0
        self.shadow = {n: p.detach().clone().float() for n, p in net.named_parameters()
                       if p.requires_grad}

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        self.updates += 1
        n, power = self.updates, self.gamma + 1
        beta = 0.0 if n == 1 else ((1 - 1 / (n + 1)) * (1 - 1 / (n + 2))) ** (power / 2)
        for name, param in net.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(param.detach().float(), 1 - beta)

    @torch.no_grad()
    def copy_to(self, net: nn.Module) -> nn.Module:
        params = dict(net.named_parameters())
        for name, value in self.shadow.items():
            params[name].copy_(value.to(params[name].dtype))
        return net

    def state_dict(self) -> dict:
        return {"updates": self.updates, "gamma": self.gamma, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        if set(state["shadow"]) != set(self.shadow) or not math.isclose(state["gamma"],
                                                                         self.gamma):
            raise ValueError("the EMA state does not match the trainable parameters")
        self.updates = int(state["updates"])
        # on the network's device: a checkpoint is read to the CPU, the network may be on a GPU
        self.shadow = {k: v.to(self.shadow[k].device, torch.float32, copy=True)
                       for k, v in state["shadow"].items()}
