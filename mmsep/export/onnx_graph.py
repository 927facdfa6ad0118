"""Export one stage module to ONNX and check the graph against its StageSpec."""

from __future__ import annotations

import json
import logging
import warnings
from functools import lru_cache
from importlib import resources
from pathlib import Path

import onnx
import torch
from torch.export import Dim

from ..stages import StageSpec, TensorSpec
from .errors import ExportError, GraphCheckError, UnsupportedOperatorError
from .example_inputs import example_inputs

OPSET = 18
EXPORT_BATCH = 2  # parity is checked at another batch size (see parity.py)
EXTERNAL_DATA_BYTES = 1 << 30  # weights above this go to a side file (the protobuf limit is 2 GiB)


def export_onnx(module: torch.nn.Module, spec: StageSpec, path: Path,
                *, batch: int = EXPORT_BATCH) -> Path:
    """Trace ``module`` with torch.export (dynamo) into ``path`` with the spec's names and axes."""
    module = module.eval()
    inputs = example_inputs(spec, batch)
    batch_dim = Dim("batch", min=spec.min_batch, max=max(spec.max_batch, batch + 1))
    # positional, like the inputs: a wrapper's argument names need not be the tensor names
    dynamic_shapes = tuple({0: _scaled(batch_dim, t)} for t in spec.inputs)
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    with warnings.catch_warnings(), torch.no_grad(), _quiet_loggers("onnxscript", "torch.onnx"):
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                module, tuple(inputs.values()), str(path), dynamo=True,
                input_names=list(spec.input_names), output_names=list(spec.output_names),
                dynamic_shapes=dynamic_shapes, opset_version=OPSET, optimize=True,
                external_data=weight_bytes > EXTERNAL_DATA_BYTES, verbose=False)
        except Exception as exc:  # torch.export raises many unrelated types
            raise ExportError(f"stage {spec.name}: torch.onnx.export failed: "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from exc
    return path


class _quiet_loggers:
    """The exporter's optimiser logs every constant it does not fold; keep the console clean."""

    def __init__(self, *names: str):
        self.loggers = [logging.getLogger(n) for n in names]

    def __enter__(self):
        self.levels = [lg.level for lg in self.loggers]
        for lg in self.loggers:
            lg.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        for lg, level in zip(self.loggers, self.levels):
            lg.setLevel(level)


def _scaled(batch_dim, tensor: TensorSpec):
    multiple = tensor.batch_multiple
    return batch_dim if multiple == 1 else multiple * batch_dim


def check_graph(path: Path, spec: StageSpec) -> dict:
    """onnx.checker, tensor names/dtypes/shapes vs the spec, TensorRT operator support.

    Returns a summary (operator histogram, opset, parameter bytes) for the manifest.
    """
    try:
        onnx.checker.check_model(str(path), full_check=False)
    except onnx.checker.ValidationError as exc:
        raise GraphCheckError(f"stage {spec.name}: onnx.checker rejected {path.name}: "
                              f"{str(exc).splitlines()[0]}") from exc
    model = onnx.load(str(path), load_external_data=False)
    _check_io(model.graph.input, spec.inputs, spec, "input")
    _check_io(model.graph.output, spec.outputs, spec, "output")
    ops = operator_histogram(model)
    check_tensorrt_operators(ops, spec.name, model)
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    return {"opset": opset, "operators": ops}


_ONNX_DTYPES = {"float32": onnx.TensorProto.FLOAT, "int64": onnx.TensorProto.INT64,
                "float16": onnx.TensorProto.FLOAT16}


def _check_io(values, specs: tuple[TensorSpec, ...], stage: StageSpec, kind: str) -> None:
    names = [v.name for v in values]
    expected = [t.name for t in specs]
    if names != expected:
        raise GraphCheckError(f"stage {stage.name}: {kind} names {names} != contract {expected}")
    for value, tensor in zip(values, specs):
        ttype = value.type.tensor_type
        if ttype.elem_type != _ONNX_DTYPES[tensor.dtype]:
            raise GraphCheckError(f"stage {stage.name}: {kind} {tensor.name} has ONNX element type "
                                  f"{onnx.TensorProto.DataType.Name(ttype.elem_type)}, "
                                  f"contract says {tensor.dtype}")
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in ttype.shape.dim]
        if len(dims) != len(tensor.shape):
            raise GraphCheckError(f"stage {stage.name}: {kind} {tensor.name} has rank {len(dims)}, "
                                  f"contract says {len(tensor.shape)}")
        for axis, (got, want) in enumerate(zip(dims, tensor.shape)):
            if isinstance(want, int) and got != want:
                raise GraphCheckError(f"stage {stage.name}: {kind} {tensor.name} axis {axis} is "
                                      f"{got!r}, contract says {want}")
            if isinstance(want, str) and not isinstance(got, str):
                raise GraphCheckError(f"stage {stage.name}: {kind} {tensor.name} axis {axis} is "
                                      f"fixed at {got}, contract says dynamic {want!r}")


def operator_histogram(model: onnx.ModelProto) -> dict[str, int]:
    """Count operators in the graph, its subgraphs and its local functions (as domain::op)."""
    counts: dict[str, int] = {}
    local = {(f.domain, f.name) for f in model.functions}

    def visit(graph):
        for node in graph.node:
            if (node.domain, node.op_type) not in local:
                key = node.op_type if node.domain in ("", "ai.onnx") else \
                    f"{node.domain}::{node.op_type}"
                counts[key] = counts.get(key, 0) + 1
            for attr in node.attribute:
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    visit(sub)

    visit(model.graph)
    for function in model.functions:
        visit(function)
    return dict(sorted(counts.items()))


@lru_cache(maxsize=1)
def tensorrt_operator_table() -> dict:
    text = resources.files("mmsep.export").joinpath("data/tensorrt_onnx_ops.json").read_text()
    return json.loads(text)


def check_tensorrt_operators(ops: dict[str, int], stage: str, model: onnx.ModelProto | None = None):
    table = tensorrt_operator_table()
    supported = {name for name, row in table["operators"].items() if row["supported"]}
    bad = sorted(op for op in ops if op not in supported)
    if bad:
        where = ""
        if model is not None:
            node = next((n for n in model.graph.node if _qualified(n) in bad), None)
            if node is not None:
                where = f" (first at node {node.name!r})"
        raise UnsupportedOperatorError(
            f"stage {stage}: operator(s) {', '.join(bad)} are not supported by the TensorRT "
            f"{table['tensorrt_version']} ONNX parser{where}")


def _qualified(node) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
