"""Data-parallel fine-tuning under torchrun: 2 CPU processes, gloo, a handful of steps."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.train.test_cli import _args

torch = pytest.importorskip("torch")


@pytest.mark.slow
def test_torchrun_two_processes(corpus, weights_dir, tables, tmp_path):
    import mmsep.models as mm

    out, cache = tmp_path / "run", tmp_path / "cache"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", "-m", "mmsep.train.cli",
               *_args(corpus, weights_dir, tables, out, "--steps", "4", "--device", "cpu",
                      "--save-every", "2", "--cache", str(cache))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("step 4/4") == 1  # only rank 0 reports
    # each process computed half of the new cache (8 + 4 clips), and both read all of it
    assert "features (train, this process's share of 2): 4/4 clips" in done.stdout
    assert "features (val, this process's share of 2): 2/2 clips" in done.stdout
    assert len(list(cache.glob("*.pt"))) == 12
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert all(r["clips_per_s"] > 0 for r in rows if "loss" in r)
    ft = mm.load_flow(out / "ft.pt", duration=2.0)
    start = mm.load_flow(weights_dir / "weights/mmaudio_tiny.pth", duration=2.0)
    assert ft.config.separation
    assert torch.equal(ft.state_dict()["fused_blocks.0.attn.qkv.weight"],
                       start.state_dict()["fused_blocks.0.attn.qkv.weight"])
    # a batch that does not split over the processes is refused before any feature
    odd = subprocess.run(
        [*command[:command.index("mmsep.train.cli") + 1],
         *_args(corpus, weights_dir, tables, tmp_path / "odd", "--device", "cpu",
                "--batch-size", "3", "--cache", str(tmp_path / "odd_cache"))],
        capture_output=True, text=True, env=env, timeout=900)
    assert odd.returncode != 0 and "batch size 3 is not a multiple of the 2 processes" in \
        odd.stderr
    assert not list((tmp_path / "odd_cache").glob("*.pt"))
    # resuming needs the same number of processes
    shutil.copytree(out, tmp_path / "copy")
    single = subprocess.run(
        [sys.executable, "-m", "mmsep.train.cli",
         *_args(corpus, weights_dir, tables, tmp_path / "copy", "--steps", "5", "--resume")],
        capture_output=True, text=True, env=env, timeout=600)
    assert single.returncode == 2 and "processes 2 -> 1" in single.stderr
