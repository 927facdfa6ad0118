"""The mixed-precision plan: which nodes of an fp32 stage graph compute in fp16 / bf16 and which
stay fp32 (``plan``); ``precision_rewrite.py`` applies it, ``mixed_precision.py`` drives both.

TensorRT 11 builds only strongly typed networks (10.x does so with the STRONGLY_TYPED creation
flag): every tensor's type comes from the ONNX graph, so the mixed precision is decided here, once,
in the graph. The pass classifies every node as computing in the reduced type or in fp32 and then
inserts the Casts that make the types agree:

* arithmetic that is numerically sensitive stays fp32, each with a recorded reason:
  - ``normalization``: LayerNormalization and friends (their statistics overflow fp16);
  - ``reduction``: ReduceMean/ReduceL2/... (sums of squares overflow fp16: the VAE pixel norm);
  - ``power``: Pow, Sqrt, Reciprocal (the RMS norms' statistics, x**2 overflows fp16);
  - ``transcendental``: Sin, Cos, Exp, Log (arguments lose whole radians or overflow in fp16);
  - ``stage arithmetic``: what a stage wrapper computes itself, outside every submodule's
    forward (including methods it calls, such as MMAudioFlow.velocity or encode_text) - the
    denoiser's guidance mix and Euler update ``x + dt * v`` (x is fp32 and dt * v is a small
    correction to it), the conditioning sums, latent (un)normalisation, output L2 normalisation;
  - ``fp32 inputs``: a pointwise op whose every non-constant float input is already fp32 stays
    fp32 (e.g. the timestep embedding's ``t * freqs`` on the fp32 input t, whose max_period=1
    arguments reach 1e4, and the eps-add between a norm's mean and its square root). Without this
    rule every island boundary would round through the reduced type and back.
* data movement (Reshape, Transpose, Slice, Concat, Gather, ...) follows the type of its input;
* everything else (MatMul, Gemm, Conv, the activations, the adaLN modulation, attention logits,
  softmax) runs in the reduced type; weights used only there are stored in the reduced type.

What is needed was measured on the tiny denoiser (one Euler step, cfg 4.5, every op rounding to fp16
as on a GPU - onnx's reference evaluator; see precision_parity.check_reduced_precision): all islands
5.7e-4 relative L2, no islands 7.0e-2. The timestep embedding alone makes the difference (its
Mul/Sin/Cos in fp16: 7.0e-2); the Euler/guidance arithmetic in fp16 adds a little (7.3e-4); an fp32
softmax or fp32 RoPE changes nothing (5.6e-4 / 5.7e-4), so both stay in the reduced type: the rotary
tables are computed in fp32 at export and only their cos/sin values are stored, and TensorRT's fused
attention accumulates the softmax in fp32 internally, and Casts around the softmax could get in the
way of its MatMul-Softmax-MatMul fusion. Norms, reductions and powers change little at the tiny
preset's scale but stay fp32 because fp16 statistics (sums of squares) overflow at real activation
magnitudes; TensorRT's own builder warns that fp16 LayerNorm may overflow.

Nodes are identified by op type and by the torch module scope that the dynamo exporter records in
``node.metadata_props`` (never by node names). Pointwise fp32 islands cost next to nothing in
TensorRT, which fuses them (Casts included) into single kernels; the time goes to the MatMuls and
convolutions, which all run in the reduced type.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

import onnx
from onnx import TensorProto

from .errors import ExportError

FLOAT = TensorProto.FLOAT
TRT_TYPE = {TensorProto.FLOAT: "FP32", TensorProto.FLOAT16: "FP16", TensorProto.BFLOAT16: "BF16"}

# op type -> reason it computes in fp32
FP32_OPS = {
    **dict.fromkeys(("LayerNormalization", "GroupNormalization", "InstanceNormalization",
                     "BatchNormalization", "LpNormalization", "MeanVarianceNormalization",
                     "RMSNormalization"), "normalization"),
    **dict.fromkeys(("ReduceMean", "ReduceSum", "ReduceL1", "ReduceL2", "ReduceSumSquare",
                     "ReduceLogSum", "ReduceLogSumExp", "ReduceProd", "CumSum"), "reduction"),
    **dict.fromkeys(("Pow", "Sqrt", "Reciprocal"), "power"),
    **dict.fromkeys(("Sin", "Cos", "Tan", "Exp", "Log"), "transcendental"),
    # their output type comes from an attribute, not from the inputs: left as exported
    **dict.fromkeys(("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                     "EyeLike", "Multinomial", "Bernoulli"), "typed by attribute"),
}
STAGE_ARITHMETIC = "stage arithmetic"
FP32_INPUTS = "fp32 inputs"

# ops that only move, select or replicate values: they take the type of their data input
DATA_MOVEMENT = frozenset((
    "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Split", "Concat", "Gather",
    "GatherND", "GatherElements", "Expand", "Flatten", "Identity", "Tile", "Pad", "Resize",
    "DepthToSpace", "SpaceToDepth", "ReverseSequence", "ScatterND", "ScatterElements"))
# elementwise ops (the "fp32 inputs" rule applies to these)
POINTWISE = frozenset((
    "Add", "Sub", "Mul", "Div", "Neg", "Abs", "Sqrt", "Reciprocal", "Pow", "Exp", "Log", "Sin",
    "Cos", "Tan", "Erf", "Sigmoid", "Tanh", "Relu", "LeakyRelu", "Elu", "Selu", "Softplus",
    "HardSigmoid", "Clip", "Max", "Min", "Where", "Floor", "Ceil", "Round", "Sign", "Mod",
    "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Gelu", "Mish"))
# inputs of any type: no Cast is ever needed in front of these
ANY_INPUT = frozenset(("Cast", "Shape", "Size", "CastLike"))
# float inputs whose type is fixed whatever the data type (Resize roi and scales)
FIXED_FP32_INPUTS = {"Resize": (1, 2)}


@dataclass(frozen=True)
class Decision:
    dtype: int | None  # FLOAT or the reduced type; None: the node touches no float tensor
    reason: str | None  # why the node stays fp32 (None: reduced type, or follows its input)


def plan(model: onnx.ModelProto, low: int, types: dict[str, int], *,
         islands: bool = True) -> list[Decision]:
    """The compute type of every node of ``model.graph`` (same order).

    Computing nodes are decided in graph order from their op, scope and inputs. Constant data
    (Constant nodes and ops on constants only, e.g. an Unsqueeze of a frequency table or a sum of
    two position tables that the exporter did not fold) takes the type its consumers want,
    decided backwards, so an fp32 island never reads a constant that went through the reduced
    type and weights used only in the reduced type are stored in it. Sensitive ops (FP32_OPS) on
    constants stay fp32 like any other.
    """
    graph = model.graph
    constant = {i.name for i in graph.initializer}
    produced: dict[str, int] = {i.name: FLOAT for i in graph.input if types.get(i.name) == FLOAT}
    decisions: list[Decision] = []
    constant_nodes = []
    for index, node in enumerate(graph.node):
        floats = [x for x in node.input if x and types.get(x) == FLOAT]
        if not floats and not any(types.get(o) == FLOAT for o in node.output):
            decisions.append(Decision(None, None))  # shape arithmetic, indices, masks
            continue
        if node.op_type == "Constant" or (node.op_type not in FP32_OPS
                                          and all(x in constant for x in node.input if x)):
            constant.update(node.output)
            constant_nodes.append(index)
            decisions.append(Decision(low, None))  # placeholder, decided below
            continue
        decision = _decide(node, [x for x in floats if x not in constant], produced, low,
                           islands)
        decisions.append(decision)
        for out in node.output:
            if types.get(out) == FLOAT:
                produced[out] = decision.dtype
    consumers: dict[str, list[int]] = {}
    for index, node in enumerate(graph.node):
        for x in node.input:
            consumers.setdefault(x, []).append(index)
    for index in reversed(constant_nodes):
        wants = {decisions[c].dtype for out in graph.node[index].output
                 for c in consumers.get(out, ()) if graph.node[c].op_type not in ANY_INPUT}
        decisions[index] = Decision(FLOAT if FLOAT in wants else low, None)
    return decisions


def _decide(node, variable_inputs: list[str], produced: dict[str, int], low: int,
            islands: bool) -> Decision:
    op = node.op_type
    if op in FP32_OPS and (islands or FP32_OPS[op] == "typed by attribute"):
        return Decision(FLOAT, FP32_OPS[op])
    if not islands:
        return Decision(low, None)
    if _is_stage_arithmetic(node):
        return Decision(FLOAT, STAGE_ARITHMETIC)
    if op == "Cast" and not variable_inputs:
        return Decision(FLOAT, None)  # integers -> float: exact in fp32, not in fp16 (> 2048)
    if op in DATA_MOVEMENT or op in ANY_INPUT:
        kinds = {produced.get(x, low) for x in variable_inputs}
        return Decision(FLOAT if kinds == {FLOAT} else low, None)
    if op in POINTWISE and all(produced.get(x) == FLOAT for x in variable_inputs):
        return Decision(FLOAT, FP32_INPUTS)
    return Decision(low, None)


def _is_stage_arithmetic(node) -> bool:
    """True for ops of the stage wrapper's own code (not inside any submodule's forward)."""
    classes = metadata_list(node, "pkg.torch.onnx.class_hierarchy")
    # [wrapper class, aten op]: the op sits directly in the wrapper, or in a method it calls that
    # is not a submodule's forward (e.g. the additions of MMAudioFlow.velocity itself)
    return len(classes) == 2 and classes[0].startswith("mmsep.export.wrappers.")


def metadata_list(node, key: str) -> list[str]:
    for entry in node.metadata_props:
        if entry.key == key:
            try:
                value = ast.literal_eval(entry.value)
            except (ValueError, SyntaxError):
                return []
            return list(value) if isinstance(value, (list, tuple)) else []
    return []


def element_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor name (graph I/O, value_info, initializers, constants)."""
    types: dict[str, int] = {}
    graph = model.graph

    def record(values):
        for v in values:
            if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type:
                types[v.name] = v.type.tensor_type.elem_type

    record(graph.input)
    record(graph.output)
    record(graph.value_info)
    for init in graph.initializer:
        types[init.name] = init.data_type
    if any(o and o not in types for n in graph.node for o in n.output):
        # the dynamo exporter records value_info for every tensor; fall back to inference
        inferred = onnx.shape_inference.infer_shapes(_weightless(model))
        record(inferred.graph.value_info)
        record(inferred.graph.output)
    missing = [o for n in graph.node for o in n.output if o and o not in types]
    if missing:
        raise ExportError(f"cannot infer the element type of {len(missing)} tensor(s), "
                          f"e.g. {missing[0]!r}")
    return types


def _weightless(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy without tensor payloads (shape inference needs only dims and types)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for init in copy.graph.initializer:
        for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data",
                      "external_data"):
            init.ClearField(field)
        init.data_location = TensorProto.DEFAULT
    return copy

