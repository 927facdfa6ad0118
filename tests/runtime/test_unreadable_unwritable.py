"""Files mmsep-run may not read or write (no permission, a read-only filesystem): exit 2 and a
line naming the file, found before any work. The refusals are simulated (the tests may run as
root, whom permissions do not stop)."""

import os
import shutil
from pathlib import Path

import soundfile as sf

from mmsep.runtime import atomic, model_dir as model_dir_module
from mmsep.runtime.example import tones
from mmsep.runtime.separator import Separator
from tests.runtime.test_cli import run_cli

SR = 44100


def refuse_under(monkeypatch, folder: Path) -> None:
    """New files in ``folder`` are refused as a read-only directory refuses them."""
    create = atomic._create_unique

    def create_unique(path):
        if Path(path).parent == folder:
            raise PermissionError(13, "Permission denied")
        return create(path)

    monkeypatch.setattr(atomic, "_create_unique", create_unique)


def test_an_output_in_a_directory_that_takes_no_file(model_dir, media, tmp_path, capsys,
                                                     monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    refuse_under(monkeypatch, locked)

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the outputs were checked")

    monkeypatch.setattr(Separator, "__init__", never)
    for outputs, named in ((["-o", locked / "a.wav"], locked / "a.wav"),
                           (["-o", tmp_path / "a.wav", "--mux", locked / "a.mp4"],
                            locked / "a.mp4")):
        code, _, stderr = run_cli(["--model", model_dir, "--video", media["av"], "--text", "a",
                                   *outputs], capsys)
        assert (code, stderr.strip()) == (
            2, f"mmsep-run: error: {named}: cannot write (Permission denied)")
    assert list(tmp_path.glob("*.wav")) == []


def test_an_output_directory_in_a_folder_that_takes_no_file(model_dir, media, tmp_path, capsys,
                                                           monkeypatch):
    """-o DIR writes inside DIR: its parent (locked here) is not asked to take a file."""
    stems = tmp_path / "stems"
    stems.mkdir()
    refuse_under(monkeypatch, tmp_path)
    code, _, stderr = run_cli(["--model", model_dir, "--video", media["av"], "--text", "a",
                               "--steps", "1", "-q", "-o", stems], capsys)
    assert (code, stderr) == (0, "")
    assert [p.name for p in stems.iterdir()] == ["pattern_separated.wav"]


def test_an_output_that_is_a_device_or_a_pipe(model_dir, media, tmp_path, capsys):
    """No file can be renamed onto a device or a pipe, and "/dev/null" must not become a new
    /dev/null.wav beside it."""
    pipe = tmp_path / "pipe.wav"
    os.mkfifo(pipe)
    for output in (Path(os.devnull), pipe):
        code, _, stderr = run_cli(["--model", model_dir, "--video", media["av"], "--text", "a",
                                   "-o", output], capsys)
        assert (code, stderr.strip()) == (
            2, f"mmsep-run: error: --output {output}: cannot write (not a regular file; "
               "outputs are written whole and renamed into place)")
    assert not Path(os.devnull + ".wav").exists() and pipe.is_fifo()


def test_a_model_file_that_cannot_be_read(model_dir, tmp_path, capsys, monkeypatch):
    mix = tmp_path / "mix.wav"
    sf.write(mix, tones(1.0, SR), SR)
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    hash_file = model_dir_module.sha256_file

    def sha256_file(path):
        if Path(path).name == "vocoder.onnx":
            raise PermissionError(13, "Permission denied")
        return hash_file(path)

    monkeypatch.setattr(model_dir_module, "sha256_file", sha256_file)
    code, _, stderr = run_cli(["--model", model, "--mix", mix, "-o", tmp_path / "o.wav"], capsys)
    assert (code, stderr.strip()) == (
        2, f"mmsep-run: error: {model / 'vocoder.onnx'}: cannot read (Permission denied)")
