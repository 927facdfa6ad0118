"""16 kHz deployments end to end: the authors' release layout -> mmsep-export -> mmsep-run.

The fast test uses the tiny_16k preset (toy widths, BigVGAN v1 companion); the slow one writes
the real-size small_16k release layout with random weights and separates one clip with it.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from mmsep.models import build_components, load_components, save_components
from mmsep.models.bigvgan_v1 import BigVGANv1
from mmsep.models.io import CheckpointError
from mmsep.stages import STAGE_ORDER

RELEASE_FILES = {  # docs/MODELS.md of the authors, for one 16 kHz variant
    "weights/mmaudiosep_{}.pth", "ext_weights/v1-16.pth", "ext_weights/best_netG.pt",
    "ext_weights/synchformer_state_dict.pth"}


def _cli(module, *args):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)],
                          capture_output=True, text=True, timeout=7200)


def _tone_mix(path, seconds, rate):
    t = np.arange(int(seconds * rate)) / rate
    sf.write(path, (0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32), rate)


def _export_and_separate(weights, variant, tmp_path, duration, steps):
    """mmsep-export of the release layout, then mmsep-run on a 3 s mixture at 22.05 kHz."""
    model = tmp_path / "model"
    proc = _cli("mmsep.export.cli", "--weights-dir", weights, "--variant", variant,
                "--out", model, "--duration", duration, "--no-engines", "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    mix, out = tmp_path / "mix.wav", tmp_path / "target.wav"
    _tone_mix(mix, 3.0, 22050)
    run = _cli("mmsep.runtime.cli", "--model", model, "--mix", mix, "--text", "a humming tone",
               "--steps", steps, "-o", out, "--json")
    assert run.returncode == 0, run.stderr
    audio, rate = sf.read(out)
    return summary, json.loads((model / "manifest.json").read_text()), audio, rate


def test_release_layout_exports_and_separates_at_16k(tmp_path):
    weights = tmp_path / "release"
    paths = save_components(build_components("tiny_16k", seed=5), weights)
    written = {p.relative_to(weights).as_posix() for p in paths.values()}
    assert {f.format("tiny_16k") for f in RELEASE_FILES} <= written

    summary, manifest, audio, rate = _export_and_separate(weights, "tiny_16k", tmp_path, 2, 2)
    assert list(summary["stages"]) == list(STAGE_ORDER)
    assert all(max(s["rel_l2"].values()) <= 1e-4 for s in summary["stages"].values())
    model = manifest["model"]
    # 2 s at 16 kHz: ceil(32000 / 512) = 63 latents of 512 samples, 20 channels
    assert (model["sample_rate"], model["window_samples"]) == (16000, 63 * 512)
    assert model["latent_shape"] == [63, 20]
    assert "BigVGAN v1" in manifest["stages"]["vocoder"]["spec"]["description"]
    assert manifest["sources"]["vocoder"]["path"] == str(weights / "ext_weights/best_netG.pt")
    assert manifest["sources"]["flow"]["path"] == str(weights / "weights/mmaudiosep_tiny_16k.pth")
    assert rate == 16000 and audio.shape == (3 * 16000,)
    assert np.isfinite(audio).all() and audio.std() > 0


def test_components_round_trip_through_the_16k_layout(tmp_path):
    built = build_components("tiny_16k", duration=2.0, seed=1)
    assert isinstance(built.vocoder, BigVGANv1) and built.vae.mode == "16k"
    save_components(built, tmp_path)
    loaded = load_components(tmp_path, variant="tiny_16k", duration=2.0)
    assert isinstance(loaded.vocoder, BigVGANv1) and loaded.config.sample_rate == 16000
    mel = torch.randn(1, 80, 6) - 4.0
    with torch.no_grad():
        torch.testing.assert_close(loaded.vocoder(mel), built.vocoder(mel))


def test_a_vocoder_of_the_other_rate_is_refused_at_load(tmp_path):
    save_components(build_components("tiny_16k", duration=2.0, seed=1), tmp_path / "16k")
    save_components(build_components("tiny", duration=2.0, seed=1), tmp_path / "44k")
    other = tmp_path / "44k/ext_weights/bigvgan_v2_44khz_128band_512x"
    with pytest.raises(CheckpointError) as err:
        load_components(tmp_path / "16k", variant="tiny_16k", vocoder=other, duration=2.0)
    assert str(err.value) == (f"{other}: a 44100 Hz, 128-band vocoder, but the flow network is "
                              "mode '16k' (16000 Hz, 80 bands); give BigVGAN v1 file")


def test_missing_release_files_are_named(tmp_path):
    with pytest.raises(CheckpointError) as err:
        load_components(tmp_path, variant="small_16k")
    assert str(err.value) == (f"{tmp_path / 'weights/mmaudiosep_small_16k.pth'}: flow checkpoint "
                              f"not found (nor {tmp_path / 'weights/mmaudio_small_16k.pth'})")
    save_components(build_components("tiny_16k", seed=2), tmp_path)
    (tmp_path / "ext_weights/best_netG.pt").unlink()
    with pytest.raises(CheckpointError, match="^" + str(tmp_path / "ext_weights/best_netG.pt")
                       + ": BigVGAN v1 file not found$"):
        load_components(tmp_path, variant="tiny_16k")


def test_cli_variant_errors_are_one_line_with_exit_code_2(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (("--weights-dir", empty, "--variant", "small_16k"),
         f"{empty / 'weights/mmaudiosep_small_16k.pth'}: flow checkpoint not found"),
        (("--variant", "small_16k"), "--variant needs --weights-dir"),
    ]
    for args, message in cases:
        proc = _cli("mmsep.export.cli", *args, "--out", tmp_path / "out", "--quiet")
        assert proc.returncode == 2, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"mmsep-export: error: {message}"), lines
        assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_real_size_small_16k_release_exports_and_separates(tmp_path):
    weights = tmp_path / "release"
    proc = _cli("mmsep.models.random_weights", "--preset", "small_16k", "--out", weights)
    assert proc.returncode == 0, proc.stderr
    assert all((weights / f.format("small_16k")).is_file() for f in RELEASE_FILES)

    summary, manifest, audio, rate = _export_and_separate(weights, "small_16k", tmp_path, 8, 2)
    print(json.dumps({name: s["rel_l2"] for name, s in summary["stages"].items()}))
    assert list(summary["stages"]) == list(STAGE_ORDER)
    assert all(max(s["rel_l2"].values()) <= 1e-4 for s in summary["stages"].values())
    assert manifest["model"]["latent_shape"] == [250, 20]
    assert rate == 16000 and audio.shape == (3 * 16000,)
    assert np.isfinite(audio).all() and audio.std() > 0
