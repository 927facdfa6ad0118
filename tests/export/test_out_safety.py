"""mmsep-export --out never replaces, holds or lies inside what the model is made from."""

import dataclasses
import os
import shutil

import pytest
from click.testing import CliRunner

from mmsep.export import exporter as exporter_module
from mmsep.export.cli import main
from mmsep.export.errors import UsageError
from mmsep.export.exporter import export_model
from mmsep.models import build_components, components as components_module
from tests.export.test_export import SILENT, _tiny
from tests.helpers import interrupting


@pytest.fixture
def sources(tmp_path):
    """A checkpoint and a weights directory; never loaded: --out is checked before."""
    ckpt = tmp_path / "ckpts" / "ft.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"checkpoint")
    weights = tmp_path / "weights"
    (weights / "ext_weights").mkdir(parents=True)
    (weights / "ext_weights" / "v1-44.pth").write_bytes(b"vae")
    (tmp_path / "weights_link").symlink_to(weights)
    return ckpt, weights


def snapshot(root):
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("out,message", [
    ("ckpts", "--out {t}/ckpts contains --checkpoint {t}/ckpts/ft.pt, which writing it would "
              "destroy"),
    (".", "contains --checkpoint"),
    ("weights", "--out {t}/weights is --weights-dir {t}/weights"),
    ("weights_link", "--out {t}/weights_link is --weights-dir {t}/weights"),
    ("weights/ext_weights", "--out {t}/weights/ext_weights lies inside --weights-dir"),
    ("weights_link/models/x", "lies inside --weights-dir"),
])
def test_out_never_touches_the_inputs(out, message, sources, tmp_path):
    ckpt, weights = sources
    before = snapshot(tmp_path)
    result = CliRunner().invoke(main, ["--checkpoint", str(ckpt), "--weights-dir", str(weights),
                                       "--out", str(tmp_path / out), "--force", "--quiet"])
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith("mmsep-export: error: ")
    assert message.format(t=tmp_path) in line
    assert snapshot(tmp_path) == before


def test_out_onto_the_checkpoint_file_is_refused(sources, tmp_path):
    ckpt, _ = sources
    result = CliRunner().invoke(main, ["--checkpoint", str(ckpt), "--out", str(ckpt), "--force"])
    assert result.exit_code == 2 and "is a file" in result.output  # click's own check
    assert ckpt.read_bytes() == b"checkpoint"


def test_the_default_out_is_checked_against_every_file_loaded(sources, tmp_path, monkeypatch):
    ckpt, weights = sources
    vae = tmp_path / "models" / "tiny" / "vae.pth"  # where the default --out would go
    vae.parent.mkdir(parents=True)
    vae.write_bytes(b"vae")
    loaded = []

    def load_components(*args, **kwargs):
        loaded.append(1)
        built = build_components("tiny", duration=2.0)
        return dataclasses.replace(built, sources={"flow": str(ckpt), "vae": str(vae)})

    monkeypatch.setattr(components_module, "load_components", load_components)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["--checkpoint", str(ckpt), "--weights-dir", str(weights),
                                       "--force", "--quiet"])
    assert loaded and result.exit_code == 2, result.output
    assert "--out models/tiny contains the vae weights" in result.output
    assert vae.read_bytes() == b"vae" and sorted(p.name for p in vae.parent.iterdir()) == \
        ["vae.pth"]


def test_a_full_disk_during_export_is_exit_2_and_leaves_nothing(tmp_path, monkeypatch):
    import errno

    from mmsep.export import stage_graphs

    real, calls = stage_graphs.write_graphs, []

    def write_graphs(work, *args, **kwargs):
        calls.append(work.name)
        if len(calls) == 2:  # the disk fills up while the second graph is written
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(work, *args, **kwargs)

    monkeypatch.setattr(stage_graphs, "write_graphs", write_graphs)
    assert_cannot_write(tmp_path, "No space left on device")


def assert_cannot_write(tmp_path, reason: str) -> None:
    """A tiny export fails with exit 2 naming ``reason`` and leaves nothing."""
    out = tmp_path / "models" / "tiny"
    result = CliRunner().invoke(main, ["--preset", "tiny", "--duration", "2", "--out", str(out),
                                       "--no-engines", "--quiet"])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        f"mmsep-export: error: cannot write the model directory ({reason}); nothing was written"]
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_a_file_size_limit_inside_torch_onnx_export_is_exit_2(tmp_path, monkeypatch):
    """The exporter wraps what torch.onnx.export raises; a full disk or size limit behind that
    wrapper is still the user's to fix (exit 2), with nothing left."""
    import errno

    import torch

    def too_large(*args, **kwargs):
        raise OSError(errno.EFBIG, "File too large")

    monkeypatch.setattr(torch.onnx, "export", too_large)
    assert_cannot_write(tmp_path, "File too large")


def run_console(argv, capsys):
    """mmsep-export's console program in this process: (exit code, stderr lines)."""
    from mmsep.export.cli import console

    with pytest.raises(SystemExit) as done:
        console(argv)
    return done.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_an_out_that_takes_no_file_is_refused_before_any_work(capsys):
    """Where no file can be made (here /proc, which even root cannot write; elsewhere a
    directory without write permission), before the model is built."""
    code, lines = run_console(["--preset", "tiny", "--out", "/proc/mmsep-test/model"], capsys)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("mmsep-export: error: --out /proc/mmsep-test/model: cannot write (")


@pytest.fixture
def locked_folder(tmp_path):
    """A folder that takes no new entry (immutable for root, read-only for other users) holding
    an empty, writable ``model`` directory."""
    import subprocess

    folder = tmp_path / "locked"
    (folder / "model").mkdir(parents=True)
    if os.geteuid() == 0:
        locked = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode
        if locked != 0:
            pytest.skip("chattr +i is not available here")
        yield folder
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    else:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)


def test_an_out_whose_folder_takes_no_file_is_refused_before_any_work(locked_folder, capsys):
    """The new model directory is assembled beside --out: a writable --out in a folder that
    takes no new entry would fail there (an internal error after the model was built)."""
    code, lines = run_console(["--preset", "tiny", "--out", str(locked_folder / "model")],
                              capsys)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"mmsep-export: error: the folder of --out {locked_folder}: "
                               "cannot write (")


def test_an_out_under_a_file_is_refused_before_any_work(tmp_path, capsys):
    (tmp_path / "afile").write_text("mine")
    code, lines = run_console(["--preset", "tiny", "--out", str(tmp_path / "afile" / "sub")],
                              capsys)
    assert (code, lines) == (2, [f"mmsep-export: error: --out {tmp_path}/afile/sub lies under "
                                 f"{tmp_path}/afile, which is not a directory"])


@pytest.mark.parametrize("out", [".", ".."])
def test_the_current_directory_or_one_above_is_refused(out, tmp_path, capsys, monkeypatch):
    here = tmp_path / "work"
    here.mkdir()
    (here / "notes.txt").write_text("mine")
    monkeypatch.chdir(here)
    code, lines = run_console(["--preset", "tiny", "--out", out, "--force"], capsys)
    assert (code, lines) == (2, [f"mmsep-export: error: --out {out} is the current directory "
                                 "or one above it, which the export would replace; give a new "
                                 "or model directory"])
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["notes.txt", "work"]


def test_a_directory_of_other_files_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    import mmsep.models.components as components

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "notes.txt").write_text("mine")
    monkeypatch.setattr(components, "build_components", lambda *a, **k: pytest.fail("built"))
    code, lines = run_console(["--preset", "tiny", "--out", str(tmp_path / "m")], capsys)
    assert code == 2 and "is not an mmsep model directory" in lines[0], lines


def test_usage_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("mine")
    code, lines = run_console(["--out", str(tmp_path / "afile")], capsys)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("mmsep-export: error: Invalid value for '--out'")


def test_sigterm_is_an_interrupt(tmp_path, capsys, monkeypatch):
    import os
    import signal
    import time

    from mmsep.export import exporter

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the signal's handler raises before this ends
        raise AssertionError("SIGTERM did not interrupt the export")

    monkeypatch.setattr(exporter, "export_model", terminated)
    before = signal.getsignal(signal.SIGTERM)
    code, lines = run_console(["--preset", "tiny", "--duration", "2", "--out",
                               str(tmp_path / "m"), "--no-engines", "--quiet"], capsys)
    assert (code, lines) == (130, ["mmsep-export: interrupted; nothing was written"])
    assert signal.getsignal(signal.SIGTERM) == before  # restored


def test_a_training_checkpoint_is_named_as_such(tmp_path, capsys):
    """mmsep-finetune's checkpoint.pt given where a network is expected: say to use ft.pt."""
    import torch

    ckpt = tmp_path / "checkpoint.pt"
    torch.save({"step": 3, "options": {}, "world": 1, "net": {"w": torch.zeros(1)}, "ema": {},
                "optimizer": {}}, ckpt)
    code, lines = run_console(["--checkpoint", str(ckpt), "--out", str(tmp_path / "m"),
                               "--quiet"], capsys)
    assert (code, lines) == (2, [f"mmsep-export: error: {ckpt}: a mmsep-finetune training "
                                 "checkpoint (checkpoint.pt), not a MMAudio flow checkpoint; "
                                 "give the ft.pt beside it"])


def test_interrupted_export_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(exporter_module, "check_onnxruntime",
                        interrupting(exporter_module.check_onnxruntime, on_call=3))
    components = _tiny()
    with pytest.raises(KeyboardInterrupt):
        export_model(components, tmp_path / "tiny", **SILENT)
    assert list(tmp_path.iterdir()) == []


def test_refuses_foreign_nonempty_out(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="not empty and is not an mmsep model directory"):
        export_model(_tiny(), out, **SILENT)
    assert (out / "notes.txt").read_text() == "mine"


def test_insufficient_disk(tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(exporter_module.shutil, "disk_usage",
                        lambda path: usage._replace(free=1024))
    with pytest.raises(UsageError, match="insufficient disk space"):
        export_model(_tiny(), tmp_path / "tiny", **SILENT)
    assert not (tmp_path / "tiny").exists()
