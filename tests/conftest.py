import pytest

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
    """The tiny preset (random weights, seed 0, 2 s windows) exported once per test session."""
    pytest.importorskip("torch", reason="exporting the test model needs torch")
    import torch

    from mmsep.export.exporter import export_model
    from mmsep.models import build_components

    out = tmp_path_factory.mktemp("models") / "tiny"
    with torch.no_grad():
        export_model(build_components("tiny", duration=TINY_WINDOW_SECONDS, seed=TINY_SEED), out,
                     sources={"preset": "tiny", "seed": TINY_SEED}, log=lambda msg: None)
    return out
