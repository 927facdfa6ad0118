"""Reduced-precision stage graphs: structure, fp32 islands and CPU parity against PyTorch fp32."""

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper

from mmsep.export import mixed_precision as mp, precision_parity as pp
from mmsep.export.errors import ExportError
from mmsep.export.example_inputs import example_inputs
from mmsep.export.onnx_graph import check_graph
from mmsep.export.wrappers import stage_modules, stage_specs
from mmsep.models import build_components
from mmsep.stages import STAGE_ORDER
from tests.helpers import TINY_SEED, TINY_WINDOW_SECONDS, rel_l2

FP16, BF16, FP32 = TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.FLOAT
HEAVY = {"MatMul", "Gemm", "Conv", "ConvTranspose"}


@pytest.fixture(scope="module")
def tiny():
    torch.set_grad_enabled(False)
    # the components of tiny_model_dir (tests/conftest.py)
    components = build_components("tiny", duration=TINY_WINDOW_SECONDS, seed=TINY_SEED)
    return stage_modules(components), stage_specs(components)


@pytest.fixture(scope="module")
def fp16_dir(tiny, tiny_model_dir, tmp_path_factory):
    """Every stage of the tiny model converted once, with its summary."""
    _, specs = tiny
    out = tmp_path_factory.mktemp("fp16")
    summaries = {name: mp.convert_graph(tiny_model_dir / f"{name}.onnx",
                                        out / f"{name}.fp16.onnx", specs[name], "fp16")
                 for name in STAGE_ORDER}
    return out, summaries


def _types(path):
    """Element type of every tensor of a graph (after ONNX type inference)."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)), strict_mode=True)
    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type
             for v in (*graph.input, *graph.output, *graph.value_info)}
    types.update({i.name: i.data_type for i in graph.initializer})
    return model, types


@pytest.mark.parametrize("stage", STAGE_ORDER)
def test_fp16_graph_is_valid_and_matches_pytorch(stage, tiny, fp16_dir):
    modules, specs = tiny
    out, summaries = fp16_dir
    path = out / f"{stage}.fp16.onnx"
    spec = specs[stage]
    # onnx.checker, names/dtypes/axes of the fp32 contract, TensorRT operator support
    check_graph(path, spec)
    onnx.checker.check_model(str(path), full_check=True)
    summary = summaries[stage]
    assert summary["strict_onnx_types"] == "ok" and summary["precision"] == "fp16"
    assert summary["weights"]["clamped_to_fp16_range"] == 0
    model = onnx.load(str(path))
    assert all(v.type.tensor_type.elem_type in (FP32, TensorProto.INT64)
               for v in (*model.graph.input, *model.graph.output))
    # the weights of every MatMul / Gemm / Conv are stored in fp16
    inits = {i.name: i for i in model.graph.initializer}
    heavy = [inits[x] for n in model.graph.node if n.op_type in HEAVY
             for x in n.input if x in inits]
    assert heavy and all(i.data_type == FP16 for i in heavy)
    assert summary["weights"]["fp16_bytes"] > 50 * summary["weights"].get("fp32_bytes", 0)
    result = pp.check_reduced_precision(modules[stage], spec, path, "fp16")
    assert result.batch == 3 and result.backend == "onnxruntime-cpu-fp16"
    assert result.passed and result.worst <= spec.reduced_precision_tolerance


def test_fp32_islands_are_where_claimed(fp16_dir):
    out, summaries = fp16_dir
    model, types = _types(out / "denoiser.fp16.onnx")
    nodes = list(model.graph.node)
    by_output = {o: n for n in nodes for o in n.output}

    def computes_in(node):
        return {types[x] for x in node.input if x and types.get(x) in (FP16, FP32)}

    norms = [n for n in nodes if n.op_type == "LayerNormalization"]
    assert norms and all(computes_in(n) == {FP32} for n in norms)
    # RMS-norm statistics (x ** 2, mean, sqrt, reciprocal) and the timestep embedding's sin/cos
    for op in ("Pow", "ReduceMean", "Sqrt", "Reciprocal", "Sin", "Cos"):
        group = [n for n in nodes if n.op_type == op]
        assert group and all(computes_in(n) == {FP32} for n in group), op
    # sin/cos read t * freqs computed in fp32 from the fp32 input t (arguments reach 1e4)
    cos = next(n for n in nodes if n.op_type == "Cos")
    argument = by_output[cos.input[0]]
    assert argument.op_type == "Mul" and computes_in(argument) == {FP32}
    # the Euler update x + dt * v is the graph's last op, in fp32 on the fp32 input x
    last = by_output["x_next"]
    assert last.op_type == "Add" and "x" in last.input and computes_in(last) == {FP32}
    # the heavy work and softmax (kept fusable for TensorRT's attention kernels) run in fp16
    for op in ("MatMul", "Conv", "Softmax"):
        group = [n for n in nodes if n.op_type == op]
        assert group and all(computes_in(n) == {FP16} for n in group), op
    reasons = summaries["denoiser"]["fp32_nodes"]
    assert {"normalization", "power", "reduction", "transcendental", "stage arithmetic",
            "fp32 inputs"} <= set(reasons)
    # the VAE pixel norm's sum of squares (ReduceL2) is fp32 in both VAE stages
    for stage in ("vae_decoder", "mix_encoder"):
        model, types = _types(out / f"{stage}.fp16.onnx")
        l2 = [n for n in model.graph.node if n.op_type == "ReduceL2"]
        assert l2 and all(types[n.input[0]] == FP32 for n in l2), stage


def test_islands_keep_one_denoiser_step_inside_the_bound(tiny, tiny_model_dir, tmp_path):
    """Emulated fp16 (every op rounds to fp16, as on a GPU): without the islands the step fails."""
    from onnx.reference import ReferenceEvaluator

    modules, specs = tiny
    spec, module = specs["denoiser"], modules["denoiser"]
    inputs = example_inputs(spec, 1, seed=1)
    x = inputs["x"].numpy()
    expected = module(*inputs.values()).numpy()
    errors, increments = {}, {}
    for islands in (True, False):
        path = tmp_path / f"denoiser-{islands}.onnx"
        mp.convert_graph(tiny_model_dir / "denoiser.onnx", path, spec, "fp16", islands=islands)
        got = ReferenceEvaluator(str(path)).run(None, {k: v.numpy() for k, v in inputs.items()})[0]
        errors[islands] = rel_l2(got, expected)
        increments[islands] = rel_l2(got - x, expected - x)  # the velocity part of the step
    assert errors[True] < 2e-3 and increments[True] < 5e-3
    assert errors[False] > spec.reduced_precision_tolerance  # the timestep embedding breaks
    assert increments[False] > 10 * increments[True]


def test_bf16_graph_weights_and_honest_skip(tiny, tiny_model_dir, tmp_path):
    modules, specs = tiny
    spec = specs["conditioner"]
    path = tmp_path / "conditioner.bf16.onnx"
    summary = mp.convert_graph(tiny_model_dir / "conditioner.onnx", path, spec, "bf16")
    assert summary["weights"]["bf16_bytes"] > 0
    assert "clamped_to_fp16_range" not in summary["weights"]
    model = onnx.load(str(path))
    heavy = {x for n in model.graph.node if n.op_type in HEAVY for x in n.input}
    assert all(i.data_type == BF16 for i in model.graph.initializer if i.name in heavy)
    # bf16 weights are round-to-nearest bfloat16 of the fp32 weights
    src = {i.name: numpy_helper.to_array(i) for i in onnx.load(
        str(tiny_model_dir / "conditioner.onnx")).graph.initializer}
    init = next(i for i in model.graph.initializer if i.name in heavy)
    import ml_dtypes

    np.testing.assert_array_equal(numpy_helper.to_array(init).view(np.uint16),
                                  src[init.name].astype(ml_dtypes.bfloat16).view(np.uint16))
    # ONNX Runtime refuses bf16 Conv at opset 18: reported as a skip with the reason
    skipped = pp.check_reduced_precision(modules["conditioner"], spec, path, "bf16")
    assert isinstance(skipped, pp.SkippedCheck)
    assert "bf16" in skipped.reason and skipped.to_json()["skipped"] == skipped.reason
    # the reference evaluator runs it: bf16 keeps ~3 significant digits (fp16 is the default)
    emulated = pp.check_reduced_precision(modules["conditioner"], spec, path, "bf16", batch=1,
                                          emulate=True, raise_on_failure=False)
    assert emulated.backend == "onnx-reference-bf16" and emulated.batch == 1
    assert 1e-3 < emulated.worst < 5e-2


def test_external_data_in_and_out(tiny, tiny_model_dir, tmp_path, monkeypatch):
    modules, specs = tiny
    spec = specs["vae_decoder"]
    src = tmp_path / "src" / "vae_decoder.onnx"
    src.parent.mkdir()
    onnx.save_model(onnx.load(str(tiny_model_dir / "vae_decoder.onnx")), str(src),
                    save_as_external_data=True, location="vae_decoder.onnx.data",
                    size_threshold=0)
    monkeypatch.setattr(mp, "EXTERNAL_DATA_BYTES", 0)  # as if the weights were over 1 GiB
    dst = tmp_path / "out" / "vae_decoder.fp16.onnx"
    mp.convert_graph(src, dst, spec, "fp16")
    assert (dst.parent / "vae_decoder.fp16.onnx.data").is_file()
    stored = onnx.load(str(dst), load_external_data=False).graph.initializer
    big = [i for i in stored if np.prod(i.dims) * 2 > 1024]
    assert big and all(i.data_location == TensorProto.EXTERNAL for i in big)
    assert sorted(p.name for p in dst.parent.iterdir()) == ["vae_decoder.fp16.onnx",
                                                            "vae_decoder.fp16.onnx.data"]
    assert pp.check_reduced_precision(modules["vae_decoder"], spec, dst, "fp16").passed


def test_bad_arguments(tiny, tiny_model_dir, tmp_path):
    _, specs = tiny
    spec = specs["vocoder"]
    with pytest.raises(ValueError, match="unknown precision 'int8'"):
        mp.convert_graph(tiny_model_dir / "vocoder.onnx", tmp_path / "v.onnx", spec, "int8")
    with pytest.raises(ExportError, match="stage vocoder: .*missing.onnx does not exist"):
        mp.convert_graph(tmp_path / "missing.onnx", tmp_path / "v.onnx", spec, "fp16")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        mp.convert_graph(tiny_model_dir / "vocoder.onnx", tiny_model_dir / "vocoder.onnx", spec)
    assert not list(tmp_path.iterdir())  # nothing half-written
