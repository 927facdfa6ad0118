"""The frame resize as resolution-independent graphs, for TensorRT.

``resize_graph`` builds one ONNX Runtime graph per input resolution: its band indices and weights
are constants, and it gathers uint8 pixels. Neither suits TensorRT, which builds an engine ahead
of time and accepts uint8 only at the network's inputs and outputs and in casts to or from float
(TensorRT's ``DataType.UINT8``). These graphs therefore take the bands as inputs, so that one
engine built by ``mmsep-export`` serves every resolution within its optimisation profile
(``engine_profile``), and cast the uint8 pixels to float32 first (exact for 0..255). The
arithmetic is ``resize_graph``'s: the same three-part weights and carried rounding, PIL's grey
levels bit for bit. One graph takes RGB frames, the other (``yuv``) the decoder's yuv420p planes
and converts them as ``pixels.YuvConversion.to_rgb`` does, with the conversion's tables as
inputs and the chroma upsampling shaped from the planes.

Inputs (``engine_inputs`` makes the band inputs, for one model input at one resolution;
``table_inputs`` the tables of one conversion):

- ``frames`` uint8 (F, H, W, 3): RGB frames, at most ``MAX_FRAMES`` per call; or ``luma`` (F,
  H, W), ``cb`` and ``cr`` (F, ceil(H/2), ceil(W/2)) uint8 and ``luma_table``, ``blue_table``,
  ``red_table`` float32 (256, 3);
- ``col_index`` int32 (Kc, Sc) and ``col_weights`` float32 (Kc, Sc, 3 * BAND_BLOCK): the
  horizontal pass's band (``band`` of a plan's ``cols.T``), weights in three parts;
- ``row_index`` / ``row_weights``: the vertical pass's, in the same layout (its ``rows``);
- ``scale`` and ``offset`` float32 (1,): the stage's value mapping.

Output ``pixels`` float32 (F, 3, Kr * BAND_BLOCK, Kc * BAND_BLOCK). The vertical pass is the
horizontal one on the transposed image, so both use one subgraph; the output size is a whole
number of bands, which holds for the model's 384 and 224 (``fits``).

TensorRT sizes an engine's activation memory for the largest shapes of its profile. By shape
arithmetic (not measured: no TensorRT here), the largest tensors at the profile's maximum are the
gathered columns, (8, 3, 1920, 12, 384) float32 = 0.85 GB, and its transpose; all 42
intermediate tensors together are 4.4 GB, before any reuse TensorRT makes of their memory (a
layer's memory is free once its readers have run, so the peak is well below the sum).
"""

from __future__ import annotations

import functools

import numpy as np

from .pixels import RGB_INPUT, YUV_PLANES
from .resize import clip_plan, sync_plan
from .resize_graph import BAND_BLOCK, HALF, PART_BITS, GraphBuilder, round_grey, band, weight_parts

MAX_FRAMES = 8  # frames per engine call: the profile's maximum bounds the engine's memory
MAX_SIDE = 1920  # input height and width (1080p either way up); larger videos resize on the host
MAX_BANDS = 12  # output bands per pass: 384 / BAND_BLOCK
MAX_SPAN = 384  # inputs one band reads: (BAND_BLOCK + 4) * downscale, with room to spare
BAND_INPUTS = ("col_index", "col_weights", "row_index", "row_weights", "scale", "offset")
YUV_TABLES = ("luma_table", "blue_table", "red_table")  # pixels.YuvConversion's, as float32
OUTPUT_NAME = "pixels"
ENGINE_NAMES = {False: "frame_resize", True: "frame_resize_yuv"}  # by whether it takes yuv420p
PLANS = {"clip": clip_plan, "sync": sync_plan}


def input_names(yuv: bool = False) -> tuple[str, ...]:
    """The graph's inputs: RGB frames, or yuv420p planes and their conversion's tables; then the
    bands and the value mapping."""
    return (*YUV_PLANES, *YUV_TABLES, *BAND_INPUTS) if yuv else (RGB_INPUT, *BAND_INPUTS)


def _pixel_shapes(yuv: bool) -> dict[str, tuple]:
    """(min, opt, max) shapes of the pixel inputs; opt is a 720p window's CLIP chunk."""
    if not yuv:
        return {RGB_INPUT: ((1, 1, 1, 3), (MAX_FRAMES, 720, 1280, 3),
                            (MAX_FRAMES, MAX_SIDE, MAX_SIDE, 3))}
    luma, cb, cr = YUV_PLANES
    chroma = ((1, 1, 1), (MAX_FRAMES, 360, 640), (MAX_FRAMES, MAX_SIDE // 2, MAX_SIDE // 2))
    table = ((256, 3),) * 3
    return {luma: ((1, 1, 1), (MAX_FRAMES, 720, 1280), (MAX_FRAMES, MAX_SIDE, MAX_SIDE)),
            cb: chroma, cr: chroma, **{name: table for name in YUV_TABLES}}


@functools.lru_cache(maxsize=2)
def engine_profile(yuv: bool = False) -> dict[str, tuple[tuple[int, ...], ...]]:
    """(min, opt, max) shape per input, in the graph's input order."""
    parts = 3 * BAND_BLOCK
    shapes = {"scale": ((1,), (1,), (1,)), "offset": ((1,), (1,), (1,)), **_pixel_shapes(yuv)}
    for pass_ in ("col", "row"):
        shapes[f"{pass_}_index"] = ((1, 1), (12, 128), (MAX_BANDS, MAX_SPAN))
        shapes[f"{pass_}_weights"] = ((1, 1, parts), (12, 128, parts),
                                      (MAX_BANDS, MAX_SPAN, parts))
    return {name: shapes[name] for name in input_names(yuv)}


def table_inputs(conversion) -> dict[str, np.ndarray]:
    """A ``pixels.YuvConversion``'s tables as the YUV graph's inputs (float32: exact for these
    small integers)."""
    tables = (conversion.luma, conversion.blue, conversion.red)
    return {name: np.ascontiguousarray(table, np.float32) for name, table in zip(YUV_TABLES,
                                                                                 tables)}


@functools.lru_cache(maxsize=16)
def engine_inputs(stream: str, height: int, width: int, size: int) -> dict[str, np.ndarray]:
    """The bands and value mapping of one model input (``stream`` "clip" or "sync", output
    ``size``) at one input resolution, as the engine's inputs (every input but ``frames``)."""
    plan = PLANS[stream](height, width, size)
    inputs = {}
    for pass_, matrix in (("col", plan.cols.T), ("row", plan.rows)):
        index, weights = band(matrix)
        inputs[f"{pass_}_index"] = index.astype(np.int32)
        inputs[f"{pass_}_weights"] = weight_parts(weights, axis=2)
    inputs["scale"] = np.array([plan.scale], np.float32)
    inputs["offset"] = np.array([plan.offset], np.float32)
    for value in inputs.values():
        value.setflags(write=False)  # cached: shared by every call at this resolution
    return inputs


def fits(stream: str, height: int, width: int, size: int) -> bool:
    """Whether the engine's profile takes frames of this size for this model input, and its
    output is the input's size (a whole number of bands each way)."""
    if max(height, width) > MAX_SIDE or size % BAND_BLOCK:
        return False
    for name, value in engine_inputs(stream, height, width, size).items():
        low, _, high = engine_profile()[name]
        if any(not lo <= s <= hi for lo, s, hi in zip(low, value.shape, high)):
            return False
    return True


def _pass(g: GraphBuilder, planes: str, pass_: str) -> str:
    """float32 (F, 3, A, W) -> (F, 3, out, A): one banded pass along the last axis, its result
    transposed so that the next pass runs along the other axis."""
    runs = g.node("Gather", [planes, f"{pass_}_index"], f"{pass_}_runs", axis=3)  # (F,3,A,K,S)
    runs = g.node("Transpose", [runs], f"{pass_}_blocks", perm=[0, 1, 3, 2, 4])  # (F,3,K,A,S)
    summed = g.node("MatMul", [runs, f"{pass_}_weights"], f"{pass_}_sum")  # (F,3,K,A,3B)
    grey = round_grey(g, summed, 4, f"{pass_}_grey")  # (F, 3, K, A, B)
    grey = g.node("Transpose", [grey], f"{pass_}_bands", perm=[0, 1, 3, 2, 4])  # (F,3,A,K,B)
    flat = g.node("Reshape", [grey, "merge_bands"], f"{pass_}_flat")  # (F, 3, A, out)
    return g.node("Transpose", [flat], f"{pass_}_out", perm=[0, 1, 3, 2])


def _yuv_to_rgb(g: GraphBuilder) -> str:
    """float32 RGB (F, H, W, 3) from the yuv420p planes: each plane's table looked up (indices
    cast through float32, as TensorRT allows), the chroma terms repeated over their 2 x 2
    blocks and cropped to the luma plane's size, summed and clamped (``YuvConversion.to_rgb``).
    The shapes come from the planes, so one graph serves every resolution."""
    from onnx import TensorProto

    terms = []
    for plane, table in zip(YUV_PLANES, YUV_TABLES):
        grey = g.node("Cast", [plane], f"{plane}_float", to=TensorProto.FLOAT)
        index = g.node("Cast", [grey], f"{plane}_index", to=TensorProto.INT32)
        terms.append(g.node("Gather", [table, index], f"{plane}_term", axis=0))  # (F, *size, 3)
    luma, blue, red = terms
    chroma = g.node("Add", [blue, red], "chroma")  # (F, h, w, 3)
    for name, value in (("block_axes", [2, 4]), ("merge_columns", [0, 0, 0, -1, 3]),
                        ("width_at", [3]), ("width_end", [4]), ("merge_rows", [0, -1]),
                        ("channels", [3]), ("size_at", [1]), ("size_end", [3]),
                        ("crop_start", [0, 0]), ("crop_axes", [1, 2])):
        g.constant(name, value, np.int64)
    g.constant("blocks", np.ones((1, 1, 2, 1, 2, 1)), np.float32)
    blocks = g.node("Unsqueeze", [chroma, "block_axes"], "chroma_blocks")  # (F, h, 1, w, 1, 3)
    repeated = g.node("Mul", [blocks, "blocks"], "chroma_repeated")  # (F, h, 2, w, 2, 3)
    wide = g.node("Reshape", [repeated, "merge_columns"], "chroma_wide")  # (F, h, 2, 2w, 3)
    width = g.node("Slice", [g.node("Shape", [wide], "chroma_wide_shape"), "width_at",
                             "width_end"], "chroma_width")
    shape = g.node("Concat", ["merge_rows", width, "channels"], "chroma_shape", axis=0)
    full = g.node("Reshape", [wide, shape], "chroma_full")  # (F, 2h, 2w, 3)
    size = g.node("Slice", [g.node("Shape", ["luma_float"], "luma_shape"), "size_at",
                            "size_end"], "luma_size")
    crop = g.node("Slice", [full, "crop_start", size, "crop_axes"], "chroma_crop")
    return g.node("Clip", [g.node("Add", [luma, crop], "rgb_sum"), "zero", "top"],
                  "frames_float")


def _inputs(yuv: bool) -> list:
    from onnx import TensorProto, helper

    luma, cb, cr = YUV_PLANES
    types = {RGB_INPUT: TensorProto.UINT8, "col_index": TensorProto.INT32,
             "row_index": TensorProto.INT32, **{p: TensorProto.UINT8 for p in YUV_PLANES}}
    dims = {RGB_INPUT: ["frames", "height", "width", 3], "scale": [1], "offset": [1],
            luma: ["frames", "height", "width"], cb: ["frames", "chroma_h", "chroma_w"],
            cr: ["frames", "chroma_h", "chroma_w"], **{t: [256, 3] for t in YUV_TABLES}}
    for pass_ in ("col", "row"):
        dims[f"{pass_}_index"] = [f"{pass_}_bands", f"{pass_}_span"]
        dims[f"{pass_}_weights"] = [f"{pass_}_bands", f"{pass_}_span", 3 * BAND_BLOCK]
    return [helper.make_tensor_value_info(name, types.get(name, TensorProto.FLOAT), dims[name])
            for name in input_names(yuv)]


@functools.lru_cache(maxsize=2)
def engine_graph(yuv: bool = False) -> bytes:
    """The serialised graph (opset 17, float32; uint8 only where the inputs are cast), taking
    RGB frames or, with ``yuv``, yuv420p planes and their conversion's tables."""
    import onnx
    from onnx import TensorProto, helper

    g = GraphBuilder()
    for name, value in (("half", HALF), ("zero", 0.0), ("top", 255.0),
                        ("part_unit", 2.0 ** -PART_BITS), ("high_unit", 2.0 ** -8)):
        g.constant(name, value, np.float32)
    g.constant("merge_bands", [0, 0, 0, -1], np.int64)
    pixels = _yuv_to_rgb(g) if yuv else g.node("Cast", [RGB_INPUT], "frames_float",
                                               to=TensorProto.FLOAT)
    planes = g.node("Transpose", [pixels], "planes", perm=[0, 3, 1, 2])  # (F, 3, H, W)
    tall = _pass(g, planes, "col")  # (F, 3, out_w, H)
    grey = _pass(g, tall, "row")  # (F, 3, out_h, out_w)
    scaled = g.node("Mul", [grey, "scale"], "scaled")
    g.node("Add", [scaled, "offset"], OUTPUT_NAME)
    output = helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT,
                                           ["frames", 3, "out_height", "out_width"])
    graph = helper.make_graph(g.nodes, "mmsep_frame_resize_engine", _inputs(yuv), [output],
                              g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="mmsep")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()
