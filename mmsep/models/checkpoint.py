"""Flow-network checkpoints: variant detection from the tensors, strict loading, conversion.

Detection reads only tensor shapes and key names:

- hidden size and latent size from ``final_layer.conv.weight`` (latent, hidden, 7); the latent
  size gives the mode (20 -> "16k", 40 -> "44k");
- separation from the input channels of ``audio_input_proj.0.weight``: 2 x latent (MMAudioSep) or
  latent (MMAudio generation);
- depth and fused depth from the number of ``joint_blocks.<i>`` / ``fused_blocks.<i>``;
- the head count from the per-head RMS norm width (``...attn.q_norm.weight`` has hidden / heads
  entries), which must agree with the preset whose hidden size matches;
- v1 / v2 from the input projections (v2 has a SiLU after the CLIP linear layer, so its gated MLP
  sits at ``clip_input_proj.2``; v1 at ``clip_input_proj.1``), cross-checked against the
  timestep-embedder frequency size (v1: 256, v2: hidden size);
- feature widths (real CLIP/Synchformer/CLIP-text vs the tiny preset's) from the first clip,
  sync and text projection weights.

The combination must be one of ``FLOW_PRESETS``; anything else is a CheckpointError naming the
file and the mismatch. The strict load afterwards catches every other difference.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping

import torch

from . import io
from .flow import FLOW_PRESETS, FlowConfig, MMAudioFlow
from .io import CheckpointError

WHAT = "MMAudio flow checkpoint"
# constant tables some older upstream checkpoints saved; rebuilt here, so dropped on load
DERIVED_KEYS = ("t_embed.freqs", "latent_rot", "clip_rot")
FIRST_CONV = "audio_input_proj.0.weight"
_MODES = {20: "16k", 40: "44k"}


def _need(state: Mapping[str, torch.Tensor], path, key: str, dims: int) -> torch.Size:
    if key not in state:
        found = ", ".join(list(state)[:6]) + (" ..." if len(state) > 6 else "")
        raise CheckpointError(f"{os.fspath(path)}: not an {WHAT}: no tensor {key!r} "
                              f"(found {len(state)} tensors: {found})")
    shape = state[key].shape
    if len(shape) != dims:
        raise CheckpointError(f"{os.fspath(path)}: {key} has shape {tuple(shape)}, expected a "
                              f"{dims}-d tensor in an {WHAT}")
    return shape


def _count_blocks(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(rf"^{prefix}\.(\d+)\.")
    indices = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    return max(indices) + 1 if indices else 0


def detect_flow_config(state: Mapping[str, torch.Tensor], path: str | os.PathLike = "<state dict>",
                       *, duration: float = 8.0) -> FlowConfig:
    """The FlowConfig (preset, separation, duration) a state dict was saved from."""
    latent_dim, hidden, _ = _need(state, path, "final_layer.conv.weight", 3)
    _, in_channels, _ = _need(state, path, FIRST_CONV, 3)
    _, clip_dim = _need(state, path, "clip_input_proj.0.weight", 2)
    _, sync_dim, _ = _need(state, path, "sync_input_proj.0.weight", 3)
    _, text_dim = _need(state, path, "text_input_proj.0.weight", 2)
    _, freq_size = _need(state, path, "t_embed.mlp.0.weight", 2)
    (head_dim,) = _need(state, path, "joint_blocks.0.latent_block.attn.q_norm.weight", 1)
    name = os.fspath(path)

    if in_channels == 2 * latent_dim:
        separation = True
    elif in_channels == latent_dim:
        separation = False
    else:
        raise CheckpointError(f"{name}: {FIRST_CONV} reads {in_channels} channels; an {WHAT} with "
                              f"{latent_dim} latent channels needs {latent_dim} (generation) or "
                              f"{2 * latent_dim} (separation)")
    has_v2 = "clip_input_proj.2.w1.weight" in state
    has_v1 = "clip_input_proj.1.w1.weight" in state
    if has_v1 == has_v2:
        raise CheckpointError(f"{name}: cannot tell MMAudio v1 from v2: expected exactly one of "
                              "clip_input_proj.1.w1.weight (v1) / clip_input_proj.2.w1.weight (v2)")
    v2 = has_v2
    expected_freq = hidden if v2 else 256
    if freq_size != expected_freq:
        raise CheckpointError(f"{name}: t_embed.mlp.0.weight has {freq_size} input frequencies; "
                              f"a {'v2' if v2 else 'v1'} network with hidden size {hidden} has "
                              f"{expected_freq}")
    if head_dim == 0 or hidden % head_dim:
        raise CheckpointError(f"{name}: per-head norm width {head_dim} does not divide the hidden "
                              f"size {hidden}")
    joint = _count_blocks(state, "joint_blocks")
    fused = _count_blocks(state, "fused_blocks")
    found = dict(mode=_MODES.get(latent_dim), latent_dim=latent_dim, hidden_dim=hidden,
                 depth=joint + fused, fused_depth=fused, num_heads=hidden // head_dim, v2=v2,
                 clip_dim=clip_dim, sync_dim=sync_dim, text_dim=text_dim)
    for preset in FLOW_PRESETS.values():
        if all(getattr(preset, k) == v for k, v in found.items()):
            return dataclasses.replace(preset, separation=separation, duration=float(duration))
    raise CheckpointError(
        f"{name}: hidden size {hidden} / depth {joint + fused} ({joint} joint + {fused} fused) / "
        f"{hidden // head_dim} heads / latent {latent_dim} / {'v2' if v2 else 'v1'} / features "
        f"clip {clip_dim}, sync {sync_dim}, text {text_dim} matches no MMAudio variant "
        f"(known: {', '.join(FLOW_PRESETS)})")


def load_flow(path: str | os.PathLike, *, duration: float = 8.0,
              device: str | torch.device = "cpu") -> MMAudioFlow:
    """Load a MMAudio (generation) or MMAudioSep (separation) checkpoint, variant detected.

    Reads local files only. The network is built for ``duration``-second windows, loaded strictly
    (one CheckpointError names the file and every missing/unexpected/misshapen key) and returned
    in eval mode on ``device``.
    """
    state = io.read_state_dict(path, what=WHAT, fits=_is_flow_state)
    state = {k: v for k, v in state.items() if k not in DERIVED_KEYS}
    config = detect_flow_config(state, path, duration=duration)
    with torch.device("meta"):  # no allocation or random init for weights about to be replaced
        net = MMAudioFlow(config)
    io.check_state_dict(net, state, path, what=f"{config.name} {_kind(config)} network")
    net = net.to_empty(device=device)  # the constant tables are rebuilt by MMAudioFlow._apply
    io.load_checked(net, state, path, what=f"{config.name} {_kind(config)} network")
    return net.eval()


def _is_flow_state(state: Mapping[str, torch.Tensor]) -> bool:
    try:
        detect_flow_config(state)
    except CheckpointError:
        return False
    return True


def _kind(config: FlowConfig) -> str:
    return "separation" if config.separation else "generation"


def convert_to_separation(source: MMAudioFlow | Mapping[str, torch.Tensor]):
    """Turn a generation network into a separation network that ignores the mixture.

    Every weight is copied; the first input convolution keeps its pretrained weights for the
    noisy-latent channels and gets zeros for the mixture channels, so the result equals the
    generation network for any mixture (the usual fine-tuning start point).

    A MMAudioFlow gives a new MMAudioFlow (same duration, dtype and device, in the source's
    train/eval mode); a state dict gives a state dict.
    """
    if isinstance(source, MMAudioFlow):
        if source.config.separation:
            raise ValueError(f"{source.config.name}: the network is already a separation network")
        config = dataclasses.replace(source.config, separation=True)
        state = convert_to_separation(source.state_dict())
        param = next(source.parameters())
        with torch.device("meta"):
            net = MMAudioFlow(config)
        net = net.to_empty(device=param.device).to(param.dtype)
        net.load_state_dict(state, strict=True)
        return net.train(source.training)
    if not isinstance(source, Mapping):
        raise TypeError(f"convert_to_separation expects a MMAudioFlow or a state dict, "
                        f"got {type(source).__name__}")
    state = dict(source)
    config = detect_flow_config(state)
    if config.separation:
        raise ValueError(f"the state dict is already a {config.name} separation network")
    weight = state[FIRST_CONV]
    state[FIRST_CONV] = torch.cat([weight, torch.zeros_like(weight)], dim=1)
    return state
