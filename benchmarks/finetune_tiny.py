"""The fine-tuning proof run on the tiny preset: corpus, two fine-tunes, separation, export, parity.

    python benchmarks/finetune_tiny.py --out /tmp/ft-proof --steps 300

1. writes the synthetic corpus (mmsep.train.synthetic) and a random "pretrained" tiny generation
   network with its companions in the release layout;
2. runs ``mmsep-finetune`` twice, ``--init-input-proj reinit`` and ``zero-mix``, side by side
   (one thread each) on the same feature cache;
3. on the fixed validation mixtures, samples the separated latent (Euler + CFG) from the start
   network and from each ft.pt and reports its relative L2 distance to the target latent, next to
   the mixture latent's distance;
4. exports the reinit ft.pt with ``mmsep-export --checkpoint``, separates with ``mmsep-run`` and
   checks the ONNX Runtime latents against ``mmsep.models.sample`` on the fine-tuned weights;
5. writes ``proof.json`` and ``finetune_tiny.png`` (validation and training loss, distances;
   needs matplotlib: ``pip install ".[export,bench]"``).
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


def _run(command: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(command, env=env, **kw)


def prepare(out: Path, per_class: int, val_per_class: int) -> Path:
    import mmsep.models as mm
    from mmsep.train.synthetic import write_split

    write_split(out / "corpus", "train", per_class, SECONDS, seed=0)
    write_split(out / "corpus", "val", val_per_class, SECONDS, seed=0)
    weights = out / "weights"
    comps = mm.build_components("tiny", separation=False, duration=SECONDS, seed=0)
    mm.save_components(comps, weights)
    return weights


def finetune(out: Path, weights: Path, steps: int, batch: int, lr: float) -> dict[str, float]:
    """Both fine-tunes in parallel (the cache is built first, once); returns wall seconds."""
    common = ["--init", str(weights / "weights/mmaudio_tiny.pth"), "--weights-dir", str(weights),
              "--data", str(out / "corpus/train.jsonl"), "--val", str(out / "corpus/val.jsonl"),
              "--cache", str(out / "cache"), "--duration", str(SECONDS), "--steps", str(steps),
              "--batch-size", str(batch), "--lr", str(lr), "--warmup", "20", "--val-every", "25",
              "--log-every", "10", "--save-every", str(steps)]
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


def separation(out: Path, weights: Path, steps: int, cfg: float) -> dict:
    """Relative L2 distance to the target latent on the fixed validation mixtures."""
    import torch

    import mmsep.models as mm
    from mmsep.train import recipe
    from mmsep.train.cli import build_trainer
    from mmsep.train.loop import Ranks

    torch.set_grad_enabled(False)
    kw = {"init": weights / "weights/mmaudio_tiny.pth", "weights_dir": weights,
          "data": out / "corpus/train.jsonl", "val": out / "corpus/val.jsonl",
          "out": out / "eval", "cache": out / "cache", "duration": SECONDS, "steps": 1,
          "batch_size": 16, "lr": 1e-4, "warmup": 0, "val_every": 1, "save_every": 1,
          "log_every": 1, "init_input_proj": "reinit", "train_fused": False, "seed": 0,
          "val_seed": 0, "device": "cpu", "quiet": True}
    trainer = build_trainer(kw, Ranks())
    batches = trainer.val_batches()
    x1 = torch.cat([b["x1"] for b in batches])
    x_mix = torch.cat([b["x_mix"] for b in batches])
    conditions = {k: torch.cat([b[k] for b in batches]) for k in ("clip_f", "sync_f", "text_f")}
    x0 = torch.from_numpy(np.random.default_rng(123).standard_normal(x1.shape, np.float32))

    def distance(x: torch.Tensor) -> float:
        return float(((x - x1).flatten(1).norm(dim=1) / x1.flatten(1).norm(dim=1)).mean())

    pretrained = mm.load_flow(weights / "weights/mmaudio_tiny.pth", duration=SECONDS)
    result = {"mixture": distance(x_mix)}
    for init in INITS:
        start = recipe.separation_start(pretrained, init, seed=0).eval()
        tuned = mm.load_flow(out / f"run-{init}/ft.pt", duration=SECONDS)
        for name, net in ((f"{init}_start", start), (f"{init}_tuned", tuned)):
            result[name] = distance(mm.sample(net, x0, conditions, x_mix, steps=steps, cfg=cfg))
    return result


def export_and_check(out: Path, weights: Path, steps: int, cfg: float) -> dict:
    """Export the reinit ft.pt, separate one mixture with mmsep-run and check the ONNX Runtime
    latents against the PyTorch sampler on the fine-tuned weights."""
    import soundfile
    import torch

    import mmsep.models as mm
    from mmsep.export.wrappers import MixEncoderStage
    from mmsep.models.sampler import initial_noise
    from mmsep.runtime import Separator, tokenize

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
    with torch.no_grad():
        x_mix = MixEncoderStage(comps.mel, comps.vae, comps.flow)(torch.from_numpy(window)[None])
        x0, _ = initial_noise(1, comps.flow.config, 5)
        text_f = comps.clip.encode_text(torch.from_numpy(tokenize([clips[0]["text"]])))
        want = mm.sample(comps.flow, x0, {"text_f": text_f}, x_mix, steps=steps, cfg=cfg)
    got = np.asarray(result.latents, dtype=np.float64).reshape(want.shape)
    ref = want.double().numpy()
    rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    return {"mmsep_run_ok": ran, "ort_vs_torch_rel_l2": rel,
            "mixture_latent": "MixEncoderStage of the export (main: normalised posterior mean)"}


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

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for init, colour in zip(INITS, ("tab:blue", "tab:orange")):
        steps, values = zip(*losses[init]["val"])
        left.plot(steps, values, "-o", color=colour, label=f"{init}: validation (EMA)")
        steps, values = zip(*losses[init]["train"])
        left.plot(steps, values, ":", color=colour, alpha=0.6, label=f"{init}: training")
    left.set(xlabel="step", ylabel="flow-matching loss", title="tiny preset, synthetic corpus")
    left.legend()
    names = ["mixture"] + [f"{i}_{w}" for i in INITS for w in ("start", "tuned")]
    right.bar(range(len(names)), [distances[n] for n in names],
              color=["grey", "tab:blue", "tab:blue", "tab:orange", "tab:orange"])
    right.set_xticks(range(len(names)), [n.replace("_", "\n") for n in names])
    right.set(ylabel="relative L2 to the target latent", title="held-out mixtures")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


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
@click.option("--reuse-runs", is_flag=True,
              help="Keep the corpus, weights and finished runs already in --out; redo the checks.")
def main(out: Path, steps: int, batch_size: int, lr: float, clips_per_class: int, val_per_class: int,
         sample_steps: int, cfg: float, reuse_runs: bool) -> None:
    """Fine-tune the tiny preset on the synthetic corpus and check the whole loop."""
    out.mkdir(parents=True, exist_ok=True)
    if reuse_runs:
        weights, timing = out / "weights", {}
    else:
        weights = prepare(out, clips_per_class, val_per_class)
        timing = finetune(out, weights, steps, batch_size, lr)
    losses = curves(out)
    distances = separation(out, weights, sample_steps, cfg)
    parity = export_and_check(out, weights, sample_steps, cfg)
    report = {"steps": steps, "batch_size": batch_size, "lr": lr, "timing": timing, "losses": losses,
              "distances": distances, "parity": parity, "machine": os.uname().nodename,
              "cpu_count": os.cpu_count()}
    (out / "proof.json").write_text(json.dumps(report, indent=2))
    figure(out / "finetune_tiny.png", losses, distances)
    click.echo(json.dumps({k: report[k] for k in ("timing", "distances", "parity")}, indent=2))
    for init in INITS:
        val = losses[init]["val"]
        click.echo(f"{init}: val_loss {val[0][1]:.3f} -> {val[-1][1]:.3f}; "
                   f"{losses[init]['steps_per_s']:.2f} steps/s, "
                   f"{losses[init]['clips_per_s']:.1f} clips/s (median)")


if __name__ == "__main__":
    main()
