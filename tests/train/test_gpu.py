"""Fine-tuning on a CUDA device (GPU machines only): the query features computed there, bf16
autocast steps, and a resume that continues on the device (its EMA copies included)."""

import pytest
from click.testing import CliRunner

from mmsep.train.cli import main
from tests.train.test_cli import _args

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


def _relative_l2(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_a_run_and_its_resume_train_on_the_gpu(corpus, weights_dir, tables, tmp_path):
    out, cache = tmp_path / "run", tmp_path / "cache"
    args = _args(corpus, weights_dir, tables, out, "--device", "cuda", "--cache", str(cache))
    first = CliRunner().invoke(main, [*args, "--steps", "2"])
    assert first.exit_code == 0, first.output
    again = CliRunner().invoke(main, [*args, "--steps", "4", "--resume"])
    assert again.exit_code == 0, again.output
    assert "step 4/4" in again.output
    # the same cache entries as the CPU's (same names), their features within TF32 rounding
    entries = sorted(cache.glob("*.pt"))
    assert [p.name for p in entries] == sorted(p.name for p in tables["cache"].glob("*.pt"))
    for path in entries:
        gpu, cpu = (torch.load(p, weights_only=True) for p in (path, tables["cache"] / path.name))
        assert torch.equal(gpu["audio"], cpu["audio"])
        for name in ("clip_f", "sync_f", "text_f"):
            assert (gpu[name] is None) == (cpu[name] is None), name
            if cpu[name] is not None:
                assert gpu[name].device.type == "cpu"
                assert _relative_l2(gpu[name], cpu[name]) < 1e-2, (path.name, name)
