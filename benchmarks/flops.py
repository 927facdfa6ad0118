"""FLOP counts of the denoiser step and the CLIP image stage, with PyTorch's FlopCounterMode.

The counter counts matrix products, convolutions and attention (2 FLOPs per multiply-add) and
ignores elementwise work, so the counts are the matrix work a GPU's tensor cores would do. Models
are built on the meta device: no memory is allocated and nothing is computed.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

FLOP_PRESETS = ("tiny", "small_16k", "small_44k", "medium_44k", "large_44k", "large_44k_v2")


def _cpu_flash_attention(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# PyTorch has no formula for the CPU flash-attention kernel (it would count 0); on the meta
# device attention decomposes into counted matmuls, and this makes CPU tensors count the same.
_CUSTOM = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention}


def count_flops(fn, *args, **kwargs) -> int:
    """FLOPs of one call ``fn(*args, **kwargs)``."""
    counter = FlopCounterMode(display=False, custom_mapping=_CUSTOM)
    with counter, torch.no_grad():
        fn(*args, **kwargs)
    return int(counter.get_total_flops())


def denoiser_step_flops(net) -> int:
    """One denoiser step for one window: both CFG branches as one batch-2 network call."""
    c = net.config
    device = net.latent_mean.device
    x = torch.zeros(2, c.latent_seq_len, c.latent_dim, device=device)
    mix = torch.zeros_like(x) if c.separation else None
    t = torch.zeros(2, device=device)
    conditions = net.prepare_conditions(*net.empty_conditions(2))
    return count_flops(net.velocity, x, t, conditions, mix)


def clip_image_flops(clip, frames: int) -> int:
    """The CLIP image encoder on one window's ``frames`` frames."""
    size = clip.image_size
    device = clip.image_mean.device
    return count_flops(clip.encode_image, torch.zeros(frames, 3, size, size, device=device))


def config_flops(flow_config, tiny_clip: bool, clip_cache: dict | None = None) -> dict:
    """FLOPs of a flow configuration (at its window duration) and of its CLIP image stage."""
    from mmsep.models.clip import build_clip
    from mmsep.models.flow import MMAudioFlow

    with torch.device("meta"):
        net = MMAudioFlow(flow_config).eval()
        cache = {} if clip_cache is None else clip_cache
        if tiny_clip not in cache:
            cache[tiny_clip] = build_clip(tiny=tiny_clip)
        frames = flow_config.clip_seq_len
        return {"window_seconds": flow_config.duration,
                "latent_len": flow_config.latent_seq_len,
                "denoiser_step": denoiser_step_flops(net),
                "clip_frames": frames,
                "clip_image": clip_image_flops(cache[tiny_clip], frames)}


def preset_flops(presets=FLOP_PRESETS, duration: float = 8.0) -> dict[str, dict]:
    """FLOPs per preset (separation networks, ``duration``-second windows)."""
    from mmsep.models.flow import resolve_config

    cache: dict = {}
    out = {}
    for name in presets:
        config = dataclasses.replace(resolve_config(name), separation=True,
                                     duration=float(duration))
        out[name] = config_flops(config, tiny_clip=name == "tiny", clip_cache=cache)
    return out


def main(argv=None) -> int:
    """``python benchmarks/flops.py PRESET... [--json FILE]``: print (and write) FLOP counts."""
    import argparse

    from mmsep.runtime.atomic import check_writable, write_json_atomically
    from mmsep.runtime.errors import OutputError

    parser = argparse.ArgumentParser(description="FLOPs of the denoiser step (both CFG "
                                                 "branches, one window) and the CLIP image stage.")
    parser.add_argument("presets", nargs="*", default=list(FLOP_PRESETS),
                        help="presets to count (default: all)")
    parser.add_argument("--json", help="also write the counts to this JSON file")
    args = parser.parse_args(argv)
    if args.json:
        try:
            check_writable(args.json, "--json")
        except OutputError as exc:
            parser.exit(2, f"flops.py: error: {exc}\n")
    unknown = sorted(set(args.presets) - set(FLOP_PRESETS))
    if unknown:
        parser.exit(2, f"flops.py: error: unknown preset {', '.join(unknown)}; choose from "
                       f"{', '.join(FLOP_PRESETS)}\n")
    counts = preset_flops(args.presets)
    for name, c in counts.items():
        print(f"{name:<14} denoiser step {c['denoiser_step'] / 1e12:8.4f} TFLOP   "
              f"clip_image ({c['clip_frames']} frames) {c['clip_image'] / 1e12:8.2f} TFLOP")
    if args.json:
        write_json_atomically(args.json, {"schema": "mmsep-flops/1", "window_seconds": 8.0,
                                          "presets": counts})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
