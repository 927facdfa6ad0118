"""Reduced-precision (fp16 / bf16) copies of the exported fp32 stage graphs.

TensorRT 11 builds only strongly typed networks (10.x does so with the STRONGLY_TYPED creation
flag): every tensor's type comes from the ONNX graph, so the mixed precision is decided here, once,
in the graph. ``convert_graph`` plans which nodes compute in the reduced type and which stay fp32
(``precision_plan.py``: the rules, and the measurements behind them), rewrites the graph to that
plan (``precision_rewrite.py``: retyped weights, Casts), checks the result (ONNX checker, the stage
contract, the TensorRT parser's operator types) and writes it atomically.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx
from onnx import TensorProto

from ..runtime.atomic import atomic_files
from ..stages import StageSpec
from .errors import ExportError, GraphCheckError
from .onnx_graph import EXTERNAL_DATA_BYTES, check_graph, tensorrt_operator_table
from .precision_plan import (ANY_INPUT, DATA_MOVEMENT, FLOAT, TRT_TYPE, Decision, element_types,
                             metadata_list, plan)
from .precision_rewrite import rewrite, tensor_nbytes

PASS_VERSION = 1  # bump when the island rules change: it is part of every engine's key
PRECISIONS = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}


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
    types = element_types(model)
    decisions = plan(model, low, types, islands=islands)
    _check_tensorrt_types(model, decisions, spec)
    stats = rewrite(model, decisions, types, low)
    model.metadata_props.append(onnx.StringStringEntryProto(key="mmsep.precision", value=precision))
    _save(model, dst)
    graph_summary = check_graph(dst, spec)
    strict = _strict_types(dst)
    if strict != "ok" and precision == "fp16":
        raise GraphCheckError(f"stage {spec.name}: the fp16 graph fails ONNX type inference: "
                              f"{strict}")

    compute = [(n.op_type, d) for n, d in zip(stats["nodes"], decisions)
               if d.dtype is not None and n.op_type not in DATA_MOVEMENT | ANY_INPUT
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
        "nodes_with_module_scope": sum(bool(metadata_list(n, "pkg.torch.onnx.class_hierarchy"))
                                       for n in stats["nodes"]),
    }




def _check_tensorrt_types(model: onnx.ModelProto, decisions: list[Decision],
                          spec: StageSpec) -> None:
    """Every node must compute in a type the TensorRT ONNX parser supports for its operator."""
    table = tensorrt_operator_table()["operators"]
    for node, decision in zip(model.graph.node, decisions):
        if decision.dtype is None or node.op_type in ANY_INPUT \
                or node.domain not in ("", "ai.onnx"):
            continue
        row = table.get(node.op_type)
        if row is not None and TRT_TYPE[decision.dtype] not in row["types"]:
            raise GraphCheckError(
                f"stage {spec.name}: node {node.name!r} ({node.op_type}) would compute in "
                f"{TRT_TYPE[decision.dtype]}, which the TensorRT ONNX parser does not support "
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


def _has_subgraphs(graph) -> bool:
    return any(a.HasField("g") or len(a.graphs) for n in graph.node for a in n.attribute)


def _save(model: onnx.ModelProto, dst: Path) -> None:
    """Write ``dst`` (and ``dst.data`` for large graphs) atomically; the graph names its data
    file, so both are written under their final names and committed together
    (``atomic_files``), the data first; a stale data file of a previous large graph goes."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    external = sum(tensor_nbytes(i) for i in model.graph.initializer) > EXTERNAL_DATA_BYTES
    data_name = f"{dst.name}.data"
    with atomic_files(dst.parent, [data_name, dst.name]) as scratch:
        onnx.save_model(model, str(scratch / dst.name), save_as_external_data=external,
                        all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
