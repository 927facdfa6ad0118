"""The training loop: batches of fresh mixtures, the flow-matching step, EMA, validation,
checkpoints, metrics; one process or several under torchrun (DDP).

Randomness is a pure function of (seed, rank, step): every step draws its clips, interferers,
SNRs, posterior noise, times, x0 and query dropout from its own generator, so a resumed run
continues exactly as an uninterrupted one. The validation set is a fixed list of mixtures drawn
from ``val_seed`` alone (one per validation clip), with fixed times and noises and no dropout, so
validation losses of different runs on the same clips are comparable. Validation uses the EMA
weights (what ft.pt ships).

Files in the run directory: ``checkpoint.pt`` (network, EMA, optimiser, step; written atomically
every ``save_every`` steps and at the end), ``ft.pt`` (the EMA network's state dict, loadable with
``mmsep.models.load_flow``) and ``metrics.jsonl`` (one JSON object per log line).
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from mmsep.models.io import TRAINING_CHECKPOINT_KEYS
from mmsep.runtime.atomic import atomic_output, remove_stale_partials

from . import recipe
from .data import draw_interferers, draw_snr, draw_window_starts, mix_at_snr
from .features import ClipTable, Encoders
from .torch_files import save_atomically

CHECKPOINT, WEIGHTS, METRICS = "checkpoint.pt", "ft.pt", "metrics.jsonl"


@dataclass(frozen=True)
class TrainOptions:
    steps: int = 1000
    batch_size: int = 8  # over all processes
    lr: float = recipe.LEARNING_RATE
    warmup: int = 100
    val_every: int = 50
    save_every: int = 100
    log_every: int = 10
    seed: int = 0
    val_seed: int = 0
    train_fused: bool = False


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def check_batch_split(options: TrainOptions, world: int) -> None:
    """ValueError unless the batch splits evenly over ``world`` processes."""
    if options.batch_size % world:
        raise ValueError(f"batch size {options.batch_size} is not a multiple of the {world} "
                         "processes")


def _generator(*key: int) -> torch.Generator:
    return torch.Generator().manual_seed(hash(key) & 0x7FFF_FFFF_FFFF_FFFF)


class Trainer:
    def __init__(self, net, encoders: Encoders, train: ClipTable, val: ClipTable,
                 options: TrainOptions, run_dir: str | os.PathLike, *, ranks: Ranks = Ranks(),
                 device: str | torch.device = "cpu", log: Callable[[str], None] = print,
                 setup: dict | None = None):
        """``setup``: what else a resumed run must share with the saved one (the command line's
        window length and clip lists), saved with every checkpoint and compared on resume."""
        check_batch_split(options, ranks.world)
        self.options, self.ranks, self.log = options, ranks, log
        self.setup = dict(setup or {})
        self.device = torch.device(device)
        self.run_dir = Path(run_dir)
        self.encoders = encoders
        encoders.mel.to(self.device)
        encoders.vae.to(self.device)
        self.train_table, self.val_table = train, val
        self.net = net.to(self.device).train()
        self.trainable = recipe.set_trainable(self.net, options.train_fused)
        self.model = self.net
        if ranks.world > 1:
            # the last joint block's clip/text queries get no gradient (as upstream's)
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.net, broadcast_buffers=False, find_unused_parameters=True)
        amp = self.device.type == "cuda"
        self.autocast = dict(device_type=self.device.type, dtype=torch.bfloat16, enabled=amp)
        self.optimizer = torch.optim.AdamW(
            [p for p in self.net.parameters() if p.requires_grad], lr=options.lr,
            betas=recipe.ADAM_BETAS, weight_decay=recipe.WEIGHT_DECAY, eps=1e-6 if amp else 1e-8)
        self.ema = recipe.PowerEMA(self.net)
        self.step = 0
        self._val_batches: list[dict[str, torch.Tensor]] | None = None

    # ---- batches -----------------------------------------------------------------------------

    def _batch(self, table: ClipTable, targets: torch.Tensor, gen: torch.Generator,
               dropout: bool, means: bool = False) -> dict[str, torch.Tensor]:
        """One batch of fresh mixtures; ``means`` adds the noise-free latents ``x1_mean`` and
        ``x_mix_mean`` (the normalised posterior means), for evaluation."""
        b = targets.shape[0]
        window = self.net.config.lengths.audio_samples
        interferers = draw_interferers(targets, table.classes, gen)
        starts = draw_window_starts(table.audio_len[interferers], window, gen)
        target, mixture = mix_at_snr(table.windows(targets, torch.zeros_like(targets), window),
                                     table.windows(interferers, starts, window), draw_snr(b, gen))
        mean, std = self.encoders.posterior(torch.cat([target, mixture]).to(self.device))
        eps = torch.randn(mean[:b].shape, generator=gen).to(self.device)
        latents = self.net.normalize(mean + std * torch.cat([eps, eps]))  # the same noise draw
        video_keep, text_keep = table.video_exist[targets], table.text_exist[targets]
        if dropout:
            p = recipe.NULL_CONDITION_PROBABILITY
            video_keep = video_keep & (torch.rand(b, generator=gen) >= p)
            text_keep = text_keep & (torch.rand(b, generator=gen) >= p)
        batch = {"x1": latents[:b], "x_mix": latents[b:], "t": recipe.sample_time(b, gen),
                 "x0": torch.randn(eps.shape, generator=gen), "video_keep": video_keep,
                 "text_keep": text_keep, "clip_f": table.clip_f[targets],
                 "sync_f": table.sync_f[targets], "text_f": table.text_f[targets]}
        if means:
            batch["x1_mean"], batch["x_mix_mean"] = self.net.normalize(mean).split(b)
        return {k: v.to(self.device) for k, v in batch.items()}

    def _loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        features = recipe.drop_queries(self.net, {k: batch[k] for k in ("clip_f", "sync_f",
                                                                        "text_f")},
                                       batch["video_keep"], batch["text_keep"])
        with torch.autocast(**self.autocast):
            return recipe.cfm_loss(model, batch["x1"], batch["x_mix"], features, batch["t"],
                                   batch["x0"])

    def train_batch(self, step: int) -> dict[str, torch.Tensor]:
        per_rank = self.options.batch_size // self.ranks.world
        gen = _generator(self.options.seed, self.ranks.rank, step)
        targets = torch.randint(len(self.train_table), (per_rank,), generator=gen)
        return self._batch(self.train_table, targets, gen, dropout=True)

    def val_batches(self) -> list[dict[str, torch.Tensor]]:
        if self._val_batches is None:
            gen = _generator(self.options.val_seed, -1, -1)
            order = torch.arange(len(self.val_table))
            size = self.options.batch_size
            self._val_batches = [self._batch(self.val_table, order[i:i + size], gen, dropout=False,
                                             means=True) for i in range(0, len(order), size)]
        return self._val_batches

    # ---- steps -------------------------------------------------------------------------------

    @torch.enable_grad()  # whatever the caller's grad mode (mmsep-export turns it off)
    def train_step(self) -> float:
        batch = self.train_batch(self.step)
        loss = self._loss(self.model, batch).mean()
        value = loss.detach().clone()
        if self.ranks.world > 1:
            dist.all_reduce(value)
            value /= self.ranks.world
        if not math.isfinite(float(value)):  # every rank sees the same mean: all stop here
            raise ValueError(f"step {self.step + 1}: the training loss is {float(value)} (the run "
                             "diverged); the last saved checkpoint is kept: lower --lr and "
                             "--resume, or check the data")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for group in self.optimizer.param_groups:  # a function of the step: resumes exactly
            group["lr"] = self.learning_rate()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), recipe.GRAD_CLIP)
        self.optimizer.step()
        self.ema.update(self.net)
        self.step += 1
        return float(value)

    def learning_rate(self, step: int | None = None) -> float:
        o = self.options
        return o.lr * recipe.lr_factor(self.step if step is None else step, o.warmup, o.steps)

    def ema_network(self):
        """A copy of the network holding the EMA weights, in eval mode."""
        return self.ema.copy_to(copy.deepcopy(self.net)).eval()

    @torch.no_grad()
    def validate(self, net=None) -> float:
        net = self.ema_network() if net is None else net
        losses = [self._loss(net, batch) for batch in self.val_batches()]
        return float(torch.cat(losses).mean())

    # ---- checkpoints -------------------------------------------------------------------------

    def save(self) -> None:
        """ft.pt, then checkpoint.pt, each written atomically (main process only): a run stopped
        between the two resumes from the older checkpoint.pt and writes ft.pt again."""
        if not self.ranks.main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_atomically(self.ema_network().state_dict(), self.run_dir / WEIGHTS)
        state = {"step": self.step, "options": asdict(self.options), "world": self.ranks.world,
                 "setup": self.setup, "net": self.net.state_dict(), "ema": self.ema.state_dict(),
                 "optimizer": self.optimizer.state_dict()}
        save_atomically(state, self.run_dir / CHECKPOINT)

    def resume(self, state: dict | None = None) -> None:
        """Continue from the run directory's checkpoint.pt (``state``: it, already read with
        ``read_checkpoint``): same options but ``steps``, same setup, same network."""
        path = self.run_dir / CHECKPOINT
        state = read_checkpoint(path, self.device) if state is None else state
        check_resumable(state, path, self.options, self.ranks.world, self.setup, self.net)
        self.load_state(state)

    def load_state(self, state: dict) -> None:
        """Take up a checkpoint that ``check_resumable`` accepted."""
        self.net.load_state_dict(state["net"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        if self.ranks.main:
            _truncate_metrics(self.run_dir / METRICS, self.step)

    # ---- the run -----------------------------------------------------------------------------

    def _record(self, row: dict) -> None:
        if self.ranks.main:
            with open(self.run_dir / METRICS, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")

    def _validate_and_record(self) -> float | None:
        value = self.validate() if self.ranks.main else None
        if value is not None:
            self._record({"step": self.step, "val_loss": value})
        if self.ranks.world > 1:
            dist.barrier()
        return value

    def fit(self) -> None:
        """Train until ``options.steps``, validating, logging and saving on the way."""
        o = self.options
        if self.ranks.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_partials(self.run_dir)  # those of a killed run (SIGKILL, power loss)
            if self.step == 0:  # a new run: rows left by one that saved no step go
                (self.run_dir / METRICS).unlink(missing_ok=True)
        if self.step == 0:
            val = self._validate_and_record()
            if val is not None:
                self.log(f"step 0/{o.steps}{_val_text(val)}")
        losses, training_seconds = [], 0.0  # rates count training steps, not validation or saves
        while self.step < o.steps:
            started = time.perf_counter()
            losses.append(self.train_step())
            training_seconds += time.perf_counter() - started
            val = None
            if self.step % o.val_every == 0 or self.step == o.steps:
                val = self._validate_and_record()
            logged = self.step % o.log_every == 0 or self.step == o.steps
            if val is not None and not logged:
                self.log(f"step {self.step}/{o.steps}{_val_text(val)}")
            if logged:
                row = {"step": self.step, "loss": sum(losses) / len(losses),
                       "lr": self.learning_rate(self.step - 1),
                       "steps_per_s": len(losses) / training_seconds,
                       "clips_per_s": len(losses) * o.batch_size / training_seconds}
                self._record(row)
                if self.ranks.main:
                    self.log(_progress(row, o.steps, val))
                losses, training_seconds = [], 0.0
            if self.step % o.save_every == 0 or self.step == o.steps:
                self.save()


def _progress(row: dict, steps: int, val: float | None) -> str:
    text = (f"step {row['step']}/{steps}  loss {row['loss']:.4f}  "
            f"{row['steps_per_s']:.2f} steps/s  {row['clips_per_s']:.1f} clips/s")
    return text + _val_text(val)


def _val_text(val: float | None) -> str:
    return f"  val_loss {val:.4f}" if val is not None else ""


def read_checkpoint(path: Path, device: str | torch.device = "cpu") -> dict:
    """A run's checkpoint.pt; ValueError naming ``path`` when it is not one."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # torch raises what its unpickler and zip reader meet
        raise ValueError(f"{path}: not a readable checkpoint ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:200]})") from None
    if not isinstance(state, dict) or not TRAINING_CHECKPOINT_KEYS <= state.keys():
        raise ValueError(f"{path}: not a mmsep-finetune checkpoint.pt (an ft.pt or another "
                         "file?); resume needs the checkpoint.pt a run wrote")
    return state


def check_resumable(state: dict, path: Path, options: TrainOptions, world: int, setup: dict,
                    net: torch.nn.Module) -> None:
    """ValueError unless ``state`` (read from ``path``) continues this run: the same options
    (``steps`` may grow), processes and setup, the same network, and steps left to train."""
    saved = {k: v for k, v in state["options"].items() if k != "steps"}
    given = {k: v for k, v in asdict(options).items() if k != "steps"}
    changed = [f"{k} {saved.get(k)!r} -> {given[k]!r}" for k in sorted(given)
               if saved.get(k) != given[k]]
    saved_setup = state.get("setup") or {}  # absent from checkpoints of earlier versions
    changed += [f"{k} {saved_setup[k]!r} -> {v!r}" for k, v in sorted(setup.items())
                if k in saved_setup and saved_setup[k] != v]
    if state["world"] != world:
        changed.append(f"processes {state['world']} -> {world}")
    if changed:
        raise ValueError(f"{path}: cannot resume with other settings ({', '.join(changed)})")
    ours = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    if {k: tuple(v.shape) for k, v in state["net"].items()} != ours:
        raise ValueError(f"{path}: holds another network than --init builds (another preset or "
                         "mode?)")
    if int(state["step"]) >= options.steps:
        raise ValueError(f"{path}: the run is already at step {int(state['step'])}; give "
                         "--steps above that to train on")
    _metrics_kept(path.parent / METRICS, int(state["step"]))  # what load_state will keep


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after the checkpoint a run resumes from, and a last line cut
    short by an interruption."""
    if not path.exists():
        return
    rows = _metrics_kept(path, step)
    with atomic_output(path) as tmp:
        tmp.write_text("".join(r + "\n" for r in rows), encoding="utf-8")


def _metrics_kept(path: Path, step: int) -> list[str]:
    """The lines of metrics file ``path`` (if any) up to ``step``, a torn last line left out;
    ValueError naming any other line that is not a metrics row (checked before a resume does
    any work)."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    kept = []
    for number, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            row = None
        if not isinstance(row, dict) or type(row.get("step")) is not int:
            raise ValueError(f"{path}:{number}: not a metrics row; repair or remove the file to "
                             "resume")
        if row["step"] <= step:
            kept.append(line)
    return kept
