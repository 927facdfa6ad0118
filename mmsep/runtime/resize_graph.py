"""The ONNX graph that ``resize.FrameResizer`` runs: both model inputs of a window from its uint8
frames (RGB, or yuv420p planes converted with swscale's measured tables), on the device.

Each resize pass is banded: a bicubic output reads only a few neighbouring inputs (about four
times the downscale factor), so a dense ``(W, out)`` matrix product would multiply mostly zeros
(at 1280 -> 384, 1 weight in 27 is non-zero). The outputs are split into blocks of
``BAND_BLOCK`` consecutive ones; each block reads one contiguous run of inputs, gathered once,
and its weights form a small dense matrix, so one batched MatMul does the pass. The products and
sums are those of the dense product in another order, exact in float64 (see ``resize``), so the
result is still PIL's bit for bit. The graph is built with the ``onnx`` package, imported only
here.
"""

from __future__ import annotations

import numpy as np

from .pixels import YUV_PLANES
from .resize import ResizePlan

BAND_BLOCK = 32  # outputs per block of a banded pass


def band(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A resize matrix (out, in) as blocks: ``index`` (K, span) int64, the inputs each block
    reads, and ``weights`` (K, span, BAND_BLOCK) float64, so that block k's outputs are
    ``inputs[index[k]] @ weights[k]`` (the last block's extra outputs are zero)."""
    out, size = matrix.shape
    blocks = -(-out // BAND_BLOCK)
    nonzero = matrix != 0
    first = nonzero.argmax(axis=1)
    last = size - 1 - nonzero[:, ::-1].argmax(axis=1)
    starts = np.array([first[k * BAND_BLOCK:(k + 1) * BAND_BLOCK].min() for k in range(blocks)])
    stops = np.array([last[k * BAND_BLOCK:(k + 1) * BAND_BLOCK].max() + 1 for k in range(blocks)])
    span = int((stops - starts).max())
    starts = np.minimum(starts, size - span)
    weights = np.zeros((blocks, span, BAND_BLOCK), np.float64)
    for k, start in enumerate(starts):
        rows = matrix[k * BAND_BLOCK:(k + 1) * BAND_BLOCK, start:start + span]
        weights[k, :, :len(rows)] = rows.T
    index = starts[:, None] + np.arange(span)[None, :]
    assert np.array_equal(weights.sum(axis=1).reshape(-1)[:out], matrix.sum(axis=1)), \
        "a band lost weights"
    return index.astype(np.int64), weights


class _Graph:
    """Nodes and initializers of a graph under construction."""

    def __init__(self):
        self.nodes, self.initializers = [], []

    def node(self, op: str, inputs: list[str], output: str, **attributes) -> str:
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, [output], **attributes))
        return output

    def constant(self, name: str, value, dtype=np.float64) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name


def _round_grey(g: _Graph, value: str, name: str) -> str:
    """PIL's rounding of a pass: half up, clamped to [0, 255]."""
    up = g.node("Add", [value, "half"], f"{name}_up")
    floor = g.node("Floor", [up], f"{name}_floor")
    return g.node("Clip", [floor, "zero", "top"], name)


def _columns_pass(g: _Graph, planes: str, cols: np.ndarray, name: str) -> str:
    """uint8 (n, 3, H, W) -> float64 grey levels (n, 3, H, out_w)."""
    from onnx import TensorProto

    index, weights = band(cols.T)
    runs = g.node("Gather", [planes, g.constant(f"{name}_index", index, np.int64)],
                  f"{name}_runs", axis=3)  # (n, 3, H, K, span), still uint8
    runs = g.node("Transpose", [runs], f"{name}_blocks", perm=[0, 1, 3, 2, 4])
    runs = g.node("Cast", [runs], f"{name}_in", to=TensorProto.DOUBLE)
    summed = g.node("MatMul", [runs, g.constant(f"{name}_weights", weights)], f"{name}_sum")
    summed = g.node("Transpose", [summed], f"{name}_rows", perm=[0, 1, 3, 2, 4])  # (n,3,H,K,B)
    flat = g.node("Reshape", [summed, g.constant(f"{name}_flat", [0, 0, 0, -1], np.int64)],
                  f"{name}_flat_out")
    kept = g.node("Slice", [flat, g.constant(f"{name}_start", [0], np.int64),
                            g.constant(f"{name}_stop", [cols.shape[1]], np.int64),
                            g.constant(f"{name}_axis", [3], np.int64)], f"{name}_kept")
    return _round_grey(g, kept, name)


def _rows_pass(g: _Graph, wide: str, rows: np.ndarray, out_w: int, name: str) -> str:
    """float64 (n, 3, H, out_w) -> grey levels (n, 3, out_h, out_w)."""
    index, weights = band(rows)
    runs = g.node("Gather", [wide, g.constant(f"{name}_index", index, np.int64)],
                  f"{name}_runs", axis=2)  # (n, 3, K, span, out_w)
    weights = g.constant(f"{name}_weights", weights.transpose(0, 2, 1))  # (K, B, span)
    summed = g.node("MatMul", [weights, runs], f"{name}_sum")  # (n, 3, K, B, out_w)
    flat = g.node("Reshape", [summed, g.constant(f"{name}_flat", [0, 0, -1, out_w], np.int64)],
                  f"{name}_flat_out")
    kept = g.node("Slice", [flat, g.constant(f"{name}_start", [0], np.int64),
                            g.constant(f"{name}_stop", [rows.shape[0]], np.int64),
                            g.constant(f"{name}_axis", [2], np.int64)], f"{name}_kept")
    return _round_grey(g, kept, name)


def _stream(g: _Graph, name: str, plan: ResizePlan, pick: str, output: str) -> None:
    """One model input: pick its frames, both passes, then the stage's value mapping."""
    from onnx import TensorProto

    frames = g.node("Gather", ["planes", pick], f"{name}_u8", axis=0)
    wide = _columns_pass(g, frames, plan.cols, f"{name}_wide")
    grey = _rows_pass(g, wide, plan.rows, plan.out_size[1], f"{name}_grey")
    grey = g.node("Cast", [grey], f"{name}_q", to=TensorProto.FLOAT)
    scaled = g.node("Mul", [grey, g.constant(f"{name}_scale", plan.scale, np.float32)],
                    f"{name}_scaled")
    g.node("Add", [scaled, g.constant(f"{name}_offset", plan.offset, np.float32)], output)


def resize_graph(clip: ResizePlan, sync: ResizePlan, conversion=None) -> bytes:
    """The serialised graph for one input resolution; with a ``pixels.YuvConversion`` it takes
    yuv420p planes instead of RGB frames."""
    import onnx
    from onnx import TensorProto, helper

    height, width = clip.rows.shape[1], clip.cols.shape[0]
    g = _Graph()
    for name, value in (("half", 0.5), ("zero", 0.0), ("top", 255.0)):
        g.constant(name, value)
    if conversion is None:
        inputs = [helper.make_tensor_value_info("frames", TensorProto.UINT8,
                                                ["frames", height, width, 3])]
    else:
        inputs = _yuv_to_rgb(g, conversion, height, width)
    g.node("Transpose", ["frames"], "planes", perm=[0, 3, 1, 2])  # channels first, uint8
    _stream(g, "clip", clip, "clip_index", "clip")
    _stream(g, "sync", sync, "sync_frames", "sync_all")
    g.node("Gather", ["sync_all", "segment_index"], "segments", axis=0)
    inputs += [helper.make_tensor_value_info("clip_index", TensorProto.INT64, ["clip_frames"]),
               helper.make_tensor_value_info("sync_frames", TensorProto.INT64, ["sync_frames"]),
               helper.make_tensor_value_info("segment_index", TensorProto.INT64,
                                             ["segments", "segment_frames"])]
    outputs = [helper.make_tensor_value_info("clip", TensorProto.FLOAT,
                                             ["clip_frames", 3, *clip.out_size]),
               helper.make_tensor_value_info("segments", TensorProto.FLOAT,
                                             ["segments", "segment_frames", 3, *sync.out_size])]
    graph = helper.make_graph(g.nodes, "mmsep_frame_resize", inputs, outputs, g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="mmsep")
    model.ir_version = 8  # readable by every ONNX Runtime the runtime supports
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _yuv_to_rgb(g: _Graph, conversion, height: int, width: int) -> list:
    """Inputs and nodes that make uint8 RGB ``frames`` (N, H, W, 3) from yuv420p planes with
    ``conversion``'s tables: each plane's table looked up (float32, exact for these small
    integers), the chroma terms repeated over their 2 x 2 blocks, summed, clamped."""
    from onnx import TensorProto, helper

    chroma_h, chroma_w = (height + 1) // 2, (width + 1) // 2
    sizes = ((height, width), (chroma_h, chroma_w), (chroma_h, chroma_w))
    inputs = [helper.make_tensor_value_info(name, TensorProto.UINT8, ["frames", *size])
              for name, size in zip(YUV_PLANES, sizes)]
    for name, table in zip(YUV_PLANES, (conversion.luma, conversion.blue, conversion.red)):
        at = g.node("Cast", [name], f"{name}_at", to=TensorProto.INT32)
        g.node("Gather", [g.constant(f"{name}_table", table, np.float32), at], f"{name}_term",
               axis=0)
    chroma = g.node("Add", ["cb_term", "cr_term"], "chroma")
    blocks = g.node("Unsqueeze", [chroma, g.constant("block_axes", [2, 4], np.int64)],
                    "chroma_blocks")  # (N, h, 1, w, 1, 3)
    repeated = g.node("Mul", [blocks, g.constant("blocks", np.ones((1, 1, 2, 1, 2, 1)),
                                                 np.float32)], "chroma_repeated")
    wide = g.node("Reshape", [repeated, g.constant(
        "chroma_shape", [-1, 2 * chroma_h, 2 * chroma_w, 3], np.int64)], "chroma_wide")
    full = g.node("Slice", [wide, g.constant("crop_start", [0, 0], np.int64),
                            g.constant("crop_stop", [height, width], np.int64),
                            g.constant("crop_axes", [1, 2], np.int64)], "chroma_full")
    summed = g.node("Add", ["luma_term", full], "rgb_sum")
    clamped = g.node("Clip", [summed, g.constant("rgb_min", 0.0, np.float32),
                              g.constant("rgb_max", 255.0, np.float32)], "rgb_float")
    g.node("Cast", [clamped], "frames", to=TensorProto.UINT8)
    return inputs
