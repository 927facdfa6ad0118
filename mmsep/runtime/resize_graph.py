"""The ONNX graph that ``resize.FrameResizer`` runs: both model inputs of a window from its uint8
frames (RGB, or yuv420p planes converted with swscale's measured tables), on the device.

Each resize pass is banded: a bicubic output reads only a few neighbouring inputs (about four
times the downscale factor), so a dense ``(W, out)`` matrix product would multiply mostly zeros
(at 1280 -> 384, 1 weight in 27 is non-zero). The outputs are split into blocks of
``BAND_BLOCK`` consecutive ones; each block reads one contiguous run of inputs, gathered once,
and its weights form a small dense matrix, so one batched MatMul does the pass.

The arithmetic is float32 and exact, with no float64 (which TensorRT lacks and most GPUs other
than data-centre parts run at 1/32 to 1/64 of their float32 rate). PIL's coefficients are
integers in units of 2**-22; each is split into three integer parts of at most 8 significant
bits (``weight_parts``), and one MatMul against the three side by side gives three integer
partial sums, each below 2**24 (exact in float32 whatever the summation order, and exact even
where the device multiplies in TF32 or float16 with float32 accumulation). PIL's rounding,
floor(sum + 1/2), is then taken from the three sums by carrying from the lowest part up
(``round_grey``), again in integers below 2**24. The result is PIL's grey levels bit for bit,
like ``resize.resize_frames``'s float64 products. The graph is built with the ``onnx`` package,
imported only here.
"""

from __future__ import annotations

import numpy as np

from .pixels import RGB_INPUT, YUV_PLANES, chroma_size
from .resize import PRECISION_BITS, ResizePlan

BAND_BLOCK = 32  # outputs per block of a banded pass
PART_BITS = 7  # a weight's 22 fixed-point bits in three integer parts (8, 7, 7 bits)
PART_MASK = (1 << PART_BITS) - 1
HALF = float(1 << (PRECISION_BITS - 1))  # one half, in units of 2**-22
EXACT_FLOAT32 = 1 << 24  # integers below this are exact in float32


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


class GraphBuilder:
    """Nodes and initializers of a graph under construction."""

    def __init__(self):
        self.nodes, self.initializers = [], []

    def node(self, op: str, inputs: list[str], output: str | list[str], **attributes):
        """Add one node; returns its output name (or names, given a list)."""
        from onnx import helper

        outputs = [output] if isinstance(output, str) else output
        self.nodes.append(helper.make_node(op, inputs, outputs, **attributes))
        return output

    def constant(self, name: str, value, dtype) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name


def weight_parts(weights: np.ndarray, axis: int) -> np.ndarray:
    """Weights (multiples of 2**-22) as three float32 integer parts concatenated along ``axis``:
    ``w * 2**22 = high * 2**14 + middle * 2**7 + low`` with middle and low in [0, 128)."""
    fixed = np.rint(weights * (1 << PRECISION_BITS)).astype(np.int64)
    assert np.array_equal(fixed / (1 << PRECISION_BITS), weights), "not PIL's fixed point"
    parts = [fixed >> 2 * PART_BITS, (fixed >> PART_BITS) & PART_MASK, fixed & PART_MASK]
    parts = np.concatenate(parts, axis=axis).astype(np.float32)
    # every partial sum of 255 * part, plus the half added in rounding, stays an exact float32
    span_axis = 1 if axis == 2 else 2
    assert 255 * np.abs(parts).sum(axis=span_axis).max() + HALF < EXACT_FLOAT32
    return parts


def round_grey(g: GraphBuilder, summed: str, axis: int, name: str) -> str:
    """PIL's rounding of a pass, floor(S + 1/2) clamped to [0, 255], from the three partial sums,
    the equal thirds of ``axis``: S * 2**22 = A * 2**14 + B * 2**7 + C. The carries go from C
    up to A, so every value is an integer below 2**24 and exact in float32."""
    high, middle, low = g.node("Split", [summed],
                               [f"{name}_{part}" for part in ("high", "middle", "low")], axis=axis)
    low = g.node("Add", [low, "half"], f"{name}_low_up")
    carry = g.node("Floor", [g.node("Mul", [low, "part_unit"], f"{name}_low_shift")],
                   f"{name}_low_carry")
    middle = g.node("Add", [middle, carry], f"{name}_middle_up")
    carry = g.node("Floor", [g.node("Mul", [middle, "part_unit"], f"{name}_middle_shift")],
                   f"{name}_middle_carry")
    high = g.node("Add", [high, carry], f"{name}_high_up")
    grey = g.node("Floor", [g.node("Mul", [high, "high_unit"], f"{name}_high_shift")],
                  f"{name}_floor")
    return g.node("Clip", [grey, "zero", "top"], name)


def _join_blocks(g: GraphBuilder, blocks: str, shape: list[int], axis: int, size: int,
                 name: str) -> str:
    """Blocks of outputs reshaped to ``shape`` (the block axes merged into ``axis``), then the
    last block's padding cut so that ``axis`` holds ``size`` outputs."""
    flat = g.node("Reshape", [blocks, g.constant(f"{name}_flat", shape, np.int64)],
                  f"{name}_flat_out")
    return g.node("Slice", [flat, g.constant(f"{name}_start", [0], np.int64),
                            g.constant(f"{name}_stop", [size], np.int64),
                            g.constant(f"{name}_axis", [axis], np.int64)], name)


def _columns_pass(g: GraphBuilder, planes: str, cols: np.ndarray, name: str) -> str:
    """uint8 (n, 3, H, W) -> float32 grey levels (n, 3, H, out_w)."""
    from onnx import TensorProto

    index, weights = band(cols.T)
    runs = g.node("Gather", [planes, g.constant(f"{name}_index", index, np.int64)],
                  f"{name}_runs", axis=3)  # (n, 3, H, K, span), still uint8
    runs = g.node("Transpose", [runs], f"{name}_blocks", perm=[0, 1, 3, 2, 4])
    runs = g.node("Cast", [runs], f"{name}_in", to=TensorProto.FLOAT)
    parts = g.constant(f"{name}_weights", weight_parts(weights, axis=2), np.float32)
    summed = g.node("MatMul", [runs, parts], f"{name}_sum")  # (n, 3, K, H, 3 * B)
    grey = round_grey(g, summed, 4, f"{name}_grey")
    grey = g.node("Transpose", [grey], f"{name}_rows", perm=[0, 1, 3, 2, 4])  # (n, 3, H, K, B)
    return _join_blocks(g, grey, [0, 0, 0, -1], 3, cols.shape[1], name)


def _rows_pass(g: GraphBuilder, wide: str, rows: np.ndarray, out_w: int, name: str) -> str:
    """float32 grey levels (n, 3, H, out_w) -> (n, 3, out_h, out_w)."""
    index, weights = band(rows)
    runs = g.node("Gather", [wide, g.constant(f"{name}_index", index, np.int64)],
                  f"{name}_runs", axis=2)  # (n, 3, K, span, out_w)
    parts = weight_parts(weights.transpose(0, 2, 1), axis=1)  # (K, 3 * B, span)
    summed = g.node("MatMul", [g.constant(f"{name}_weights", parts, np.float32), runs],
                    f"{name}_sum")  # (n, 3, K, 3 * B, out_w)
    grey = round_grey(g, summed, 3, f"{name}_grey")
    return _join_blocks(g, grey, [0, 0, -1, out_w], 2, rows.shape[0], name)


def _stream(g: GraphBuilder, name: str, plan: ResizePlan, pick: str, output: str) -> None:
    """One model input: pick its frames, both passes, then the stage's value mapping."""
    frames = g.node("Gather", ["planes", pick], f"{name}_u8", axis=0)
    wide = _columns_pass(g, frames, plan.cols, f"{name}_wide")
    grey = _rows_pass(g, wide, plan.rows, plan.out_size[1], f"{name}_tall")
    scaled = g.node("Mul", [grey, g.constant(f"{name}_scale", plan.scale, np.float32)],
                    f"{name}_scaled")
    g.node("Add", [scaled, g.constant(f"{name}_offset", plan.offset, np.float32)], output)


def resize_graph(clip: ResizePlan, sync: ResizePlan, conversion=None) -> bytes:
    """The serialised graph for one input resolution; with a ``pixels.YuvConversion`` it takes
    yuv420p planes instead of RGB frames."""
    from onnx import TensorProto, helper

    height, width = clip.rows.shape[1], clip.cols.shape[0]
    g = GraphBuilder()
    for name, value in (("half", HALF), ("zero", 0.0), ("top", 255.0),
                        ("part_unit", 2.0 ** -PART_BITS), ("high_unit", 2.0 ** -8)):
        g.constant(name, value, np.float32)
    if conversion is None:
        inputs = [helper.make_tensor_value_info(RGB_INPUT, TensorProto.UINT8,
                                                ["frames", height, width, 3])]
        g.node("Transpose", [RGB_INPUT], "planes", perm=[0, 3, 1, 2])  # channels first, uint8
    else:
        inputs = _yuv_to_rgb(g, conversion, height, width)
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
    return _serialised(g, "mmsep_frame_resize", inputs, outputs)


def gather_graph() -> bytes:
    """The graph that picks the Synchformer segments (``segment_index``, (segments,
    segment_frames)) out of the resized frames ``sync_all`` (frames, 3, S, S), for a window
    resized in several calls (``FrameResizer``), whose frames stay on the device."""
    from onnx import TensorProto, helper

    g = GraphBuilder()
    g.node("Gather", ["sync_all", "segment_index"], "segments", axis=0)
    inputs = [helper.make_tensor_value_info("sync_all", TensorProto.FLOAT,
                                            ["sync_frames", 3, "size", "size"]),
              helper.make_tensor_value_info("segment_index", TensorProto.INT64,
                                            ["segments", "segment_frames"])]
    outputs = [helper.make_tensor_value_info("segments", TensorProto.FLOAT,
                                             ["segments", "segment_frames", 3, "size", "size"])]
    return _serialised(g, "mmsep_segment_gather", inputs, outputs)


def _serialised(g: GraphBuilder, name: str, inputs: list, outputs: list) -> bytes:
    import onnx
    from onnx import helper

    graph = helper.make_graph(g.nodes, name, inputs, outputs, g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="mmsep")
    model.ir_version = 8  # readable by every ONNX Runtime the runtime supports
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _yuv_to_rgb(g: GraphBuilder, conversion, height: int, width: int) -> list:
    """Inputs and nodes that make uint8 RGB ``planes`` (N, 3, H, W) from yuv420p planes with
    ``conversion``'s tables, one channel at a time (so that the float intermediates are one
    channel's, 4 bytes per pixel): each plane's table looked up (float32, exact for these small
    integers), the chroma terms repeated over their 2 x 2 blocks, summed, clamped."""
    from onnx import TensorProto, helper

    chroma_h, chroma_w = chroma_size(height, width)
    sizes = ((height, width), (chroma_h, chroma_w), (chroma_h, chroma_w))
    inputs = [helper.make_tensor_value_info(name, TensorProto.UINT8, ["frames", *size])
              for name, size in zip(YUV_PLANES, sizes)]
    at = {name: g.node("Cast", [name], f"{name}_at", to=TensorProto.INT32) for name in YUV_PLANES}
    for name, value in (("block_axes", [2, 4]), ("chroma_shape", [0, 2 * chroma_h, 2 * chroma_w]),
                        ("crop_start", [0, 0]), ("crop_stop", [height, width]),
                        ("crop_axes", [1, 2]), ("channel_axis", [1])):
        g.constant(name, value, np.int64)
    g.constant("blocks", np.ones((1, 1, 2, 1, 2)), np.float32)
    g.constant("rgb_min", 0.0, np.float32)
    g.constant("rgb_max", 255.0, np.float32)
    channels = []
    for c, colour in enumerate("rgb"):
        terms = {name: g.node("Gather", [g.constant(f"{colour}_{name}_table", table[:, c],
                                                    np.float32), at[name]],
                              f"{colour}_{name}_term", axis=0)
                 for name, table in zip(YUV_PLANES, (conversion.luma, conversion.blue,
                                                     conversion.red))}
        chroma = g.node("Add", [terms["cb"], terms["cr"]], f"{colour}_chroma")  # (N, h, w)
        blocks = g.node("Unsqueeze", [chroma, "block_axes"], f"{colour}_chroma_blocks")
        repeated = g.node("Mul", [blocks, "blocks"], f"{colour}_chroma_repeated")
        wide = g.node("Reshape", [repeated, "chroma_shape"], f"{colour}_chroma_wide")
        full = g.node("Slice", [wide, "crop_start", "crop_stop", "crop_axes"],
                      f"{colour}_chroma_full")
        summed = g.node("Add", [terms["luma"], full], f"{colour}_sum")
        clamped = g.node("Clip", [summed, "rgb_min", "rgb_max"], f"{colour}_float")
        grey = g.node("Cast", [clamped], f"{colour}_u8", to=TensorProto.UINT8)
        channels.append(g.node("Unsqueeze", [grey, "channel_axis"], f"{colour}_plane"))
    g.node("Concat", channels, "planes", axis=1)
    return inputs
