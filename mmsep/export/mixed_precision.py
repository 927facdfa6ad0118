"""Reduced-precision (fp16 / bf16) copies of the exported fp32 stage graphs.

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

What is needed was measured on the tiny denoiser (one Euler step, cfg 4.5, every op rounding to
fp16 as on a GPU - onnx's reference evaluator; see precision_parity.check_reduced_precision):
all islands 5.7e-4 relative L2, no islands 7.0e-2. The timestep embedding alone makes the difference (its Mul/Sin/Cos
in fp16: 7.0e-2); the Euler/guidance arithmetic in fp16 adds a little (7.3e-4); an fp32 softmax
or fp32 RoPE changes nothing (5.6e-4 / 5.7e-4), so both stay in the reduced type: the rotary
tables are computed in fp32 at export and only their cos/sin values are stored, and TensorRT's
fused attention accumulates the softmax in fp32 internally, and Casts around the softmax could get
in the way of its MatMul-Softmax-MatMul fusion. Norms, reductions and powers change little at the
tiny preset's scale but stay fp32 because fp16 statistics (sums of squares) overflow at real
activation magnitudes; TensorRT's own builder warns that fp16 LayerNorm may overflow.

Nodes are identified by op type and by the torch module scope that the dynamo exporter records in
``node.metadata_props`` (never by node names). Pointwise fp32 islands cost next to nothing in
TensorRT, which fuses them (Casts included) into single kernels; the time goes to the MatMuls and
convolutions, which all run in the reduced type.
"""

from __future__ import annotations

import ast
import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..runtime.atomic import atomic_output
from ..stages import StageSpec
from .errors import ExportError, GraphCheckError
from .onnx_graph import EXTERNAL_DATA_BYTES, check_graph, tensorrt_operator_table

PASS_VERSION = 1  # bump when the island rules change: it is part of every engine's key
FLOAT = TensorProto.FLOAT
PRECISIONS = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}
_TRT_TYPE = {TensorProto.FLOAT: "FP32", TensorProto.FLOAT16: "FP16", TensorProto.BFLOAT16: "BF16"}
_FP16_MAX = float(np.finfo(np.float16).max)

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
_ANY_INPUT = frozenset(("Cast", "Shape", "Size", "CastLike"))
# float inputs whose type is fixed whatever the data type (Resize roi and scales)
_FIXED_FP32_INPUTS = {"Resize": (1, 2)}


@dataclass(frozen=True)
class Decision:
    dtype: int | None  # FLOAT or the reduced type; None: the node touches no float tensor
    reason: str | None  # why the node stays fp32 (None: reduced type, or follows its input)


def convert_graph(src: Path, dst: Path, spec: StageSpec, precision: str = "fp16", *,
                  islands: bool = True) -> dict:
    """Write a ``precision`` copy of the fp32 graph ``src`` to ``dst``; returns a summary.

    Float inputs and outputs stay fp32 (Casts at the boundary); weights used only by
    reduced-precision nodes are stored in the reduced type; the fp32 islands are counted in the
    summary by reason. The result passes onnx.checker, the stage contract check and the TensorRT
    operator/type check. Graphs with external data are read and written with external data.
    ``islands=False`` converts every float op (a diagnostic baseline: it shows what the fp32
    islands buy; the denoiser then misses the bound).
    """
    src, dst = Path(src), Path(dst)
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of "
                         f"{', '.join(PRECISIONS)}")
    if not src.is_file():
        raise ExportError(f"stage {spec.name}: {src} does not exist")
    if dst.exists() and dst.resolve() == src.resolve():
        raise ValueError(f"stage {spec.name}: refusing to overwrite the fp32 graph {src} in place")
    low = PRECISIONS[precision]
    model = onnx.load(str(src), load_external_data=True)
    if model.functions or _has_subgraphs(model.graph):
        raise ExportError(f"stage {spec.name}: {src.name} has local functions or subgraphs, which "
                          "the mixed-precision pass does not handle")
    types = _element_types(model)
    decisions = plan(model, low, types, islands=islands)
    _check_tensorrt_types(model, decisions, spec)
    stats = _rewrite(model, decisions, types, low)
    model.metadata_props.append(onnx.StringStringEntryProto(key="mmsep.precision", value=precision))
    _save_atomically(model, dst)
    graph_summary = check_graph(dst, spec)
    strict = _strict_types(dst)
    if strict != "ok" and precision == "fp16":
        raise GraphCheckError(f"stage {spec.name}: the fp16 graph fails ONNX type inference: "
                              f"{strict}")

    compute = [(n.op_type, d) for n, d in zip(stats["nodes"], decisions)
               if d.dtype is not None and n.op_type not in DATA_MOVEMENT | _ANY_INPUT
               and n.op_type != "Constant"]

    def histogram(items) -> dict:
        return dict(sorted(Counter(items).items()))

    return {
        "precision": precision, "source": src.name, "file": dst.name,
        "nodes": len(decisions), "casts_inserted": stats["casts"],
        "fp32_nodes": histogram(d.reason for _, d in compute if d.dtype == FLOAT),
        "fp32_operators": histogram(op for op, d in compute if d.dtype == FLOAT),
        "reduced_operators": histogram(op for op, d in compute if d.dtype == low),
        "weights": stats["weights"], "graph": graph_summary, "strict_onnx_types": strict,
        # without the exporter's module scopes the "stage arithmetic" islands cannot be found
        "nodes_with_module_scope": sum(bool(_metadata_list(n, "pkg.torch.onnx.class_hierarchy"))
                                       for n in stats["nodes"]),
    }


# ---- planning --------------------------------------------------------------------------------

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
                 for c in consumers.get(out, ()) if graph.node[c].op_type not in _ANY_INPUT}
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
    if op in DATA_MOVEMENT or op in _ANY_INPUT:
        kinds = {produced.get(x, low) for x in variable_inputs}
        return Decision(FLOAT if kinds == {FLOAT} else low, None)
    if op in POINTWISE and all(produced.get(x) == FLOAT for x in variable_inputs):
        return Decision(FLOAT, FP32_INPUTS)
    return Decision(low, None)


def _is_stage_arithmetic(node) -> bool:
    """True for ops of the stage wrapper's own code (not inside any submodule's forward)."""
    classes = _metadata_list(node, "pkg.torch.onnx.class_hierarchy")
    # [wrapper class, aten op]: the op sits directly in the wrapper, or in a method it calls that
    # is not a submodule's forward (e.g. the additions of MMAudioFlow.velocity itself)
    return len(classes) == 2 and classes[0].startswith("mmsep.export.wrappers.")


def _metadata_list(node, key: str) -> list[str]:
    for entry in node.metadata_props:
        if entry.key == key:
            try:
                value = ast.literal_eval(entry.value)
            except (ValueError, SyntaxError):
                return []
            return list(value) if isinstance(value, (list, tuple)) else []
    return []


def _element_types(model: onnx.ModelProto) -> dict[str, int]:
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


def _has_subgraphs(graph) -> bool:
    return any(a.HasField("g") or len(a.graphs) for n in graph.node for a in n.attribute)


# ---- rewriting -------------------------------------------------------------------------------

class _Names:
    """Fresh tensor and node names that collide with nothing in the graph."""

    def __init__(self, graph):
        self.taken = {x for n in graph.node for x in (*n.input, *n.output, n.name)}
        self.taken |= {v.name for v in (*graph.input, *graph.output, *graph.initializer)}

    def __call__(self, base: str) -> str:
        name, k = base, 1
        while name in self.taken:
            name, k = f"{base}_{k}", k + 1
        self.taken.add(name)
        return name


def _rewrite(model: onnx.ModelProto, decisions: list[Decision], types: dict[str, int],
             low: int) -> dict:
    """Apply ``decisions``: retype weights and constants, insert Casts, keep fp32 graph outputs."""
    graph = model.graph
    nodes = [_copy(n) for n in graph.node]
    decision_of = {id(n): d for n, d in zip(nodes, decisions)}
    names = _Names(graph)
    consumers: dict[str, list] = {}
    for node in nodes:
        for x in node.input:
            consumers.setdefault(x, []).append(node)

    def wanted(node, index: int) -> int | None:
        """The type ``node`` needs at input ``index`` (None: any type / not a float input)."""
        name = node.input[index]
        if not name or types.get(name) != FLOAT or node.op_type in _ANY_INPUT:
            return None
        if index in _FIXED_FP32_INPUTS.get(node.op_type, ()):
            return FLOAT
        return decision_of[id(node)].dtype

    def wanted_by_consumers(name: str) -> set:
        return {wanted(n, i) for n in consumers.get(name, ()) for i, x in enumerate(n.input)
                if x == name} - {None}

    # constants (initializers, Constant nodes) are stored in the reduced type when every consumer
    # computes in it; otherwise they stay fp32 and get a Cast where a consumer needs one
    dtype: dict[str, int] = {i.name: FLOAT for i in graph.input if types.get(i.name) == FLOAT}
    weight_bytes, clamped = Counter(), 0
    for init in graph.initializer:
        if init.data_type != FLOAT:
            continue
        if wanted_by_consumers(init.name) == {low}:
            array, n_clamped = _to_low(numpy_helper.to_array(init), low)
            init.CopyFrom(numpy_helper.from_array(array, init.name))
            clamped += n_clamped
            dtype[init.name] = low
        else:
            dtype[init.name] = FLOAT
        weight_bytes[_TRT_TYPE[dtype[init.name]].lower()] += _nbytes(init)

    rewritten, casts = [], {}

    def cast(name: str, to: int) -> str:
        if (name, to) not in casts:
            out = names(f"{name}_{_TRT_TYPE[to].lower()}")
            rewritten.append(helper.make_node("Cast", [name], [out], to=to,
                                              name=names(f"cast_{out}")))
            casts[name, to] = out
        return casts[name, to]

    for node in nodes:
        decision = decision_of[id(node)]
        for i, name in enumerate(node.input):
            want = wanted(node, i)
            if want is not None and dtype.get(name, want) != want:
                node.input[i] = cast(name, want)
        if decision.dtype is not None:
            if node.op_type == "Cast" and _attr(node, "to") == FLOAT:
                _set_attr(node, "to", decision.dtype)
            if node.op_type in ("Constant", "ConstantOfShape") and decision.dtype == low:
                clamped += _lower_constant(node, low)
            for out in node.output:
                if types.get(out) == FLOAT:
                    dtype[out] = decision.dtype
        rewritten.append(node)

    # graph outputs keep their fp32 contract: the producer writes a renamed tensor, a Cast the
    # output
    renames = {o.name: names(f"{o.name}_{_TRT_TYPE[low].lower()}") for o in graph.output
               if types.get(o.name) == FLOAT and dtype.get(o.name) != FLOAT}
    if renames:
        for node in rewritten:
            node.input[:] = [renames.get(x, x) for x in node.input]
            node.output[:] = [renames.get(x, x) for x in node.output]
        for outer, inner in renames.items():
            rewritten.append(helper.make_node("Cast", [inner], [outer], to=FLOAT,
                                              name=names(f"cast_{outer}")))
            dtype[inner] = low
    graph.ClearField("node")
    graph.node.extend(rewritten)
    for vi in graph.value_info:  # keep the recorded shapes, fix the element types
        vi.name = renames.get(vi.name, vi.name)
        if vi.name in dtype and vi.type.HasField("tensor_type"):
            vi.type.tensor_type.elem_type = dtype[vi.name]
    weights = {f"{k}_bytes": int(v) for k, v in sorted(weight_bytes.items())}
    if low == TensorProto.FLOAT16:
        weights["clamped_to_fp16_range"] = int(clamped)
    return {"casts": len(casts) + len(renames), "weights": weights, "nodes": nodes}


def _copy(node: onnx.NodeProto) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    return copy


def _to_low(array: np.ndarray, low: int) -> tuple[np.ndarray, int]:
    """fp32 values in the reduced type; finite values beyond fp16's range saturate at +-65504
    (returns how many did). Infinities (e.g. causal attention masks) stay infinite."""
    array = np.asarray(array, dtype=np.float32)
    if low == TensorProto.FLOAT16:
        too_big = np.isfinite(array) & (np.abs(array) > _FP16_MAX)
        saturated = np.where(too_big, np.sign(array) * _FP16_MAX, array)
        return saturated.astype(np.float16), int(np.count_nonzero(too_big))
    import ml_dtypes  # an onnx dependency; numpy has no bfloat16

    return array.astype(ml_dtypes.bfloat16), 0


def _lower_constant(node, low: int) -> int:
    """Store the float value of a Constant / ConstantOfShape node in the reduced type."""
    for attr in node.attribute:
        if attr.name == "value" and attr.t.data_type == FLOAT:
            array, clamped = _to_low(numpy_helper.to_array(attr.t), low)
            attr.t.CopyFrom(numpy_helper.from_array(array, attr.t.name))
            return clamped
        if attr.name in ("value_float", "value_floats"):
            values = np.array(attr.f if attr.name == "value_float" else list(attr.floats),
                              dtype=np.float32)
            array, clamped = _to_low(values, low)
            node.ClearField("attribute")
            node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(array)))
            return clamped
    return 0


def _attr(node, name: str):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return None


def _set_attr(node, name: str, value: int) -> None:
    for a in node.attribute:
        if a.name == name:
            a.i = value


# ---- checks and I/O --------------------------------------------------------------------------

def _check_tensorrt_types(model: onnx.ModelProto, decisions: list[Decision],
                          spec: StageSpec) -> None:
    """Every node must compute in a type the TensorRT ONNX parser supports for its operator."""
    table = tensorrt_operator_table()["operators"]
    for node, decision in zip(model.graph.node, decisions):
        if decision.dtype is None or node.op_type in _ANY_INPUT \
                or node.domain not in ("", "ai.onnx"):
            continue
        row = table.get(node.op_type)
        if row is not None and _TRT_TYPE[decision.dtype] not in row["types"]:
            raise GraphCheckError(
                f"stage {spec.name}: node {node.name!r} ({node.op_type}) would compute in "
                f"{_TRT_TYPE[decision.dtype]}, which the TensorRT ONNX parser does not support "
                f"for {node.op_type} ({', '.join(row['types'])})")


def _strict_types(path: Path) -> str:
    """"ok", or why the graph fails ONNX's strict type/shape inference at its opset.

    bf16 graphs fail it at opset 18 (Conv, ConvTranspose, AveragePool, Sin and Cos accept bf16
    only from opset 22); TensorRT's parser checks types against its own importers, not the ONNX
    schemas, and builds them, but ONNX Runtime refuses to load them.
    """
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        return str(exc).splitlines()[0][:300]
    return "ok"


def _save_atomically(model: onnx.ModelProto, dst: Path) -> None:
    """Write ``dst`` (and ``dst.data`` for large graphs) through ``atomic_output``. The graph
    names its data file, so both are saved under their final names in a private scratch
    directory first, then each is committed into place."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    external = sum(_nbytes(i) for i in model.graph.initializer) > EXTERNAL_DATA_BYTES
    data_name = f"{dst.name}.data"
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=f".{dst.name}.scratch-") as scratch:
        onnx.save_model(model, str(Path(scratch) / dst.name), save_as_external_data=external,
                        all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
        if external:
            with atomic_output(dst.parent / data_name) as tmp:
                os.replace(Path(scratch) / data_name, tmp)
        else:
            (dst.parent / data_name).unlink(missing_ok=True)
        with atomic_output(dst) as tmp:
            os.replace(Path(scratch) / dst.name, tmp)


def _nbytes(init) -> int:
    itemsize = {FLOAT: 4, TensorProto.FLOAT16: 2, TensorProto.BFLOAT16: 2}.get(init.data_type, 8)
    return int(np.prod(init.dims, dtype=np.int64)) * itemsize
