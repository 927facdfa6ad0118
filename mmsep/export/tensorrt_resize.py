"""The frame-resize engines (``runtime.resize_engine``: one for RGB frames, one for yuv420p
planes): built beside the stage engines, so that the TensorRT backend resizes video frames on the
GPU, and checked against the host's resize.

They do not depend on the model: their keys cover the graph and the machine only, and a
re-export reuses them like any other unchanged engine.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from ..models.presets import CLIP_IMAGE_SIZE, SYNC_IMAGE_SIZE
from ..runtime.atomic import write_bytes_atomically
from ..runtime.resize import resize_frames
from ..runtime.pixels import RGB_INPUT, YUV_PLANES, YuvConversion
from ..runtime.resize_engine import ENGINE_NAMES as NAMES, MAX_FRAMES, OUTPUT_NAME, PLANS, \
    engine_graph, engine_inputs, engine_profile, table_inputs
from . import tensorrt_build as tb
from .errors import ParityError

CHECKED = ((MAX_FRAMES, 241, 321), (2, 1080, 1920))  # (frames, height, width) run at export
GREY_TOLERANCE = 0.01  # grey levels; the graph is exact, and a rounding slip costs one level
STREAMS = (("clip", CLIP_IMAGE_SIZE), ("sync", SYNC_IMAGE_SIZE))  # the model inputs


def engine_key(graph: bytes, info: dict) -> str:
    return tb.machine_key({"graph": hashlib.sha256(graph).hexdigest()}, info)


def build_frame_resize_engines(model_dir: Path, info: dict, *, timing_cache: Path,
                               previous: dict | None = None,
                               workspace_bytes: int | None = None) -> tuple[dict, list[str]]:
    """The manifest records of both frame-resize engines (RGB and yuv420p) in ``model_dir``,
    each built and checked or reused from ``previous`` (a manifest with its directory under
    "_dir"), and the names of those built."""
    records, built = {}, []
    for yuv, name in NAMES.items():
        records[name], fresh = build_frame_resize_engine(
            model_dir, info, yuv, timing_cache=timing_cache, previous=previous,
            workspace_bytes=workspace_bytes)
        built += [name] if fresh else []
    return records, built


def build_frame_resize_engine(model_dir: Path, info: dict, yuv: bool = False, *,
                              timing_cache: Path, previous: dict | None = None,
                              workspace_bytes: int | None = None) -> tuple[dict, bool]:
    """The record of one frame-resize engine and whether it was built (not reused)."""
    name, graph = NAMES[yuv], engine_graph(yuv)
    key = engine_key(graph, info)
    engine_path = model_dir / f"{name}.engine"
    old = ((previous or {}).get("tensorrt") or {}).get(name)
    reused = tb.reuse_engine(old, key, engine_path, previous)
    if reused is not None:
        return reused, False
    onnx_path = model_dir / f"{name}.onnx"
    write_bytes_atomically(onnx_path, graph)
    built = tb.build_graph_engine(onnx_path, name, engine_profile(yuv), [OUTPUT_NAME],
                                  engine_path, timing_cache=timing_cache,
                                  workspace_bytes=workspace_bytes)
    return {**built, "key": key, "onnx": onnx_path.name,
            "parity": check_frame_resize_engine(engine_path, yuv)}, True


def _random_pixels(rng, frames: int, height: int, width: int, yuv: bool):
    """(engine pixel inputs, the RGB frames they stand for): random frames, or random yuv420p
    planes with random conversion tables of swscale's range."""
    if not yuv:
        rgb = rng.integers(0, 256, (frames, height, width, 3), np.uint8)
        return {RGB_INPUT: rgb}, rgb
    conversion = YuvConversion((0, 0), *(rng.integers(-300, 300, (256, 3)).astype(np.int32)
                                         for _ in range(3)))
    chroma = (frames, -(-height // 2), -(-width // 2))
    planes = {name: rng.integers(0, 256, size, np.uint8)
              for name, size in zip(YUV_PLANES, ((frames, height, width), chroma, chroma))}
    return {**planes, **table_inputs(conversion)}, conversion.to_rgb(*planes.values())


def check_frame_resize_engine(engine_path: Path, yuv: bool = False, seed: int = 1) -> dict:
    """The engine on random pixels at ``CHECKED``'s sizes against ``resize.resize_frames`` of
    the same RGB frames (PIL's grey levels): the largest difference in grey levels;
    ParityError beyond ``GREY_TOLERANCE``."""
    import torch

    from .tensorrt_parity import run_graph_engine

    rng = np.random.default_rng(seed)
    worst = 0.0
    for frames, height, width in CHECKED:
        pixels, rgb = _random_pixels(rng, frames, height, width, yuv)
        for stream, size in STREAMS:
            inputs = {**pixels, **engine_inputs(stream, height, width, size)}
            got = run_graph_engine(engine_path, NAMES[yuv],
                                   {k: torch.from_numpy(np.array(v)) for k, v in inputs.items()},
                                   {OUTPUT_NAME: torch.float32})[OUTPUT_NAME].cpu().numpy()
            plan = PLANS[stream](height, width, size)
            diff = np.abs(got.astype(np.float64) - resize_frames(rgb, plan)).max() / plan.scale
            worst = max(worst, float(diff))
    result = {"max_grey_levels": worst, "tolerance": GREY_TOLERANCE,
              "checked": [list(c) for c in CHECKED], "passed": worst <= GREY_TOLERANCE}
    if not result["passed"]:
        raise ParityError(f"{NAMES[yuv]}: the TensorRT engine's frames differ from the host's "
                          f"resize by {worst:.3g} grey levels > {GREY_TOLERANCE}")
    return result
