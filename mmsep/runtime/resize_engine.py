"""The frame resize as one resolution-independent graph, for TensorRT.

``resize_graph`` builds one ONNX Runtime graph per input resolution: its band indices and weights
are constants, and it gathers uint8 pixels. Neither suits TensorRT, which builds an engine ahead
of time and accepts uint8 only at the network's inputs and outputs and in casts to or from float
(TensorRT's ``DataType.UINT8``). This graph therefore takes the bands as inputs, so that one
engine built by ``mmsep-export`` serves every resolution within its optimisation profile
(``ENGINE_PROFILE``), and casts the uint8 frames to float32 first (exact for 0..255). The
arithmetic is ``resize_graph``'s: the same three-part weights and carried rounding, PIL's grey
levels bit for bit.

Inputs (``engine_inputs`` makes all but the frames, for one model input at one resolution):

- ``frames`` uint8 (F, H, W, 3): RGB frames, at most ``MAX_FRAMES`` per call;
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

from .resize import clip_plan, sync_plan
from .resize_graph import BAND_BLOCK, HALF, PART_BITS, GraphBuilder, round_grey, band, weight_parts

MAX_FRAMES = 8  # frames per engine call: the profile's maximum bounds the engine's memory
MAX_SIDE = 1920  # input height and width (1080p either way up); larger videos resize on the host
MAX_BANDS = 12  # output bands per pass: 384 / BAND_BLOCK
MAX_SPAN = 384  # inputs one band reads: (BAND_BLOCK + 4) * downscale, with room to spare
INPUT_NAMES = ("frames", "col_index", "col_weights", "row_index", "row_weights", "scale",
               "offset")
OUTPUT_NAME = "pixels"


def _profile() -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) shape per input; opt is a 720p clip window's CLIP input."""
    parts = 3 * BAND_BLOCK
    band_shapes = {"index": ((1, 1), (12, 128), (MAX_BANDS, MAX_SPAN)),
                   "weights": ((1, 1, parts), (12, 128, parts), (MAX_BANDS, MAX_SPAN, parts))}
    shapes = {"frames": ((1, 1, 1, 3), (MAX_FRAMES, 720, 1280, 3),
                         (MAX_FRAMES, MAX_SIDE, MAX_SIDE, 3)),
              "scale": ((1,), (1,), (1,)), "offset": ((1,), (1,), (1,))}
    for pass_ in ("col", "row"):
        shapes[f"{pass_}_index"] = band_shapes["index"]
        shapes[f"{pass_}_weights"] = band_shapes["weights"]
    return {name: shapes[name] for name in INPUT_NAMES}


ENGINE_PROFILE = _profile()


PLANS = {"clip": clip_plan, "sync": sync_plan}


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
        low, _, high = ENGINE_PROFILE[name]
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


def engine_graph() -> bytes:
    """The serialised graph (opset 17, float32, uint8 only at the input cast)."""
    import onnx
    from onnx import TensorProto, helper

    g = GraphBuilder()
    for name, value in (("half", HALF), ("zero", 0.0), ("top", 255.0),
                        ("part_unit", 2.0 ** -PART_BITS), ("high_unit", 2.0 ** -8)):
        g.constant(name, value, np.float32)
    g.constant("merge_bands", [0, 0, 0, -1], np.int64)
    pixels = g.node("Cast", ["frames"], "frames_float", to=TensorProto.FLOAT)
    planes = g.node("Transpose", [pixels], "planes", perm=[0, 3, 1, 2])  # (F, 3, H, W)
    tall = _pass(g, planes, "col")  # (F, 3, out_w, H)
    grey = _pass(g, tall, "row")  # (F, 3, out_h, out_w)
    scaled = g.node("Mul", [grey, "scale"], "scaled")
    g.node("Add", [scaled, "offset"], OUTPUT_NAME)
    types = {"frames": TensorProto.UINT8, "col_index": TensorProto.INT32,
             "row_index": TensorProto.INT32}
    dims = {"frames": ["frames", "height", "width", 3], "scale": [1], "offset": [1]}
    for pass_ in ("col", "row"):
        dims[f"{pass_}_index"] = [f"{pass_}_bands", f"{pass_}_span"]
        dims[f"{pass_}_weights"] = [f"{pass_}_bands", f"{pass_}_span", 3 * BAND_BLOCK]
    inputs = [helper.make_tensor_value_info(name, types.get(name, TensorProto.FLOAT), dims[name])
              for name in INPUT_NAMES]
    output = helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT,
                                           ["frames", 3, "out_height", "out_width"])
    graph = helper.make_graph(g.nodes, "mmsep_frame_resize_engine", inputs, [output],
                              g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="mmsep")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()
