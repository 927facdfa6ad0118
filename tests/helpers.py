"""Small helpers shared by the tests."""

import numpy as np

# The shared test model (tests/conftest.py) uses 2 s windows: every code path is the same as at
# 8 s, at a quarter of the cost.
TINY_WINDOW_SECONDS = 2.0
TINY_SEED = 0


def rel_l2(a, b) -> float:
    """Relative L2 error of ``a`` against the reference ``b`` (computed in float64)."""
    a = np.asarray(_to_numpy(a), dtype=np.float64)
    b = np.asarray(_to_numpy(b), dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _to_numpy(x):
    if hasattr(x, "detach"):
        return x.detach().cpu().double().numpy()
    return x


def without_fp16_copies(model_dir, dest):
    """A copy of ``model_dir`` as mmsep-export --precision fp32 writes it: no fp16 graphs, none
    listed in its manifest."""
    import json
    import shutil
    from pathlib import Path

    dest = Path(dest)
    shutil.copytree(model_dir, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    for stage in manifest["stages"].values():
        for copy in stage.pop("reduced", {}).values():
            for name in copy["files"]:
                (dest / name).unlink()
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


def damaged_copy(model_dir, dest, name: str, offset: int = 100):
    """A copy of ``model_dir`` whose file ``name`` has three bytes overwritten at ``offset`` (its
    size unchanged, its SHA-256 not)."""
    import shutil
    from pathlib import Path

    dest = Path(dest)
    shutil.copytree(model_dir, dest)
    with open(dest / name, "r+b") as f:
        f.seek(offset)
        f.write(b"\x00\x01\x02")
    return dest


def interrupting(call, on_call: int):
    """``call`` wrapped to raise KeyboardInterrupt (a Ctrl-C) on its ``on_call``-th use."""
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == on_call:
            raise KeyboardInterrupt
        return call(*args, **kwargs)

    return wrapped
