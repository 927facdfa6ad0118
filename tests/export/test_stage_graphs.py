"""mmsep-export --jobs: the stages' graphs written in forked processes while the parent checks."""

import json
import multiprocessing
import subprocess
import sys

import pytest

from mmsep.export import exporter as exporter_module
from mmsep.export import stage_graphs
from mmsep.export.errors import ExportError, UsageError
from mmsep.export.exporter import export_model
from mmsep.export.parity import resolve_parity_device
from mmsep.models import build_components
from tests.helpers import TINY_SEED, TINY_WINDOW_SECONDS, damaged_copy, interrupting

SILENT = {"log": lambda message: None}


def _tiny():
    return build_components("tiny", duration=TINY_WINDOW_SECONDS, seed=TINY_SEED)


def _hashes(manifest: dict) -> dict:
    return {name: ({f: m["sha256"] for f, m in stage["files"].items()},
                   {f: m["sha256"] for c in stage["reduced"].values()
                    for f, m in c["files"].items()})
            for name, stage in manifest["stages"].items()}


def test_parallel_export_writes_the_same_directory(tiny_model_dir, tmp_path):
    """Two workers write byte-identical graphs to the one-process export (tiny_model_dir), with
    the same checks; the workers are gone afterwards."""
    result = export_model(_tiny(), tmp_path / "m", sources={"preset": "tiny", "seed": TINY_SEED},
                          jobs=2, parity_device=resolve_parity_device("auto"), **SILENT)
    serial = json.loads((tiny_model_dir / "manifest.json").read_text())
    assert result.rebuilt == serial["stage_order"]
    assert _hashes(result.manifest) == _hashes(serial)
    for name, stage in result.manifest["stages"].items():
        assert stage["parity"] == serial["stages"][name]["parity"], name
        assert stage["graph"] == serial["stages"][name]["graph"], name
    assert multiprocessing.active_children() == []


def test_a_failing_worker_stops_the_export_and_leaves_nothing(tmp_path, monkeypatch):
    real = stage_graphs.export_onnx

    def fail_on_denoiser(module, spec, path, **kwargs):
        if spec.name == "denoiser":
            raise ExportError("stage denoiser: torch.onnx.export failed: injected")
        return real(module, spec, path, **kwargs)

    monkeypatch.setattr(stage_graphs, "export_onnx", fail_on_denoiser)  # the workers inherit it
    with pytest.raises(ExportError, match="stage denoiser: torch.onnx.export failed: injected"):
        export_model(_tiny(), tmp_path / "m", jobs=3, **SILENT)
    assert list(tmp_path.iterdir()) == []
    assert multiprocessing.active_children() == []


def test_an_interrupt_terminates_the_workers_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(exporter_module, "check_onnxruntime",
                        interrupting(exporter_module.check_onnxruntime, on_call=2))
    with pytest.raises(KeyboardInterrupt):
        export_model(_tiny(), tmp_path / "m", jobs=2, **SILENT)
    assert list(tmp_path.iterdir()) == []
    assert multiprocessing.active_children() == []


def test_only_what_changed_is_written_again(tiny_model_dir, tmp_path, monkeypatch):
    """A re-export with workers reuses every intact graph; a damaged fp16 copy is the only work."""
    out = damaged_copy(tiny_model_dir, tmp_path / "m", "vocoder.fp16.onnx")
    plans = []
    real = exporter_module._plan_stage

    def record(*args, **kwargs):
        plans.append(real(*args, **kwargs))
        return plans[-1]

    monkeypatch.setattr(exporter_module, "_plan_stage", record)
    result = export_model(_tiny(), out, sources={"preset": "tiny", "seed": TINY_SEED}, jobs=2,
                          **SILENT)
    works = [p.work for p in plans if p.work is not None]
    assert works == [stage_graphs.GraphWork("vocoder", False, ("fp16",))]
    assert result.rebuilt == ["vocoder"]
    assert _hashes(result.manifest) == _hashes(json.loads(
        (tiny_model_dir / "manifest.json").read_text()))


def test_jobs_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="jobs must be at least 1"):
        stage_graphs.GraphWriter({}, {}, tmp_path, jobs=0)
    done = subprocess.run([sys.executable, "-m", "mmsep.export.cli", "--preset", "tiny",
                           "--jobs", "0", "--out", str(tmp_path / "m")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and "Invalid value for '--jobs'" in done.stderr


def report_signals(work):
    """A worker's handlers of Ctrl-C and SIGTERM (stands in for writing ``work``'s graphs)."""
    import signal

    return work.name, signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)


def test_workers_leave_interrupts_to_the_exporting_process(monkeypatch, tmp_path):
    """Under mmsep-export's console SIGTERM raises KeyboardInterrupt; a forked worker must not
    inherit that (close() stops workers with SIGTERM: each printed a traceback), and ignores
    the Ctrl-C that reaches the whole process group."""
    import signal

    from mmsep.console import terminate_as_interrupt

    monkeypatch.setattr(stage_graphs, "_write_in_worker", report_signals)
    works = [stage_graphs.GraphWork(name, False, ()) for name in ("a", "b")]
    with terminate_as_interrupt(), stage_graphs.GraphWriter({}, {}, tmp_path, jobs=2) as writer:
        writer.start(works)
        assert [writer.result(w.name) for w in works] == [
            (w.name, signal.SIG_IGN, signal.SIG_DFL) for w in works]


def test_the_manifest_accounts_for_every_file_of_an_export(tiny_model_dir):
    from mmsep.model_files import manifest_files

    manifest = json.loads((tiny_model_dir / "manifest.json").read_text())
    on_disk = {p.name for p in tiny_model_dir.iterdir()}
    assert manifest_files(manifest) == on_disk
    manifest["tensorrt"] = {"status": "built", "engines": {
        "denoiser": {"file": "denoiser.engine", "onnx": "denoiser.fp16.onnx"}},
        "frame_resize": {"file": "frame_resize.engine", "onnx": "frame_resize.onnx"}}
    assert manifest_files(manifest) - on_disk == {"denoiser.engine", "frame_resize.engine",
                                                  "frame_resize.onnx"}


def test_a_re_export_keeps_the_users_own_files_unless_forced(tiny_model_dir, tmp_path):
    """The export replaces --out as a whole: files its manifest does not account for are named
    and the export refused, the directory untouched."""
    import shutil

    out = tmp_path / "m"
    shutil.copytree(tiny_model_dir, out)
    (out / "NOTES.txt").write_text("mine")
    (out / "samples").mkdir()
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(UsageError, match=r"m: holds NOTES.txt, samples/, which mmsep-export did "
                                         r"not write .*; move them, or pass --force$"):
        export_model(_tiny(), out, **SILENT)
    assert sorted(p.name for p in out.iterdir()) == before
