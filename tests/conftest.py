import pytest


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
    """The tiny preset exported once per test session (about a minute on 2 cores)."""
    from mmsep.export.exporter import export_model
    from mmsep.models import build_components

    out = tmp_path_factory.mktemp("models") / "tiny"
    export_model(build_components("tiny", seed=0), out, sources={"preset": "tiny", "seed": 0},
                 log=lambda msg: None)
    return out
