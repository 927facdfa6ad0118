"""The frame-resize engine (``runtime.resize_engine``): built beside the stage engines, so that
the TensorRT backend resizes video frames on the GPU, and checked against the host's resize.

It does not depend on the model: its key covers the graph and the machine only, and a re-export
reuses it like any other unchanged engine.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from ..runtime.atomic import write_bytes_atomically
from ..runtime.resize import resize_frames
from ..runtime.resize_engine import ENGINE_PROFILE, MAX_FRAMES, OUTPUT_NAME, PLANS, \
    engine_graph, engine_inputs
from . import tensorrt_build as tb
from .errors import ParityError

NAME = "frame_resize"
CHECKED = ((MAX_FRAMES, 241, 321), (2, 1080, 1920))  # (frames, height, width) run at export
GREY_TOLERANCE = 0.01  # grey levels; the graph is exact, and a rounding slip costs one level
STREAMS = (("clip", 384, 1.0), ("sync", 224, 2.0))  # the model inputs: name, size, value span


def engine_key(graph: bytes, info: dict) -> str:
    payload = {"graph": hashlib.sha256(graph).hexdigest(), "tensorrt": info["version"],
               "gpu": info["gpu"], "compute_capability": info["compute_capability"]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def build_frame_resize_engine(model_dir: Path, info: dict, *, timing_cache: Path,
                              previous: dict | None = None,
                              workspace_bytes: int | None = None) -> tuple[dict, bool]:
    """The manifest record of ``frame_resize.engine`` in ``model_dir`` (built and checked, or
    reused from ``previous``, a manifest with its directory under "_dir") and whether it was
    built."""
    graph = engine_graph()
    key = engine_key(graph, info)
    engine_path = model_dir / f"{NAME}.engine"
    old = ((previous or {}).get("tensorrt") or {}).get(NAME)
    reused = tb.reuse_engine(old, key, engine_path, previous)
    if reused is not None:
        return reused, False
    onnx_path = model_dir / f"{NAME}.onnx"
    write_bytes_atomically(onnx_path, graph)
    built = tb.build_graph_engine(onnx_path, NAME, ENGINE_PROFILE, [OUTPUT_NAME], engine_path,
                                  timing_cache=timing_cache, workspace_bytes=workspace_bytes)
    return {**built, "key": key, "onnx": onnx_path.name,
            "parity": check_frame_resize_engine(engine_path)}, True


def check_frame_resize_engine(engine_path: Path, seed: int = 1) -> dict:
    """The engine on random frames at ``CHECKED``'s sizes against ``resize.resize_frames``
    (PIL's grey levels): the largest difference in grey levels; ParityError beyond
    ``GREY_TOLERANCE``."""
    import torch

    from .tensorrt_parity import run_graph_engine

    rng = np.random.default_rng(seed)
    worst = 0.0
    for frames, height, width in CHECKED:
        pixels = rng.integers(0, 256, (frames, height, width, 3), np.uint8)
        for stream, size, span in STREAMS:
            inputs = {"frames": pixels, **engine_inputs(stream, height, width, size)}
            got = run_graph_engine(engine_path, NAME,
                                   {k: torch.from_numpy(np.array(v)) for k, v in inputs.items()},
                                   {OUTPUT_NAME: torch.float32})[OUTPUT_NAME].cpu().numpy()
            want = resize_frames(pixels, PLANS[stream](height, width, size))
            diff = np.abs(got.astype(np.float64) - want).max() * 255 / span
            worst = max(worst, float(diff))
    result = {"max_grey_levels": worst, "tolerance": GREY_TOLERANCE,
              "checked": [list(c) for c in CHECKED], "passed": worst <= GREY_TOLERANCE}
    if not result["passed"]:
        raise ParityError(f"{NAME}: the TensorRT engine's frames differ from the host's resize "
                          f"by {worst:.3g} grey levels > {GREY_TOLERANCE}")
    return result
