import math

import pytest

from mmsep.train import recipe

torch = pytest.importorskip("torch")


def test_zero_mix_start_is_the_pretrained_generator(generator_net):
    sep = recipe.separation_start(generator_net, "zero-mix", seed=0)
    assert sep.config.separation and not generator_net.config.separation
    c = sep.config
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, c.latent_seq_len, c.latent_dim, generator=gen)
    mix = torch.randn(x.shape, generator=gen)
    feats = [e.expand(2, -1, -1) for e in sep.empty_conditions(1)]
    t = torch.tensor([0.2, 0.7])
    with torch.no_grad():
        assert torch.allclose(sep(x, t, *feats, x_mix=mix), generator_net(x, t, *feats),
                              atol=1e-6)


def test_reinit_draws_only_the_input_projection_afresh(generator_net):
    a = recipe.separation_start(generator_net, "reinit", seed=3).state_dict()
    b = recipe.separation_start(generator_net, "reinit", seed=3).state_dict()
    c = recipe.separation_start(generator_net, "reinit", seed=4).state_dict()
    pretrained = generator_net.state_dict()
    for name, value in a.items():
        assert torch.equal(value, b[name])
        if name.startswith("audio_input_proj."):
            assert not torch.equal(value, c[name])
        else:
            assert torch.equal(value, pretrained[name])
    assert a["audio_input_proj.0.weight"].shape[1] == 2 * generator_net.config.latent_dim
    with pytest.raises(ValueError, match="init_input_proj"):
        recipe.separation_start(generator_net, "copy", seed=0)


def test_trainable_parts_are_the_authors(generator_net):
    net = recipe.separation_start(generator_net, "reinit", seed=0)
    names = recipe.set_trainable(net)
    assert names and all(n.startswith(("audio_input_proj.", "joint_blocks.")) for n in names)
    assert {n.split(".")[0] for n in names} == {"audio_input_proj", "joint_blocks"}
    frozen = {n.split(".")[0] for n, p in net.named_parameters() if not p.requires_grad}
    assert {"fused_blocks", "final_layer", "t_embed", "clip_input_proj", "empty_clip_feat",
            "latent_mean"} <= frozen
    with_fused = recipe.set_trainable(net, train_fused=True)
    assert {n.split(".")[0] for n in with_fused} == {"audio_input_proj", "joint_blocks",
                                                      "fused_blocks", "final_layer"}


def test_query_dropout_uses_the_empty_features(generator_net):
    net = generator_net
    feats = {k: torch.randn(3, *e.shape[1:]) for k, e in
             zip(("clip_f", "sync_f", "text_f"), net.empty_conditions(1))}
    out = recipe.drop_queries(net, feats, torch.tensor([True, False, True]),
                              torch.tensor([False, True, True]))
    empty = dict(zip(("clip_f", "sync_f", "text_f"), net.empty_conditions(1)))
    for key, dropped in (("clip_f", 1), ("sync_f", 1), ("text_f", 0)):
        assert torch.equal(out[key][dropped], empty[key][0])
        kept = [i for i in range(3) if i != dropped]
        assert torch.equal(out[key][kept], feats[key][kept])


def test_cfm_loss_is_the_flow_matching_objective():
    class Constant(torch.nn.Module):  # predicts v = 0: the loss is E|x1 - x0|^2
        def forward(self, xt, t, clip_f, sync_f, text_f, x_mix):
            return torch.zeros_like(xt)

    x1, x0 = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    loss = recipe.cfm_loss(Constant(), x1, x1, {"clip_f": None, "sync_f": None, "text_f": None},
                           torch.rand(2), x0)
    assert torch.allclose(loss, (x1 - x0).pow(2).mean(dim=(1, 2)))
    t = recipe.sample_time(100_000, torch.Generator().manual_seed(0))
    logit = torch.log(t / (1 - t))  # logit-normal: logit(t) ~ N(0, 1)
    assert abs(logit.mean()) < 0.02 and abs(logit.std() - 1) < 0.02


def test_power_ema_follows_the_authors_update():
    gamma = recipe.ema_gamma(0.05)
    assert math.isclose(math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))), 0.05,
                        rel_tol=1e-9)
    net = torch.nn.Linear(2, 1, bias=False)
    ema = recipe.PowerEMA(net)
    expected = None
    with torch.no_grad():
        for step, v in enumerate([3.0, -1.0, 2.0, 5.0, 0.5], start=1):
            net.weight.fill_(v)
            ema.update(net)
            # nitrous_ema KarrasEMA(step_size_correction=True, update_every=1): its counter is
            # ``step`` after the update; the first update copies the network
            beta = ((1 - 1 / (step + 1)) ** (1 + gamma)
                    * (1 - 1 / (step + 2)) ** (1 + gamma)) ** 0.5
            expected = torch.full_like(net.weight, v) if expected is None else \
                expected + (1 - beta) * (v - expected)
            assert torch.allclose(ema.shadow["weight"], expected, rtol=1e-6)
    assert torch.equal(ema.copy_to(torch.nn.Linear(2, 1, bias=False)).weight, ema.shadow["weight"])


def test_power_ema_resumes_on_the_networks_device():
    """A checkpoint is read to the CPU; the EMA must stay where the network is (the meta device
    stands in for a GPU here), and a loaded state owns its tensors."""
    saved = recipe.PowerEMA(torch.nn.Linear(2, 1))
    saved.update(torch.nn.Linear(2, 1))
    elsewhere = recipe.PowerEMA(torch.nn.Linear(2, 1).to("meta"))
    elsewhere.load_state_dict(saved.state_dict())
    assert {v.device.type for v in elsewhere.shadow.values()} == {"meta"}
    here = recipe.PowerEMA(torch.nn.Linear(2, 1))
    here.load_state_dict(saved.state_dict())
    assert here.updates == 1 and torch.equal(here.shadow["weight"], saved.shadow["weight"])
    assert here.shadow["weight"].data_ptr() != saved.shadow["weight"].data_ptr()


def test_learning_rate_schedule_matches_the_authors_schedulers():
    """Warm-up, then MultiStepLR at 80 % / 90 % of the steps chained by SequentialLR (whose
    second scheduler counts from the end of the warm-up), as the authors' runner builds it."""
    warmup, total = 4, 100
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    chain = torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / (warmup + 1)),
        torch.optim.lr_scheduler.MultiStepLR(opt, [int(0.8 * total), int(0.9 * total)], 0.1),
    ], [warmup])
    reference = []
    for _ in range(total + warmup):
        reference.append(opt.param_groups[0]["lr"])
        opt.step()
        chain.step()
    factors = [recipe.lr_factor(s, warmup=warmup, total=total) for s in range(total + warmup)]
    assert factors == pytest.approx(reference, rel=1e-12)
    assert factors[warmup + 79] == 1.0 and factors[warmup + 80] == pytest.approx(0.1)
