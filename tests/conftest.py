"""Fixtures shared by the whole suite: one tiny model directory per test session and the media
files the runtime and scale tests read.

The model is the tiny preset (random weights, seed 0) exported with 2 s windows: every runtime
code path is the same as at 8 s, at a quarter of the cost. Exporting needs torch and takes a few
minutes on a small machine; to reuse a directory while developing, set MMSEP_TEST_MODEL_DIR to one
made by ``mmsep-export --preset tiny --duration 2 --out DIR``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mmsep.runtime.example import make_video
from tests.helpers import TINY_SEED, TINY_WINDOW_SECONDS


@pytest.fixture(autouse=True)
def _seed_torch():
    try:
        import torch
    except ImportError:  # runtime-only environments
        yield
        return
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The tiny preset (random weights, seed 0, 2 s windows) exported once per test session (its
    graphs checked on the GPU where PyTorch and ONNX Runtime both see one: --parity-device auto)."""
    pytest.importorskip("torch", reason="exporting the test model needs torch")
    import torch

    from mmsep.export.exporter import export_model
    from mmsep.export.parity import resolve_parity_device
    from mmsep.models import build_components

    out = tmp_path_factory.mktemp("models") / "tiny"
    with torch.no_grad():
        export_model(build_components("tiny", duration=TINY_WINDOW_SECONDS, seed=TINY_SEED), out,
                     sources={"preset": "tiny", "seed": TINY_SEED}, log=lambda msg: None,
                     parity_device=resolve_parity_device("auto"))
    return out


@pytest.fixture(scope="session")
def model_dir(request) -> Path:
    given = os.environ.get("MMSEP_TEST_MODEL_DIR")
    if given:
        path = Path(given)
        model = json.loads((path / "manifest.json").read_text())["model"]
        assert model["preset"] == "tiny" and model["window_seconds"] == TINY_WINDOW_SECONDS, \
            "MMSEP_TEST_MODEL_DIR must hold the tiny preset exported with " \
            f"--duration {TINY_WINDOW_SECONDS}"
        return path
    return request.getfixturevalue("tiny_model_dir")  # exported once


@pytest.fixture(scope="session")
def separator(model_dir):
    from mmsep.runtime import Separator

    with Separator(model_dir, backend="ort-cpu") as sep:
        yield sep


@pytest.fixture(scope="session")
def media(tmp_path_factory) -> dict[str, Path]:
    """Synthetic inputs: a 30 fps H.264 + AAC mp4 (3.5 s), a 25 fps video without audio (2.5 s),
    and a 12 fps MPEG-4 + PCM mkv (1.5 s)."""
    root = tmp_path_factory.mktemp("media")
    return {
        "av": make_video(root / "pattern.mp4", 3.5, fps=30, size=(96, 128)),
        "silent_video": make_video(root / "silent.mp4", 2.5, fps=25, size=(72, 96), audio=None),
        "pcm": make_video(root / "pcm.mkv", 1.5, fps=12, size=(120, 90), audio="pcm_s16le",
                          codec="mpeg4"),
    }


@pytest.fixture(scope="session")
def clip_720p(tmp_path_factory) -> Path:
    """A short 1280x720 H.264 clip (pattern frames, encoded and decoded by PyAV)."""
    return make_video(tmp_path_factory.mktemp("video") / "hd.mp4", 0.2, fps=25,
                      size=(720, 1280), audio=None)
