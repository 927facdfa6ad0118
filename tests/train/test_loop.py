import json

import pytest

from mmsep.train import recipe
from mmsep.train.loop import TrainOptions, Trainer

torch = pytest.importorskip("torch")


def make_trainer(generator_net, encoders, tables, run_dir, init="reinit", **options):
    options = {"steps": 4, "batch_size": 2, "warmup": 0, "val_every": 2, "save_every": 2,
               "log_every": 2, **options}
    net = recipe.separation_start(generator_net, init, seed=0)
    return Trainer(net, encoders, tables["train"], tables["val"], TrainOptions(**options),
                   run_dir, log=lambda msg: None)


def test_loss_falls_on_a_fixed_batch(generator_net, encoders, tables, tmp_path):
    trainer = make_trainer(generator_net, encoders, tables, tmp_path, lr=3e-3, steps=20)
    batch = trainer.train_batch(0)
    trainer.train_batch = lambda step: batch
    before = {n: p.detach().clone() for n, p in trainer.net.named_parameters()}
    losses = [trainer.train_step() for _ in range(20)]
    print(f"fixed-batch loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < 0.6 * losses[0]
    trainable = set(trainer.trainable)
    for name, param in trainer.net.named_parameters():
        # the queries of the last joint block's clip/text streams feed outputs it discards
        if name in trainable and _has_gradient(param):
            assert not torch.equal(param, before[name]), name
        else:
            assert torch.equal(param, before[name]), name
    unused = [n for n, p in trainer.net.named_parameters() if n in trainable
              and not _has_gradient(p)]
    assert len(unused) < 0.1 * len(trainable)
    # the EMA trails the raw weights but has moved from the start
    w = "joint_blocks.0.latent_block.attn.qkv.weight"
    shadow = trainer.ema.shadow[w]
    assert not torch.equal(shadow, before[w])
    assert not torch.equal(shadow, trainer.net.state_dict()[w])


def _has_gradient(param) -> bool:
    return param.grad is not None and bool(param.grad.abs().sum() > 0)


def test_batches_share_the_posterior_noise_and_are_seeded(generator_net, encoders, tables,
                                                          tmp_path):
    trainer = make_trainer(generator_net, encoders, tables, tmp_path)
    a, b = trainer.train_batch(5), trainer.train_batch(5)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["x1"], trainer.train_batch(6)["x1"])
    assert a["x1"].shape == a["x_mix"].shape == a["x0"].shape == (2, 87, 40)


def test_targets_are_first_windows_and_interferers_windows_at_random_starts(
        generator_net, encoders, tables, tmp_path, monkeypatch):
    """Each sample of a clip's audio says which clip and sample it is, so the windows that
    reach mix_at_snr can be read back."""
    import dataclasses

    from mmsep.train import loop

    window = generator_net.config.lengths.audio_samples
    span = 2 * window
    stamps = 1e6 * torch.arange(8.0)[:, None] + torch.arange(float(span))[None, :]
    table = dataclasses.replace(tables["train"], audio=stamps,
                                audio_len=torch.full((8,), span, dtype=torch.int64))
    trainer = make_trainer(generator_net, encoders, {**tables, "train": table}, tmp_path)
    seen = []
    original = loop.mix_at_snr
    monkeypatch.setattr(loop, "mix_at_snr", lambda t, i, snr: seen.append((t, i))
                        or original(t / 1e7, i / 1e7, snr))
    for step in range(8):
        trainer.train_batch(step)
    starts = []
    for rows, is_target in [(t, True) for t, _ in seen] + [(i, False) for _, i in seen]:
        clips, begins = (rows[:, 0] // 1e6).long(), (rows[:, 0] % 1e6).long()
        for row, clip, begin in zip(rows, clips, begins):
            assert torch.equal(row, stamps[clip, begin:begin + window])
        if is_target:
            assert (begins == 0).all()
        else:
            assert (begins <= window).all()
            starts += begins.tolist()
    assert len(set(starts)) == len(starts) == 16  # 16 interferers, each from its own start


def test_validation_does_not_depend_on_the_training_seed(generator_net, encoders, tables,
                                                         tmp_path):
    a = make_trainer(generator_net, encoders, tables, tmp_path / "a", seed=1)
    b = make_trainer(generator_net, encoders, tables, tmp_path / "b", seed=2)
    assert a.validate() == b.validate()
    assert sum(len(v["x1"]) for v in a.val_batches()) == len(tables["val"])


def test_every_validation_reaches_the_console(generator_net, encoders, tables, tmp_path):
    """Also one that falls between progress lines (it went only to metrics.jsonl)."""
    trainer = make_trainer(generator_net, encoders, tables, tmp_path, steps=3, val_every=1,
                           log_every=2, save_every=3)
    lines = []
    trainer.log = lines.append
    trainer.fit()
    assert [line.split()[1] for line in lines] == ["0/3", "1/3", "2/3", "3/3"]
    assert all("val_loss" in line for line in lines)
    assert "loss" not in lines[1].replace("val_loss", "")


def test_resume_continues_exactly(generator_net, encoders, tables, tmp_path):
    straight = make_trainer(generator_net, encoders, tables, tmp_path / "straight")
    straight.fit()
    first = make_trainer(generator_net, encoders, tables, tmp_path / "resumed", steps=2)
    first.fit()
    second = make_trainer(generator_net, encoders, tables, tmp_path / "resumed")
    second.resume()
    assert second.step == 2
    second.fit()
    for name, value in straight.net.state_dict().items():
        assert torch.equal(value, second.net.state_dict()[name]), name
    ft = [torch.load(tmp_path / d / "ft.pt") for d in ("straight", "resumed")]
    assert all(torch.equal(v, ft[1][k]) for k, v in ft[0].items())
    rows = [json.loads(r) for r in (tmp_path / "straight/metrics.jsonl").read_text().splitlines()]
    again = [json.loads(r) for r in (tmp_path / "resumed/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [r["step"] for r in again] == [0, 2, 2, 4, 4]
    assert [r.get("val_loss") for r in rows] == [r.get("val_loss") for r in again]
    with pytest.raises(ValueError, match="lr"):
        make_trainer(generator_net, encoders, tables, tmp_path / "resumed", lr=1e-3).resume()


def test_a_run_that_diverges_stops_and_keeps_its_last_checkpoint(generator_net, encoders,
                                                                 tables, tmp_path):
    trainer = make_trainer(generator_net, encoders, tables, tmp_path)
    loss = trainer._loss
    trainer._loss = lambda model, batch: loss(model, batch) * (
        float("nan") if trainer.step >= 2 else 1.0)
    with pytest.raises(ValueError, match=r"^step 3: the training loss is nan \(the run diverged\)"):
        trainer.fit()
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert saved["step"] == 2
    assert all(bool(torch.isfinite(v).all()) for v in torch.load(tmp_path / "ft.pt").values())


def test_stopped_between_its_two_files_the_run_resumes_to_the_same_weights(
        generator_net, encoders, tables, tmp_path, monkeypatch):
    import mmsep.train.loop as loop

    straight = make_trainer(generator_net, encoders, tables, tmp_path / "straight")
    straight.fit()
    real_save, saved = loop.save_atomically, []

    def stop_before_the_last_file(obj, path):  # saves at steps 2 and 4, two files each
        if len(saved) == 3:
            raise KeyboardInterrupt
        saved.append(path.name)
        real_save(obj, path)

    monkeypatch.setattr(loop, "save_atomically", stop_before_the_last_file)
    with pytest.raises(KeyboardInterrupt):
        make_trainer(generator_net, encoders, tables, tmp_path / "cut").fit()
    monkeypatch.setattr(loop, "save_atomically", real_save)
    resumed = make_trainer(generator_net, encoders, tables, tmp_path / "cut")
    resumed.resume()  # from step 2: the run is not over, whatever ft.pt holds
    assert resumed.step == 2
    resumed.fit()
    ft = [torch.load(tmp_path / d / "ft.pt") for d in ("straight", "cut")]
    assert all(torch.equal(v, ft[1][k]) for k, v in ft[0].items())


def test_validation_batches_carry_the_noise_free_latents(generator_net, encoders, tables,
                                                         tmp_path, monkeypatch):
    trainer = make_trainer(generator_net, encoders, tables, tmp_path)
    seen = []
    posterior = trainer.encoders.posterior
    monkeypatch.setattr(trainer.encoders, "posterior", lambda w: seen.append(posterior(w))
                        or seen[-1])
    batch, net = trainer.val_batches()[0], trainer.net
    mean, std = seen[0]
    b = batch["x1"].shape[0]
    torch.testing.assert_close(batch["x1_mean"], net.normalize(mean[:b]))
    torch.testing.assert_close(batch["x_mix_mean"], net.normalize(mean[b:]))
    # the posterior samples around those means share one noise draw
    eps_target = (net.unnormalize(batch["x1"]) - mean[:b]) / std[:b]
    eps_mixture = (net.unnormalize(batch["x_mix"]) - mean[b:]) / std[b:]
    torch.testing.assert_close(eps_target, eps_mixture, rtol=1e-4, atol=1e-4)
    assert not torch.equal(batch["x1"], batch["x1_mean"])
    assert "x1_mean" not in trainer.train_batch(0)


def test_a_full_disk_while_saving_is_the_oserror_and_leaves_nothing(tmp_path):
    """torch's zip writer reports a failed write as a RuntimeError; save_atomically raises the
    write's own OSError (here a file size limit, in a process of its own) and leaves no file."""
    import subprocess
    import sys

    script = ("import resource, sys, torch\n"
              "from pathlib import Path\n"
              "from mmsep.train.torch_files import save_atomically\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))\n"
              "try:\n"
              "    save_atomically({'w': torch.zeros(1 << 20)}, Path(sys.argv[1]))\n"
              "except OSError as exc:\n"
              "    print(exc.errno, exc.strerror, exc.filename)\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "ft.pt")],
                          capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == f"27 File too large {tmp_path / 'ft.pt'}", done.stderr
    assert list(tmp_path.iterdir()) == []
