"""Every Python and shell example in README.md runs as written after the quick start.

The fenced ```python and ```bash blocks are extracted and run, each in a fresh subprocess, in a
scratch directory that holds what the quick start leaves behind: ``models/tiny`` and
``example/`` (the repository's own copies when the quick start has run there, as in CI; else the
shared test model and a freshly written example clip). A block may be preceded by an HTML comment
that says how it is run:

- ``<!-- ci:run -->``: the quick start and the other CI blocks; CI runs them, not this test;
- ``<!-- example: slow REASON -->`` / ``<!-- example: gpu REASON -->``: marked slow / gpu;
- ``<!-- example: skip REASON -->``: not runnable here (the reason is the skip message).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_BLOCK = re.compile(r"(?:<!--\s*(?P<tag>[^>]*?)\s*-->[ \t]*\n)?^```(?P<lang>python|bash)[ \t]*\n"
                    r"(?P<body>.*?)^```", re.S | re.M)
_TIMEOUT_S = 600


@dataclass(frozen=True)
class Example:
    lang: str
    body: str
    line: int
    tag: str

    @property
    def kind(self) -> str:
        """"ci", "run", "slow", "gpu" or "skip"."""
        if self.tag == "ci:run":
            return "ci"
        if self.tag.startswith("example:"):
            return self.tag.split(":", 1)[1].split()[0]
        return "run"

    @property
    def reason(self) -> str:
        words = self.tag.split(":", 1)[-1].split(None, 1)
        return words[1] if len(words) > 1 else f"README.md line {self.line}"


def readme_examples(text: str) -> list[Example]:
    return [Example(m["lang"], m["body"], text.count("\n", 0, m.start("body")), m["tag"] or "")
            for m in _BLOCK.finditer(text)]


def _params():
    params = []
    for ex in readme_examples((ROOT / "README.md").read_text(encoding="utf-8")):
        marks = {"slow": [pytest.mark.slow], "gpu": [pytest.mark.gpu],
                 "skip": [pytest.mark.skip(reason=ex.reason)]}.get(ex.kind, [])
        if ex.kind != "ci":
            params.append(pytest.param(ex, marks=marks, id=f"{ex.lang}-line{ex.line}"))
    return params


def test_readme_tags_are_known():
    examples = readme_examples((ROOT / "README.md").read_text(encoding="utf-8"))
    assert examples, "no examples found in README.md"
    unknown = [(ex.line, ex.tag) for ex in examples
               if ex.kind not in ("ci", "run", "slow", "gpu", "skip")]
    assert not unknown, f"unknown example tags: {unknown}"
    assert sum(ex.kind == "ci" for ex in examples) >= 2, "the quick start lost its CI blocks"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, request) -> Path:
    """A scratch directory with the quick start's outputs: models/tiny and example/."""
    scratch = tmp_path_factory.mktemp("readme")
    models = ROOT / "models" / "tiny"
    if (models / "manifest.json").exists():
        shutil.copytree(models, scratch / "models" / "tiny")
    else:
        shutil.copytree(request.getfixturevalue("tiny_model_dir"), scratch / "models" / "tiny")
    example = ROOT / "example"
    if (example / "clip.mp4").exists() and (example / "mix.wav").exists():
        shutil.copytree(example, scratch / "example", ignore=shutil.ignore_patterns("separated*"))
    else:
        subprocess.run([sys.executable, "-m", "mmsep.runtime.example", "--out",
                        str(scratch / "example")], check=True, capture_output=True)
    return scratch


@pytest.mark.parametrize("example", _params())
def test_readme_example_runs(example: Example, workspace: Path):
    command = ([sys.executable, "-c", example.body] if example.lang == "python"
               else ["bash", "-euo", "pipefail", "-c", example.body])
    env = dict(os.environ)
    done = subprocess.run(command, cwd=workspace, env=env, capture_output=True, text=True,
                          timeout=_TIMEOUT_S)
    assert done.returncode == 0, (
        f"README.md line {example.line} ({example.lang}) exited {done.returncode}\n"
        f"--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}")
