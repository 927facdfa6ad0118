"""mmsep-export --out never replaces, holds or lies inside what the model is made from."""

import dataclasses

import pytest
from click.testing import CliRunner

from mmsep.export.cli import main
from mmsep.models import build_components, components as components_module


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
    out = tmp_path / "models" / "tiny"
    result = CliRunner().invoke(main, ["--preset", "tiny", "--duration", "2", "--out", str(out),
                                       "--no-engines", "--quiet"])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        "mmsep-export: error: cannot write the model directory (No space left on device); "
        "nothing was written"]
    assert not out.exists() and list(out.parent.iterdir()) == []
