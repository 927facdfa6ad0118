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
