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
