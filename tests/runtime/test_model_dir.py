"""Model directory checks: each broken directory gives one clear ModelDirError."""

import json
import shutil

import numpy as np
import pytest

from mmsep.model_files import MANIFEST_FORMAT_VERSION as FORMAT_VERSION
from mmsep.runtime.errors import ModelDirError
from mmsep.runtime.model_dir import ModelDir


@pytest.fixture
def copy(model_dir, tmp_path):
    out = tmp_path / "model"
    shutil.copytree(model_dir, out)
    return out


def test_loads_the_exported_directory(model_dir):
    model = ModelDir(model_dir)
    info = model.info
    assert info.separation and info.sample_rate == 44100 and info.window_seconds == 2.0
    assert info.clip_len == 16 and info.clip_fps == 8 and info.sync_frames == 48
    assert (info.sync_fps, info.geometry.sync_segment_stride) == (25.0, 8)
    assert info.geometry.clip_len == info.clip_len and info.preset == "tiny"
    assert info.latent_shape == (87, 40) and info.window_samples == 87 * 1024
    assert info.mixture_latent == "posterior-sample"
    assert set(model.specs) >= {"clip_image", "clip_text", "sync", "mix_encoder", "conditioner",
                                "denoiser", "vae_decoder", "vocoder"}
    empty = model.empty_features()
    assert empty["clip_features"].shape == (16, 64)
    assert empty["sync_features"].shape == (40, 48)
    assert empty["text_features"].shape == (77, 64)
    assert all(np.isfinite(v).all() and v.any() for v in empty.values())


def test_missing_directory_and_manifest(tmp_path):
    with pytest.raises(ModelDirError, match="does not exist"):
        ModelDir(tmp_path / "nope")
    with pytest.raises(ModelDirError, match="no manifest.json; not an mmsep model directory"):
        ModelDir(tmp_path)


def test_bad_manifest(copy):
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(ModelDirError, match="unreadable manifest"):
        ModelDir(copy)


def test_incompatible_format_version(copy):
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelDirError, match="format version 99 is not supported"):
        ModelDir(copy)


def without_video_rates(directory, format_version: int) -> None:
    """Rewrite the manifest as a format-2 export wrote it: no Synchformer rate or stride."""
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["format_version"] = format_version
    for key in ("sync_fps", "sync_segment_stride"):
        del manifest["geometry"][key]
    (directory / "manifest.json").write_text(json.dumps(manifest))


def test_older_format_version_asks_for_a_re_export(copy):
    without_video_rates(copy, 2)
    with pytest.raises(ModelDirError, match="format version 2 is not supported.*re-export"):
        ModelDir(copy)


def test_geometry_without_video_rates_is_incomplete(copy):
    without_video_rates(copy, FORMAT_VERSION)
    with pytest.raises(ModelDirError, match="incomplete manifest.*sync_"):
        ModelDir(copy)


def test_incomplete_manifest(copy):
    manifest = json.loads((copy / "manifest.json").read_text())
    vocoder = manifest["stages"].pop("vocoder")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelDirError, match="no stage vocoder"):
        ModelDir(copy)
    manifest["stages"]["vocoder"] = vocoder
    del next(iter(vocoder["files"].values()))["sha256"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelDirError, match=r"incomplete manifest \(bad or missing 'sha256'\)"):
        ModelDir(copy)


def test_directory_without_a_mixture_latent_convention_is_refused(copy):
    """Exported before the convention was recorded: re-export rather than guess."""
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["geometry"]["mixture_latent"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelDirError, match=r"manifest.json: no mixture latent convention "
                                            r"recorded \(exported by an older mmsep-export\); "
                                            r"re-export the model$"):
        ModelDir(copy)


def test_missing_file(copy):
    (copy / "vocoder.onnx").unlink()
    with pytest.raises(ModelDirError, match="missing file vocoder.onnx"):
        ModelDir(copy)


def test_tampered_file(copy):
    path = copy / "denoiser.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content
    path.write_bytes(bytes(data))
    with pytest.raises(ModelDirError, match=r"denoiser.onnx: SHA-256 does not match the manifest "
                                            r"\(tampered or incomplete\)"):
        ModelDir(copy)
    ModelDir(copy, verify=False)  # sizes still match: only the hash check catches it


def test_tampered_fp16_copy(copy):
    path = copy / "denoiser.fp16.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ModelDirError, match=r"denoiser.fp16.onnx: SHA-256 does not match"):
        ModelDir(copy)


def test_truncated_file(copy):
    path = copy / "empty_features.npz"
    path.write_bytes(path.read_bytes()[:100])
    size = r"empty_features.npz: 100 bytes, the manifest says \d+ \(tampered or incomplete\)"
    with pytest.raises(ModelDirError, match=size):
        ModelDir(copy)
    with pytest.raises(ModelDirError, match=size):
        ModelDir(copy, verify=False)  # its size is recorded, as the graphs' are


@pytest.mark.parametrize("name, at", [("bpe_simple_vocab_16e6.txt.gz", 5000),  # zlib.error
                                      ("bpe_simple_vocab_16e6.txt.gz", None),  # CRC
                                      ("empty_features.npz", None)])
def test_a_damaged_extra_file_under_no_verify_is_reported_as_damaged(copy, name, at):
    """--no-verify hashes a file that fails to load (README): the tokenizer's vocabulary and the
    empty features too, not only the graphs; a damaged one is a ModelDirError naming it."""
    from mmsep.runtime import Separator

    path = copy / name
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if at is None else at
    data[at:at + 8] = bytes(8)  # same size, different content
    path.write_bytes(bytes(data))
    with pytest.raises(ModelDirError, match=rf"{name}: SHA-256 does not match the manifest "
                                            r"\(tampered or incomplete; --no-verify skipped"):
        Separator(copy, "ort-cpu", verify=False)
