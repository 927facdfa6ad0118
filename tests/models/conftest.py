import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny-preset ops: intra-op threads on a shared 2-core runner cost more than they give
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
