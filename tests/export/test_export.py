"""mmsep-export end to end on the tiny preset: graphs, parity, manifest, reuse, errors."""

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import soundfile as sf
import torch

import mmsep
from mmsep.export.exporter import export_model
from mmsep.model_files import MANIFEST_FORMAT_VERSION as FORMAT_VERSION
from mmsep.model_files import sha256_file
from mmsep.export.onnx_graph import check_graph, tensorrt_operator_table
from mmsep.export.parity import resolve_parity_device
from mmsep.export.tensorrt_build import unavailable_reason
from mmsep.export.wrappers import geometry as wrapper_geometry
from mmsep.export.wrappers import stage_specs
from mmsep.models import build_components, save_components
from mmsep.stages import NORMALIZED_MEAN, POSTERIOR_SAMPLE, STAGE_ORDER, Geometry, StageSpec
from tests.helpers import TINY_SEED, TINY_WINDOW_SECONDS

SILENT = dict(log=lambda msg: None)
SOURCES = {"preset": "tiny", "seed": TINY_SEED}


def _tiny(**kwargs):
    """The components of the shared test model (tests/conftest.py)."""
    return build_components("tiny", duration=TINY_WINDOW_SECONDS, seed=TINY_SEED, **kwargs)


def _manifest(directory):
    return json.loads((directory / "manifest.json").read_text())


def test_every_stage_exported_checked_and_hashed(tiny_model_dir):
    manifest = _manifest(tiny_model_dir)
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["package_version"] == mmsep.__version__
    assert manifest["stage_order"] == list(STAGE_ORDER)
    supported = {op for op, row in tensorrt_operator_table()["operators"].items()
                 if row["supported"]}
    for name in STAGE_ORDER:
        stage = manifest["stages"][name]
        spec = StageSpec.from_json(stage["spec"])
        path = tiny_model_dir / stage["onnx"]
        onnx.checker.check_model(str(path))
        # names, dtypes and fixed axes match the contract; only the batch axis is symbolic
        check_graph(path, spec)
        for file, meta in stage["files"].items():
            assert sha256_file(tiny_model_dir / file) == meta["sha256"], file
        parity = stage["parity"]["onnxruntime"]
        assert parity["passed"] and parity["batch"] == 3
        assert max(parity["rel_l2"].values()) <= 1e-4
        assert set(stage["graph"]["operators"]) <= supported, name


def test_fp16_copies_are_written_checked_and_hashed(tiny_model_dir):
    manifest = _manifest(tiny_model_dir)
    for name in STAGE_ORDER:
        stage = manifest["stages"][name]
        copy = stage["reduced"]["fp16"]
        assert copy["onnx"] == f"{name}.fp16.onnx" and copy["source_key"] == stage["key"]
        path = tiny_model_dir / copy["onnx"]
        check_graph(path, StageSpec.from_json(stage["spec"]))  # fp32 I/O: the same contract
        graph = onnx.load(str(path))
        assert {p.key: p.value for p in graph.metadata_props}["mmsep.precision"] == "fp16"
        assert any(w.data_type == onnx.TensorProto.FLOAT16 for w in graph.graph.initializer)
        for file, meta in copy["files"].items():
            assert sha256_file(tiny_model_dir / file) == meta["sha256"], file
        parity = copy["parity"]["onnxruntime"]
        # on the CPU at batch 1 (ONNX Runtime's CPU fp16 kernels are slow); on a GPU at the fp32
        # check's batch
        on_gpu = resolve_parity_device("auto") == "cuda"
        assert parity["passed"] and parity["tolerance"] == 1e-2
        assert parity["batch"] == (3 if on_gpu else 1)
        assert 0 < max(parity["rel_l2"].values()) <= 1e-2


def test_manifest_describes_the_model(tiny_model_dir):
    manifest = _manifest(tiny_model_dir)
    model = manifest["model"]
    # 2 s windows: ceil(2 * 44100 / 1024) = 87 latents of 1024 samples
    assert model["sample_rate"] == 44100 and model["window_samples"] == 87 * 1024
    assert model["latent_shape"] == [87, 40] and model["separation"] is True
    assert (model["default_steps"], model["default_cfg"]) == (25, 4.5)
    assert manifest["sources"] == SOURCES
    geometry = manifest["geometry"]
    assert (geometry["clip_len"], geometry["sync_segments"], geometry["mel_frames"]) == (16, 5, 174)
    # the default mixture latent: the authors' evaluation, with the noise as a graph input
    assert geometry["mixture_latent"] == POSTERIOR_SAMPLE
    mix_inputs = manifest["stages"]["mix_encoder"]["spec"]["inputs"]
    assert [(t["name"], t["shape"]) for t in mix_inputs] == [("waveform", ["batch", 87 * 1024]),
                                                             ("noise", ["batch", 87, 40])]
    for role in ("empty_features", "tokenizer"):
        meta = manifest["files"][role]
        assert sha256_file(tiny_model_dir / meta["file"]) == meta["sha256"]
        assert (tiny_model_dir / meta["file"]).stat().st_size == meta["bytes"]  # --no-verify's
    # the manifest's contracts are exactly the package's for these components
    components = _tiny()
    expected = stage_specs(components, max_batch=model["max_batch"])
    assert {n: StageSpec.from_json(s["spec"]) for n, s in manifest["stages"].items()} == expected
    # the video facts travel with the geometry: 8 fps CLIP frames, 25 fps Synchformer frames
    assert Geometry.from_json(geometry) == wrapper_geometry(components)
    assert (geometry["window_seconds"], geometry["sync_fps"], geometry["sync_segment_stride"]) \
        == (2.0, 25.0, 8)
    empty = np.load(tiny_model_dir / "empty_features.npz")
    clip, sync, text = (f[0].detach().numpy() for f in components.flow.empty_conditions(1))
    np.testing.assert_array_equal(empty["text_features"], text)
    np.testing.assert_array_equal(empty["clip_features"], clip)
    np.testing.assert_array_equal(empty["sync_features"], sync)


def test_onnx_graph_matches_module_at_another_batch(tiny_model_dir):
    """Independent of the exporter's own check: run the denoiser graph at batch 1 by hand."""
    import onnxruntime as ort

    from mmsep.export.example_inputs import example_inputs
    from mmsep.export.wrappers import stage_modules

    components = _tiny()
    spec = stage_specs(components)["denoiser"]
    module = stage_modules(components)["denoiser"]
    inputs = example_inputs(spec, 1, seed=7)
    with torch.no_grad():
        expected = module(*inputs.values()).numpy()
        # the graph does one CFG Euler step: check the algebra against two plain network calls
        flow = components.flow
        conds = [inputs[f"cond_{f}"] for f in ("clip", "sync", "text", "global_c")]
        from mmsep.models.flow import Conditions

        v_c = flow.velocity(inputs["x"], inputs["t"], Conditions(*(c[:1] for c in conds)),
                            inputs["mix_latent"])
        v_u = flow.velocity(inputs["x"], inputs["t"], Conditions(*(c[1:] for c in conds)),
                            inputs["mix_latent"])
        manual = inputs["x"] + 0.04 * (4.5 * v_c - 3.5 * v_u)
    np.testing.assert_allclose(expected, manual.numpy(), rtol=1e-4, atol=1e-5)
    session = ort.InferenceSession(str(tiny_model_dir / "denoiser.onnx"),
                                   providers=["CPUExecutionProvider"])
    got = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 1e-4


def test_rerun_is_a_noop_and_changed_weights_rebuild_only_their_stages(tiny_model_dir, tmp_path):
    out = tmp_path / "tiny"
    shutil.copytree(tiny_model_dir, out)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    components = _tiny()
    result = export_model(components, out, sources=SOURCES, **SILENT)
    assert result.unchanged and result.rebuilt == []
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before

    (out / "denoiser.fp16.onnx").write_bytes(b"damaged")  # a damaged copy is made again
    result = export_model(components, out, sources=SOURCES, **SILENT)
    assert result.rebuilt == ["denoiser"]
    assert sha256_file(out / "denoiser.fp16.onnx") == sha256_file(
        tiny_model_dir / "denoiser.fp16.onnx")

    with torch.no_grad():
        components.vocoder.conv_post.weight.mul_(1.5)
    result = export_model(components, out, sources=SOURCES, **SILENT)
    assert result.rebuilt == ["vocoder"]
    assert set(result.reused) == set(STAGE_ORDER) - {"vocoder"}
    manifest, before = _manifest(out), _manifest(tiny_model_dir)
    assert manifest["stages"]["vocoder"]["files"]["vocoder.onnx"]["sha256"] == \
        sha256_file(out / "vocoder.onnx")
    fp16 = {name: stage["reduced"]["fp16"]["files"][f"{name}.fp16.onnx"]["sha256"]
            for name, stage in manifest["stages"].items()}
    assert fp16["vocoder"] == sha256_file(out / "vocoder.fp16.onnx") != \
        before["stages"]["vocoder"]["reduced"]["fp16"]["files"]["vocoder.fp16.onnx"]["sha256"]
    assert all(fp16[name] == sha256_file(tiny_model_dir / f"{name}.fp16.onnx")
               for name in STAGE_ORDER if name != "vocoder")
    assert not list(tmp_path.glob(".tiny.*"))

    result = export_model(components, out, sources=SOURCES, onnx_precisions=(), **SILENT)
    assert result.rebuilt == [] and not result.unchanged  # the graphs are reused ...
    manifest = _manifest(out)  # ... and the fp16 copies dropped
    assert not any(stage["reduced"] for stage in manifest["stages"].values())
    assert not list(out.glob("*.fp16.onnx"))


def test_engines_built_on_a_gpu_survive_a_rerun_where_none_can_be_built(tiny_model_dir,
                                                                         tmp_path):
    """Export here, --engines-only on the GPU machine, export here again: the engines stay
    while the graphs they were built from do; a changed graph drops them."""
    from tests.runtime.backends.fake_gpu import with_engines

    out = with_engines(tiny_model_dir, tmp_path / "tiny")
    manifest = _manifest(out)
    for name, record in manifest["tensorrt"]["engines"].items():
        record["key"] = f"engine key of {name}"
    (out / "vocoder.bf16.onnx").write_bytes(b"a graph made for the engine")
    manifest["tensorrt"]["engines"]["vocoder"]["onnx"] = "vocoder.bf16.onnx"
    (out / "manifest.json").write_text(json.dumps(manifest))
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    components = _tiny()
    result = export_model(components, out, sources=SOURCES, **SILENT)
    assert result.unchanged and result.manifest["tensorrt"]["status"] == "built"
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before

    (out / "denoiser.fp16.onnx").write_bytes(b"damaged")  # the directory is rebuilt ...
    result = export_model(components, out, sources=SOURCES, **SILENT)
    assert result.rebuilt == ["denoiser"] and result.manifest["tensorrt"]["kept"]
    assert set(before) <= {p.name for p in out.iterdir()}  # ... keeping every engine
    assert (out / "vocoder.bf16.onnx").read_bytes() == b"a graph made for the engine"

    with torch.no_grad():
        components.vocoder.conv_post.weight.mul_(1.5)
    result = export_model(components, out, sources=SOURCES, **SILENT)
    assert result.manifest["tensorrt"] == {"status": "skipped", "reason": "not requested"}
    assert not list(out.glob("*.engine")) and not (out / "vocoder.bf16.onnx").exists()


def test_convention_change_reexports_only_the_mix_encoder(tiny_model_dir, tmp_path):
    out = tmp_path / "tiny"
    shutil.copytree(tiny_model_dir, out)
    result = export_model(_tiny(), out, sources=SOURCES, mixture_latent=NORMALIZED_MEAN, **SILENT)
    assert result.rebuilt == ["mix_encoder"]
    manifest = _manifest(out)
    assert manifest["geometry"]["mixture_latent"] == NORMALIZED_MEAN
    spec = StageSpec.from_json(manifest["stages"]["mix_encoder"]["spec"])
    assert spec.input_names == ("waveform",)
    assert manifest["stages"]["mix_encoder"]["parity"]["onnxruntime"]["passed"]


# ---- the command line --------------------------------------------------------------------


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "mmsep.export.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=900)


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    """Tiny random weights in the MMAudio release layout, separation and generation."""
    root = tmp_path_factory.mktemp("weights")
    save_components(build_components("tiny", seed=3), root / "sep")
    save_components(build_components("tiny", separation=False, seed=4), root / "gen")
    return root


def test_saved_weights_all_have_the_usual_permissions(tiny_weights):
    """Every file save_components writes takes the umask's mode (safetensors alone made 0600,
    which another user of a shared weights folder could not read)."""
    modes = {p.relative_to(tiny_weights): p.stat().st_mode & 0o777
             for p in (tiny_weights / "sep").rglob("*") if p.is_file()}
    assert len(set(modes.values())) == 1, modes


def test_cli_errors_are_one_line_with_exit_code_2(tiny_weights, tmp_path):
    text_file = tmp_path / "notes.pth"
    text_file.write_text("not a checkpoint")
    vae_as_flow = tiny_weights / "sep/ext_weights/v1-44.pth"
    cases = [
        (("--checkpoint", tmp_path / "missing.pt"), "missing.pt: checkpoint not found"),
        (("--checkpoint", text_file, "--weights-dir", tiny_weights / "sep"),
         "notes.pth: not a readable"),
        (("--checkpoint", vae_as_flow, "--weights-dir", tiny_weights / "sep"), "v1-44.pth"),
        (("--checkpoint", tiny_weights / "sep/weights/mmaudiosep_tiny.pth",
          "--weights-dir", tmp_path / "empty"),
         str(tmp_path / "empty" / "ext_weights" / "v1-44.pth") + ": VAE checkpoint not found"),
        (("--checkpoint", tiny_weights / "sep/weights/mmaudiosep_tiny.pth"),
         "no VAE checkpoint given: pass its path (--vae, vae=) or a release weights directory"),
        (("--weights-dir", tiny_weights / "sep", "--vocoder", tmp_path),
         "--weights-dir, --vocoder name weights to export: give --checkpoint or --variant"),
        (("--preset", "nonesuch"), "nonesuch"),
        (("--preset", "tiny", "--checkpoint", text_file), "either --checkpoint or --preset"),
    ]
    for args, message in cases:
        out = tmp_path / "out"
        proc = _cli(*args, "--out", out, "--quiet")
        assert proc.returncode == 2, (args, proc.stderr)
        assert message in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert not out.exists()
        assert not list(tmp_path.glob(".out.*"))
    proc = _cli("--checkpoint", tmp_path / "missing.pt", "--out", tmp_path / "out")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [  # before any progress
        f"mmsep-export: error: {tmp_path / 'missing.pt'}: checkpoint not found"]


def test_cli_foreign_out_needs_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("x")
    proc = _cli("--preset", "tiny", "--out", out, "--quiet")
    assert proc.returncode == 2 and "--force" in proc.stderr
    assert (out / "x").exists()


def test_cli_generation_checkpoint_gives_generation_only_directory(tiny_weights, tmp_path,
                                                                   media):
    out = tmp_path / "gen"
    proc = _cli("--checkpoint", tiny_weights / "gen/weights/mmaudio_tiny.pth",
                "--weights-dir", tiny_weights / "gen", "--out", out, "--json", "--duration", 2)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["model"] == {"preset": "tiny", "separation": False, "window_seconds": 2.0}
    assert set(summary["stages"]) == set(STAGE_ORDER) - {"mix_encoder"}
    assert all(0 < max(s["fp16_rel_l2"].values()) <= 1e-2 for s in summary["stages"].values())
    device = resolve_parity_device("auto")
    assert all(s["checked_with"] == f"onnxruntime-{device}-fp32" and
               s["fp16_checked_with"] == f"onnxruntime-{device}-fp16"
               for s in summary["stages"].values())
    manifest = _manifest(out)
    assert manifest["model"]["separation"] is False
    assert manifest["geometry"]["mixture_latent"] is None  # no mixture to encode
    denoiser_inputs = [t["name"] for t in manifest["stages"]["denoiser"]["spec"]["inputs"]]
    assert "mix_latent" not in denoiser_inputs
    flow_file = tiny_weights / "gen/weights/mmaudio_tiny.pth"
    assert manifest["sources"]["flow"]["sha256"] == sha256_file(flow_file)
    assert all(s["parity"]["onnxruntime"]["passed"] for s in manifest["stages"].values())
    run = subprocess.run([sys.executable, "-m", "mmsep.runtime.cli", "--model", out, "--video",
                          media["av"], "--duration", "2.5", "--steps", "1", "-o",
                          tmp_path / "gen.wav", "--quiet"], capture_output=True, text=True)
    assert run.returncode == 0 and sf.info(tmp_path / "gen.wav").duration == 2.5, run.stderr
    reason = unavailable_reason()
    if reason is not None:  # the ONNX part is complete and the manifest says why engines are not
        assert summary["tensorrt"] == {"status": "skipped", "reason": reason}
        assert manifest["tensorrt"] == summary["tensorrt"]


def test_a_vocoder_directory_is_identified_by_its_generator(tmp_path):
    """NVIDIA's BigVGAN v2 download also holds the discriminator and its optimiser's state,
    which sort first."""
    from mmsep.export.cli import _weights_file

    for name in ("bigvgan_discriminator_optimizer.pt", "bigvgan_generator.pt", "config.json"):
        (tmp_path / name).write_bytes(name.encode())
    assert _weights_file(tmp_path) == tmp_path / "bigvgan_generator.pt"
    assert _weights_file(tmp_path / "config.json") == tmp_path / "config.json"


def test_cli_engines_only_needs_tensorrt_and_a_model_directory(tiny_model_dir, tmp_path):
    proc = _cli("--engines-only", tmp_path)
    assert proc.returncode == 2 and "not an mmsep model directory" in proc.stderr
    reason = unavailable_reason()
    if reason is None:
        pytest.skip("TensorRT and a GPU are present: the gpu tests build engines")
    before = (tiny_model_dir / "manifest.json").read_bytes()
    proc = _cli("--engines-only", tiny_model_dir)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == ("mmsep-export: error: cannot build TensorRT engines on this "
                                   f"machine: {reason}")
    assert (tiny_model_dir / "manifest.json").read_bytes() == before


def test_cli_internal_error_is_one_line_with_exit_code_1(tmp_path):
    """An unexpected exception (here: the exporter fails inside) is one line, exit 1, no output."""
    script = ("import sys, mmsep.export.cli as cli, mmsep.export.exporter as exporter\n"
              "def broken(*a, **k):\n"
              "    raise RuntimeError('simulated\\nfailure')\n"
              "exporter.export_model = broken\n"
              "sys.argv = ['mmsep-export', '--preset', 'tiny', '--out', sys.argv[1]]\n"
              "cli.main()\n")
    out = tmp_path / "tiny"
    done = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "mmsep-export: internal error: RuntimeError: simulated failure (nothing was written; set "
        "MMSEP_TRACEBACK=1 to see where)")
    assert not out.exists()


def test_cli_mixture_latent_and_precision_options(tmp_path):
    """--mixture-latent, --precision and --parity-device reach the exporter (fp16, the default,
    asks for the fp16 copies; fp32 and bf16 for none; auto parity is where a GPU is usable); a bad
    value is exit 2."""
    script = ("import sys, mmsep.export.cli as cli, mmsep.export.exporter as exporter\n"
              "def record(*a, **k):\n"
              "    print('convention', k['mixture_latent'], 'copies', k['onnx_precisions'],\n"
              "          'parity on', k['parity_device'])\n"
              "    sys.exit(0)\n"
              "exporter.export_model = record\n"
              "sys.argv = ['mmsep-export', '--preset', 'tiny', '--quiet', *sys.argv[1:]]\n"
              "cli.main()\n")
    done = subprocess.run([sys.executable, "-c", script, "--out", str(tmp_path / "m"),
                           "--mixture-latent", NORMALIZED_MEAN],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (f"convention {NORMALIZED_MEAN} copies ('fp16',) parity on "
                                   f"{resolve_parity_device('auto')}")
    for precision in ("fp32", "bf16"):
        done = subprocess.run([sys.executable, "-c", script, "--out", str(tmp_path / "m"),
                               "--precision", precision, "--no-engines", "--parity-device", "cpu"],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == f"convention {POSTERIOR_SAMPLE} copies () parity on cpu"
    proc = _cli("--preset", "tiny", "--mixture-latent", "mean", "--out", tmp_path / "out")
    assert proc.returncode == 2 and "Invalid value for '--mixture-latent'" in proc.stderr
    assert not (tmp_path / "out").exists()
