import torch
from torch import nn

from mmsep.models.randomize import randomize_


class _ZeroInit(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(32, 16)
        self.norm = nn.LayerNorm(16)
        self.empty_feat = nn.Parameter(torch.zeros(1, 16))
        self.scale = nn.Parameter(torch.zeros(()))
        for p in self.parameters():
            nn.init.zeros_(p)


def test_every_parameter_randomised_and_nonzero():
    m = randomize_(_ZeroInit(), seed=3)
    for name, p in m.named_parameters():
        assert torch.all(p != 0), name
    # gains stay near one, matrices scale with fan-in, biases are small
    assert abs(m.norm.weight.mean().item() - 1.0) < 0.1
    assert 0.1 < m.proj.weight.std().item() * 32 ** 0.5 < 2.0
    assert m.proj.bias.abs().max().item() < 0.5


def test_seeded_and_order_independent():
    a = randomize_(_ZeroInit(), seed=1)
    b = randomize_(_ZeroInit(), seed=1)
    c = randomize_(_ZeroInit(), seed=2)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        assert not torch.equal(pa, pc), name
