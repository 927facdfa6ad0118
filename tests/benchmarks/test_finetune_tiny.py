"""benchmarks/finetune_tiny.py's command line: without matplotlib (the ``bench`` extra), which
its figure needs, it is refused up front instead of failing after the whole proof has run."""

import sys
from unittest import mock

import pytest
from click.testing import CliRunner

pytest.importorskip("torch", reason="the fine-tuning proof needs torch")


def test_missing_matplotlib_is_refused_before_any_work(tmp_path):
    from benchmarks import finetune_tiny

    with mock.patch.dict(sys.modules, {"matplotlib": None}), \
            mock.patch.object(finetune_tiny, "proof") as proof:
        result = CliRunner().invoke(finetune_tiny.main, ["--out", str(tmp_path / "proof")])
    assert result.exit_code == 2, result.output
    assert "matplotlib" in result.output and "bench]" in result.output
    proof.assert_not_called()
    assert not (tmp_path / "proof").exists()
