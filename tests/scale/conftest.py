"""Fixtures of the mmsep.scale tests (the tiny model and media are tests/conftest.py's): job
files, and one local Ray instance per test module (Ray takes seconds to start on a small
machine)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import soundfile as sf

from mmsep.runtime.example import tones


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray", reason="the ray extra is not installed")
    # the test machine is shared: Ray's memory monitor would kill the actors when other
    # processes fill the memory, which is not what these tests are about
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def job_inputs(tmp_path_factory, media) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("job_inputs")
    sf.write(root / "mix.wav", tones(2.5, 44100, seed=1), 44100)
    sf.write(root / "other.wav", tones(1.5, 44100, seed=2, freqs=(330.0,)), 44100)
    return {"root": root, "mix": root / "mix.wav", "other": root / "other.wav",
            "video": media["av"]}


def write_jobs(path: Path, lines: list) -> Path:
    """A JOBS file: dicts as JSON lines, strings verbatim (for malformed lines)."""
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def six_requests(inputs: dict[str, Path]) -> list:
    """Four good requests (mixture, video with two texts, generation, negative text) and two
    bad ones (a missing file, a malformed line)."""
    return [
        {"mix": "mix.wav", "text": "a tone", "seed": 1, "steps": 1},
        {"video": str(inputs["video"]), "text": ["a dog", "a cat"], "seed": 2, "steps": 1,
         "output": "two.wav"},
        {"generate": True, "duration": 1.0, "text": "rain", "seed": 3, "steps": 1},
        {"mix": "missing.wav", "text": "x", "steps": 1},
        '{"mix": "other.wav", "text": ',
        {"mix": "other.wav", "text": "a tone", "negative_text": "noise", "seed": 4,
         "steps": 1, "output": "neg.wav"},
    ]
