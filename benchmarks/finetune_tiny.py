"""The fine-tuning proof run on the tiny preset: corpus, two fine-tunes, separation, export, parity.

    python benchmarks/finetune_tiny.py --out /tmp/ft-proof --steps 300 [--seed 0]

1. writes the synthetic corpus (mmsep.train.synthetic) and a random "pretrained" tiny generation
   network with its companions in the release layout, made to look trained where it matters
   (``pretrained_like``: a VAE posterior with small noise, latent statistics from the data);
2. runs ``mmsep-finetune`` twice, ``--init-input-proj reinit`` and ``zero-mix``, side by side
   (one thread each) on the same feature cache;
3. on the fixed validation mixtures, samples the separated latent (Euler + CFG, fresh x0) from
   the start network and from each ft.pt and reports its relative L2 distance to the target
   latent next to the mixture latent's, for the latents training sees (posterior samples sharing
   one noise draw) and for the noise-free posterior means;
4. exports the reinit ft.pt with ``mmsep-export --checkpoint``, separates with ``mmsep-run`` and
   checks the ONNX Runtime latents against ``mmsep.models.sample`` on the fine-tuned weights;
5. writes ``proof.json`` (with the issue's criteria, ``criteria``) and ``finetune_tiny.png``
   (validation and training loss, distances; needs matplotlib: ``pip install ".[export,bench]"``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import click
import numpy as np

SECONDS = 2.0
INITS = ("reinit", "zero-mix")
# The "pretrained" VAE's encoder output: the mean half amplified, the log-variance half zeroed
# (std exactly 1), so the posterior noise is small next to the spread of the means, as in a
# trained VAE (a random one has std ~1 against a mean spread ~0.3: shared noise then dominates
# every latent). The decoder's input is scaled back. Proof setup only; the recipe is untouched.
VAE_MEAN_GAIN = 32.0


def _run(command: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(command, env=env, **kw)


def prepare(out: Path, per_class: int, val_per_class: int, seed: int) -> Path:
    """The corpus and the "pretrained" tiny components (release layout) under ``out``."""
    import mmsep.models as mm
    from mmsep.train.synthetic import write_split

    train = write_split(out / "corpus", "train", per_class, SECONDS, seed=seed)
    write_split(out / "corpus", "val", val_per_class, SECONDS, seed=seed)
    weights = out / "weights"
    comps = mm.build_components("tiny", separation=False, duration=SECONDS, seed=seed)
    pretrained_like(comps, train)
    mm.save_components(comps, weights)
    return weights


def pretrained_like(comps, clips_jsonl: Path) -> None:
    """Give random tiny components two properties of trained ones: a VAE posterior whose std is
    small next to its mean (VAE_MEAN_GAIN) and the flow network's latent statistics measured on
    the data (MMAudio's are per-channel mean and std of the VAE latents of its training set)."""
    import torch

    from mmsep.runtime.audio import read_audio
    from mmsep.train.data import read_clips

    vae, flow = comps.vae, comps.flow
    with torch.no_grad():
        out_w = vae.encoder.conv_out.weight
        out_w[:vae.latent_dim] *= VAE_MEAN_GAIN
        out_w[vae.latent_dim:] = 0.0
        vae.decoder.conv_in.weight /= VAE_MEAN_GAIN
        lengths = flow.config.lengths
        audio = [read_audio(c.source, lengths.mode.sample_rate)[:lengths.audio_samples]
                 for c in read_clips(clips_jsonl)]
        wave = torch.from_numpy(np.stack([np.pad(a, (0, lengths.audio_samples - a.size))
                                          for a in audio]))
        means = vae.encode_mean(comps.mel(wave)).transpose(1, 2)  # (K, N, C)
        flow.latent_mean.copy_(means.mean(dim=(0, 1)).view_as(flow.latent_mean))
        flow.latent_std.copy_(means.std(dim=(0, 1)).view_as(flow.latent_std))


def finetune(out: Path, weights: Path, steps: int, batch: int, lr: float,
             seed: int) -> dict[str, float]:
    """Both fine-tunes in parallel (the cache is built first, once); returns wall seconds."""
    common = ["--init", str(weights / "weights/mmaudio_tiny.pth"), "--weights-dir", str(weights),
              "--data", str(out / "corpus/train.jsonl"), "--val", str(out / "corpus/val.jsonl"),
              "--cache", str(out / "cache"), "--duration", str(SECONDS), "--steps", str(steps),
              "--batch-size", str(batch), "--lr", str(lr), "--warmup", "20", "--val-every", "25",
              "--log-every", "10", "--save-every", str(steps), "--seed", str(seed)]
    cli = [sys.executable, "-m", "mmsep.train.cli"]
    warm = _run(cli + common + ["--out", str(out / "cache-run"), "--steps", "1"])
    if warm.wait():
        raise SystemExit("the cache-building run failed")
    started = time.perf_counter()
    runs = {init: _run(cli + common + ["--out", str(out / f"run-{init}"), "--init-input-proj",
                                       init, "--quiet"]) for init in INITS}
    for init, proc in runs.items():
        if proc.wait():
            raise SystemExit(f"fine-tuning ({init}) failed")
    return {"wall_s": time.perf_counter() - started}


def separation(out: Path, weights: Path, batch_size: int, steps: int, cfg: float,
               seed: int) -> dict:
    """Relative L2 distance to the target latent on the fixed validation mixtures, two ways:
    ``posterior_sample`` as training sees the latents (posterior samples sharing one noise draw,
    normalised) and ``posterior_mean`` (normalised posterior means, no noise), each with the
    sampler conditioned on the mixture latent of the same kind. The sampler starts from fresh
    x0 (not the training x0)."""
    import torch

    import mmsep.models as mm
    from mmsep.train import recipe

    torch.set_grad_enabled(False)
    batches = _validation_batches(out, weights, batch_size)
    cat = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    conditions = {k: cat[k] for k in ("clip_f", "sync_f", "text_f")}
    x0 = torch.from_numpy(np.random.default_rng(123).standard_normal(cat["x1"].shape, np.float32))
    pretrained = mm.load_flow(weights / "weights/mmaudio_tiny.pth", duration=SECONDS)
    nets = {}
    for init in INITS:
        nets[f"{init}_start"] = recipe.separation_start(pretrained, init, seed=seed).eval()
        nets[f"{init}_tuned"] = mm.load_flow(out / f"run-{init}/ft.pt", duration=SECONDS)
    result = {}
    for kind, (target, mixture) in {"posterior_sample": ("x1", "x_mix"),
                                    "posterior_mean": ("x1_mean", "x_mix_mean")}.items():
        x1, x_mix = cat[target], cat[mixture]
        row = {"mixture": _relative_l2(x_mix, x1)}
        for name, net in nets.items():
            row[name] = _relative_l2(mm.sample(net, x0, conditions, x_mix, steps=steps, cfg=cfg),
                                     x1)
        result[kind] = row
    result["posterior_noise_relative"] = _relative_l2(cat["x1"], cat["x1_mean"])
    return result


def _validation_batches(out: Path, weights: Path, batch_size: int) -> list:
    """The fine-tunes' fixed validation mixtures (same clips, seeds, noise), with their means."""
    import torch

    from mmsep.train.cli import build_trainer
    from mmsep.train.loop import Ranks

    kw = {"init": weights / "weights/mmaudio_tiny.pth", "weights_dir": weights,
          "data": out / "corpus/train.jsonl", "val": out / "corpus/val.jsonl",
          "out": out / "eval", "cache": out / "cache", "duration": SECONDS, "steps": 1,
          "batch_size": batch_size, "lr": 1e-4, "warmup": 0, "val_every": 1, "save_every": 1,
          "log_every": 1, "init_input_proj": "reinit", "train_fused": False, "seed": 0,
          "val_seed": 0, "device": "cpu", "quiet": True}
    return build_trainer(kw, Ranks(), torch.device("cpu")).val_batches()


def _relative_l2(x, reference) -> float:
    """Mean over items of ||x - reference|| / ||reference||."""
    return float(((x - reference).flatten(1).norm(dim=1)
                  / reference.flatten(1).norm(dim=1)).mean())


def export_and_check(out: Path, weights: Path, steps: int, cfg: float) -> dict:
    """Export the reinit ft.pt, separate one mixture with mmsep-run and check the ONNX Runtime
    latents against the PyTorch sampler on the fine-tuned weights."""
    import soundfile
    import torch

    import mmsep.models as mm
    from mmsep.models.sampler import initial_noise, mixture_latent
    from mmsep.runtime import Separator, tokenize
    from mmsep.stages import POSTERIOR_SAMPLE

    ft, model = out / "run-reinit/ft.pt", out / "model"
    for command in (
            ["mmsep-export", "--checkpoint", str(ft), "--weights-dir", str(weights),
             "--duration", str(SECONDS), "--no-engines", "--out", str(model), "--quiet",
             "--force"],):
        if _run(command).wait():
            raise SystemExit(f"{command[0]} failed")
    clips = [json.loads(r) for r in (out / "corpus/val.jsonl").read_text().splitlines()]
    sr = 44100
    target, _ = soundfile.read(out / "corpus" / clips[0]["audio"], dtype="float32")
    other, _ = soundfile.read(out / "corpus" / clips[-1]["audio"], dtype="float32")
    mix = (0.5 * (target + other)).astype(np.float32)
    soundfile.write(out / "mix.wav", mix, sr)
    run = ["mmsep-run", "--model", str(model), "--mix", str(out / "mix.wav"),
           "--text", clips[0]["text"], "--steps", str(steps), "--cfg", str(cfg),
           "--output", str(out / "separated.wav")]
    ran = _run(run).wait() == 0 and (out / "separated.wav").is_file()

    with Separator(model, "ort-cpu") as sep:
        result = sep.process(mix=mix, text=clips[0]["text"], steps=steps, cfg=cfg, seed=5,
                             keep_latents=True)
    comps = mm.load_components(weights, flow=ft, duration=SECONDS)
    window = np.pad(mix, (0, comps.flow.config.lengths.audio_samples - mix.size))  # as the runtime
    flow = comps.flow
    with torch.no_grad():
        noise = initial_noise(1, flow.config, 5, convention=POSTERIOR_SAMPLE)
        x_mix = mixture_latent(torch.from_numpy(window)[None], comps.mel, comps.vae,
                               flow.latent_mean, flow.latent_std, convention=POSTERIOR_SAMPLE,
                               noise=noise.posterior_noise)
        text_f = comps.clip.encode_text(torch.from_numpy(tokenize([clips[0]["text"]])))
        want = mm.sample(flow, noise.x0, {"text_f": text_f}, x_mix, steps=steps, cfg=cfg)
    got = np.asarray(result.latents, dtype=np.float64).reshape(want.shape)
    ref = want.double().numpy()
    rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    return {"mmsep_run_ok": ran, "ort_vs_torch_rel_l2": rel,
            "mixture_latent": f"{POSTERIOR_SAMPLE} (mmsep-export's default)"}


def curves(out: Path) -> dict:
    result = {}
    for init in INITS:
        rows = [json.loads(r) for r in (out / f"run-{init}/metrics.jsonl").read_text().splitlines()]
        result[init] = {
            "val": [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r],
            "train": [(r["step"], r["loss"]) for r in rows if "loss" in r],
            "steps_per_s": float(np.median([r["steps_per_s"] for r in rows if "loss" in r])),
            "clips_per_s": float(np.median([r["clips_per_s"] for r in rows if "loss" in r]))}
    return result


def figure(path: Path, losses: dict, distances: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    for init, colour in zip(INITS, ("tab:blue", "tab:orange")):
        steps, values = zip(*losses[init]["val"])
        left.plot(steps, values, "-o", color=colour, label=f"{init}: validation (EMA)")
        steps, values = zip(*losses[init]["train"])
        left.plot(steps, values, ":", color=colour, alpha=0.6, label=f"{init}: training")
    left.set(xlabel="step", ylabel="flow-matching loss", title="tiny preset, synthetic corpus")
    left.legend()
    names = ["mixture"] + [f"{i}_{w}" for i in INITS for w in ("start", "tuned")]
    colours = ["grey", "lightsteelblue", "tab:blue", "navajowhite", "tab:orange"]
    for offset, (kind, hatch) in zip((-0.2, 0.2), (("posterior_sample", ""),
                                                   ("posterior_mean", "//"))):
        right.bar(np.arange(len(names)) + offset, [distances[kind][n] for n in names], width=0.4,
                  color=colours, hatch=hatch, edgecolor="black", label=kind.replace("_", " "))
    right.set_xticks(range(len(names)), [n.replace("_", "\n") for n in names])
    right.set(ylabel="relative L2 to the target latent", title="held-out mixtures")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def criteria(report: dict, margin: float = 0.8) -> dict[str, bool]:
    """The issue's proof criteria, per start: the validation loss falls, and for both latent
    kinds the fine-tuned sample is closer to the target than ``margin`` times the start's
    distance and than the mixture latent."""
    result = {}
    for init in INITS:
        val = report["losses"][init]["val"]
        result[f"{init}: validation loss falls"] = val[-1][1] < margin * val[0][1]
        for kind in ("posterior_sample", "posterior_mean"):
            d = report["distances"][kind]
            result[f"{init}: {kind} well below start"] = (
                d[f"{init}_tuned"] < margin * d[f"{init}_start"])
            result[f"{init}: {kind} below mixture"] = d[f"{init}_tuned"] < d["mixture"]
    return result


def proof(out: Path, steps: int = 300, batch_size: int = 8, lr: float = 1e-3,
          clips_per_class: int = 8, val_per_class: int = 4, sample_steps: int = 10,
          cfg: float = 1.0, seed: int = 0, reuse_runs: bool = False, export: bool = True) -> dict:
    """The whole proof under ``out``; returns (and writes to proof.json) its report."""
    from mmsep.runtime.atomic import write_json_atomically

    out.mkdir(parents=True, exist_ok=True)
    if reuse_runs:
        weights, timing = out / "weights", {}
    else:
        weights = prepare(out, clips_per_class, val_per_class, seed)
        timing = finetune(out, weights, steps, batch_size, lr, seed)
    report = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
              "vae_mean_gain": VAE_MEAN_GAIN, "timing": timing, "losses": curves(out),
              "distances": separation(out, weights, batch_size, sample_steps, cfg, seed),
              "machine": os.uname().nodename, "cpu_count": os.cpu_count()}
    if export:
        report["parity"] = export_and_check(out, weights, sample_steps, cfg)
    report["criteria"] = criteria(report)
    write_json_atomically(out / "proof.json", report)
    return report


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Working directory (corpus, weights, runs, model, results).")
@click.option("--steps", type=click.IntRange(1), default=300, show_default=True,
              help="Fine-tuning steps per run.")
@click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True,
              help="Peak learning rate (the recipe's 1e-4 moves a few hundred steps too little).")
@click.option("--clips-per-class", type=click.IntRange(1), default=8, show_default=True)
@click.option("--val-per-class", type=click.IntRange(1), default=4, show_default=True)
@click.option("--sample-steps", type=click.IntRange(1), default=10, show_default=True,
              help="Euler steps when sampling separated latents.")
@click.option("--cfg", type=float, default=1.0, show_default=True, help="Guidance strength.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the corpus, the pretrained weights and the fine-tunes.")
@click.option("--reuse-runs", is_flag=True,
              help="Keep the corpus, weights and finished runs already in --out; redo the checks.")
def main(out: Path, **options) -> None:
    """Fine-tune the tiny preset on the synthetic corpus and check the whole loop."""
    try:  # the figure comes last: a missing matplotlib must not cost the whole run
        import matplotlib  # noqa: F401
    except ImportError:
        raise click.UsageError("the figure needs matplotlib; install it with "
                               "pip install -e \".[export,bench]\"") from None
    report = proof(out, **options)
    figure(out / "finetune_tiny.png", report["losses"], report["distances"])
    click.echo(json.dumps({k: report[k] for k in ("timing", "distances", "parity", "criteria")},
                          indent=2))
    for init in INITS:
        val = report["losses"][init]["val"]
        click.echo(f"{init}: val_loss {val[0][1]:.3f} -> {val[-1][1]:.3f}; "
                   f"{report['losses'][init]['steps_per_s']:.2f} steps/s, "
                   f"{report['losses'][init]['clips_per_s']:.1f} clips/s (median)")


if __name__ == "__main__":
    main()
