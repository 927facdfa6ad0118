"""Applying a mixed-precision plan (``precision_plan.py``) to an ONNX graph: weights and
constants retyped, Casts inserted where a node's input has another type than it computes in,
graph outputs kept fp32."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .precision_plan import ANY_INPUT, FIXED_FP32_INPUTS, FLOAT, TRT_TYPE, Decision

_FP16_MAX = float(np.finfo(np.float16).max)


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


class _Wants:
    """The type each node needs at each float input, from the plan."""

    def __init__(self, nodes: list, decisions: list[Decision], types: dict[str, int]):
        self.types = types
        self.decision_of = {id(n): d for n, d in zip(nodes, decisions)}
        self.consumers: dict[str, list] = {}
        for node in nodes:
            for x in node.input:
                self.consumers.setdefault(x, []).append(node)

    def at(self, node, index: int) -> int | None:
        """The type ``node`` needs at input ``index`` (None: any type / not a float input)."""
        name = node.input[index]
        if not name or self.types.get(name) != FLOAT or node.op_type in ANY_INPUT:
            return None
        if index in FIXED_FP32_INPUTS.get(node.op_type, ()):
            return FLOAT
        return self.decision_of[id(node)].dtype

    def by_consumers(self, name: str) -> set:
        return {self.at(n, i) for n in self.consumers.get(name, ()) for i, x in enumerate(n.input)
                if x == name} - {None}


def rewrite(model: onnx.ModelProto, decisions: list[Decision], types: dict[str, int],
            low: int) -> dict:
    """Apply ``decisions`` (``precision_plan.plan``) to ``model`` in place: retype weights and
    constants, insert Casts, keep fp32 graph outputs. Returns the Casts inserted, the weight
    bytes per type and the (rewritten) nodes in plan order."""
    graph = model.graph
    nodes = [_copy(n) for n in graph.node]
    wants = _Wants(nodes, decisions, types)
    names = _Names(graph)
    # graph inputs and constants first: their types are known before any node runs
    dtype: dict[str, int] = {i.name: FLOAT for i in graph.input if types.get(i.name) == FLOAT}
    weight_bytes, clamped = _retype_initializers(graph, wants, low, dtype)
    rewritten, casts, clamped_constants = _cast_inputs(nodes, wants, low, dtype, names)
    renames = _keep_fp32_outputs(graph, rewritten, types, low, dtype, names)
    graph.ClearField("node")
    graph.node.extend(rewritten)
    for vi in graph.value_info:  # keep the recorded shapes, fix the element types
        vi.name = renames.get(vi.name, vi.name)
        if vi.name in dtype and vi.type.HasField("tensor_type"):
            vi.type.tensor_type.elem_type = dtype[vi.name]
    weights = {f"{k}_bytes": int(v) for k, v in sorted(weight_bytes.items())}
    if low == TensorProto.FLOAT16:
        weights["clamped_to_fp16_range"] = int(clamped + clamped_constants)
    return {"casts": casts + len(renames), "weights": weights, "nodes": nodes}


def _retype_initializers(graph, wants: _Wants, low: int,
                         dtype: dict[str, int]) -> tuple[Counter, int]:
    """Initializers are stored in the reduced type when every consumer computes in it;
    otherwise they stay fp32 and get a Cast where a consumer needs one. Records each one's type
    in ``dtype``; returns the weight bytes per type and how many values saturated."""
    weight_bytes, clamped = Counter(), 0
    for init in graph.initializer:
        if init.data_type != FLOAT:
            continue
        if wants.by_consumers(init.name) == {low}:
            array, n_clamped = _to_low(numpy_helper.to_array(init), low)
            init.CopyFrom(numpy_helper.from_array(array, init.name))
            clamped += n_clamped
            dtype[init.name] = low
        else:
            dtype[init.name] = FLOAT
        weight_bytes[TRT_TYPE[dtype[init.name]].lower()] += tensor_nbytes(init)
    return weight_bytes, clamped


def _cast_inputs(nodes: list, wants: _Wants, low: int, dtype: dict[str, int],
                 names: _Names) -> tuple[list, int, int]:
    """The nodes in order with a Cast in front of every input of another type than the node
    needs (one Cast per tensor and type), Cast targets and Constant values retyped; records the
    type of every float output in ``dtype``. Returns (nodes, Casts inserted, values saturated)."""
    rewritten, casts, clamped = [], {}, 0

    def cast(name: str, to: int) -> str:
        if (name, to) not in casts:
            out = names(f"{name}_{TRT_TYPE[to].lower()}")
            rewritten.append(helper.make_node("Cast", [name], [out], to=to,
                                              name=names(f"cast_{out}")))
            casts[name, to] = out
        return casts[name, to]

    for node in nodes:
        decision = wants.decision_of[id(node)]
        for i, name in enumerate(node.input):
            want = wants.at(node, i)
            if want is not None and dtype.get(name, want) != want:
                node.input[i] = cast(name, want)
        if decision.dtype is not None:
            if node.op_type == "Cast" and _attr(node, "to") == FLOAT:
                _set_attr(node, "to", decision.dtype)
            if node.op_type in ("Constant", "ConstantOfShape") and decision.dtype == low:
                clamped += _lower_constant(node, low)
            for out in node.output:
                if wants.types.get(out) == FLOAT:
                    dtype[out] = decision.dtype
        rewritten.append(node)
    return rewritten, len(casts), clamped


def _keep_fp32_outputs(graph, rewritten: list, types: dict[str, int], low: int,
                       dtype: dict[str, int], names: _Names) -> dict[str, str]:
    """Graph outputs keep their fp32 contract: a reduced-type producer writes a renamed tensor
    and a Cast writes the output. Returns the renames (output -> reduced-type tensor)."""
    renames = {o.name: names(f"{o.name}_{TRT_TYPE[low].lower()}") for o in graph.output
               if types.get(o.name) == FLOAT and dtype.get(o.name) != FLOAT}
    if renames:
        for node in rewritten:
            node.input[:] = [renames.get(x, x) for x in node.input]
            node.output[:] = [renames.get(x, x) for x in node.output]
        for outer, inner in renames.items():
            rewritten.append(helper.make_node("Cast", [inner], [outer], to=FLOAT,
                                              name=names(f"cast_{outer}")))
            dtype[inner] = low
    return renames


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


def tensor_nbytes(init) -> int:
    """Bytes of an initializer's payload."""
    itemsize = {FLOAT: 4, TensorProto.FLOAT16: 2, TensorProto.BFLOAT16: 2}.get(init.data_type, 8)
    return int(np.prod(init.dims, dtype=np.int64)) * itemsize
