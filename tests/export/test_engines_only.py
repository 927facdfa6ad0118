"""mmsep-export --engines-only replaces the model directory only when its engines are complete
(TensorRT's build stands in: what the command does around it is under test)."""

import json
import shutil

import pytest
from click.testing import CliRunner

from mmsep.export import tensorrt_build
from mmsep.export.cli import main
from mmsep.model_files import sha256_file


def snapshot(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture
def model(tiny_model_dir, tmp_path):
    return shutil.copytree(tiny_model_dir, tmp_path / "tiny")


@pytest.fixture
def builds(monkeypatch):
    """A stand-in for build_engines: writes the vocoder's engine (and the bf16 graph it would
    convert) where it is told, then fails when ``failing`` says so."""
    state = {"failing": False, "dirs": []}

    def build_engines(model_dir, manifest, modules, *, precision, timing_cache, progress,
                      previous):
        state["dirs"].append(model_dir)
        engine = model_dir / f"vocoder.{precision}.engine"
        engine.write_bytes(b"an engine")
        (model_dir / "vocoder.bf16.onnx").write_bytes(b"a graph made for the engine")
        if state["failing"]:
            raise RuntimeError("vocoder: engine parity 3e-1 over the bound 1e-2")
        return {"status": "built", "precision": precision, "rebuilt": ["vocoder"],
                "engines": {"vocoder": {"file": engine.name, "sha256": sha256_file(engine),
                                        "bytes": engine.stat().st_size, "key": "k",
                                        "onnx": "vocoder.bf16.onnx"}}}

    monkeypatch.setattr(tensorrt_build, "unavailable_reason", lambda: None)
    monkeypatch.setattr(tensorrt_build, "build_engines", build_engines)
    return state


def test_a_failed_build_leaves_the_directory_as_it_was(model, builds):
    before = snapshot(model)
    builds["failing"] = True
    result = CliRunner().invoke(main, ["--engines-only", str(model), "--json"])
    assert result.exit_code == 1 and "engine parity 3e-1" in result.output
    assert builds["dirs"] and builds["dirs"][0] != model  # built beside it
    assert snapshot(model) == before
    assert [p.name for p in model.parent.iterdir()] == ["tiny"]  # no temporary left


def test_a_complete_build_replaces_the_directory(model, builds):
    before = snapshot(model)
    result = CliRunner().invoke(main, ["--engines-only", str(model), "--json"])
    assert result.exit_code == 0, result.output
    after = snapshot(model)
    assert after.pop("vocoder.fp16.engine") == b"an engine"
    assert after.pop("vocoder.bf16.onnx") == b"a graph made for the engine"
    manifest = json.loads(after.pop("manifest.json"))
    before.pop("manifest.json")
    assert after == before  # every graph and file kept
    assert manifest["tensorrt"]["engines"]["vocoder"]["file"] == "vocoder.fp16.engine"
    assert [p.name for p in model.parent.iterdir()] == ["tiny"]


def test_files_of_others_are_not_replaced_without_force(model, builds):
    (model / "notes.txt").write_text("mine")
    refused = CliRunner().invoke(main, ["--engines-only", str(model)])
    assert refused.exit_code == 2 and "holds notes.txt" in refused.output
    assert not builds["dirs"]
