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
