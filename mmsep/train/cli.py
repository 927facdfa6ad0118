"""``mmsep-finetune``: fine-tune a MMAudio checkpoint into a MMAudioSep ft.pt.

    mmsep-finetune --init weights/mmaudio_small_44k.pth --weights-dir . \\
        --data train.jsonl --val val.jsonl --out runs/mine --steps 20000 --batch-size 32
    torchrun --nproc-per-node 8 -m mmsep.train.cli ...   # the same, data-parallel

Exit codes: 0 done, 2 bad usage or input (missing or malformed files, a run directory that
already holds a checkpoint without --resume), 1 internal failure, 130 interrupted.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
import time
from pathlib import Path

import click

from ..console import SEED, FiniteRange, quiet_option
from ..exit_codes import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_USAGE, full_disk_errno
from . import recipe
from .loop import CHECKPOINT, METRICS, WEIGHTS, Ranks, TrainOptions, Trainer, \
    check_batch_split, check_resumable, read_checkpoint

PROG = "mmsep-finetune"
RUN_LOCK = ".mmsep-finetune.lock"  # in --out, held by the run training there

_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--init", "init", type=_FILE, required=True,
              help="MMAudio generation checkpoint (or a separation one to continue from).")
@click.option("--weights-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              required=True, help="Release layout holding ext_weights/ (VAE, CLIP, Synchformer).")
@click.option("--data", type=_FILE, required=True, help="Training clips (JSONL).")
@click.option("--val", type=_FILE, required=True, help="Validation clips (JSONL).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Run directory: checkpoint.pt, ft.pt, metrics.jsonl.")
@click.option("--cache", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Feature cache directory, shareable between runs.  [default: OUT/cache]")
@click.option("--steps", type=click.IntRange(1), default=TrainOptions.steps, show_default=True,
              help="Optimiser steps in all (a resumed run continues up to this).")
@click.option("--batch-size", type=click.IntRange(1), default=TrainOptions.batch_size,
              show_default=True, help="Clips per step over all processes.")
@click.option("--lr", type=FiniteRange(0, min_open=True), default=recipe.LEARNING_RATE,
              show_default=True, help="Peak learning rate (AdamW).")
@click.option("--warmup", type=click.IntRange(0), default=TrainOptions.warmup,
              show_default=True, help="Linear learning-rate warm-up steps.")
@click.option("--val-every", type=click.IntRange(1), default=TrainOptions.val_every,
              show_default=True, help="Validation loss every N steps.")
@click.option("--save-every", type=click.IntRange(1), default=TrainOptions.save_every,
              show_default=True, help="Write checkpoint.pt and ft.pt every N steps.")
@click.option("--log-every", type=click.IntRange(1), default=TrainOptions.log_every,
              show_default=True, help="Progress line and metrics row every N steps.")
@click.option("--init-input-proj", type=click.Choice(recipe.INIT_INPUT_PROJ), default=None,
              help="For a generation --init: reinit: fresh audio input projection (the "
              "authors); zero-mix: pretrained weights, zeros for the mixture channels "
              f"(default: {recipe.INIT_INPUT_PROJ[0]}).")
@click.option("--train-fused", is_flag=True,
              help="Also train the fused blocks and the final layer (the authors freeze them).")
@click.option("--duration", type=FiniteRange(2.0, 60.0), default=8.0, show_default=True,
              help="Training window in seconds.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Training seed.")
@click.option("--val-seed", type=SEED, default=0, show_default=True,
              help="Seed of the fixed validation mixtures (keep it and --batch-size to compare "
                   "runs).")
@click.option("--device", default="auto", show_default=True,
              help="auto (the process's GPU under torchrun, else cuda, else cpu), cpu, cuda:N.")
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoint.pt.")
@quiet_option("No progress output.")
def main(**kw) -> None:
    """Fine-tune a MMAudio flow network for query-based separation (writes OUT/ft.pt)."""
    from mmsep.models.io import CheckpointError
    from mmsep.runtime.errors import InputError

    from .data import DataError

    out: Path = kw["out"]
    if kw["resume"] and not (out / CHECKPOINT).is_file():
        _fail(EXIT_USAGE, f"{out / CHECKPOINT}: no checkpoint to resume from")
    if not kw["resume"] and (out / CHECKPOINT).exists():
        _fail(EXIT_USAGE,
              f"{out}: already holds a run ({CHECKPOINT}); pass --resume or another --out")
    try:
        _check_paths(kw)
        device = _device(kw["device"])
        state = read_checkpoint(out / CHECKPOINT) if kw["resume"] else None
        ranks = _init_distributed(device)
        with _one_run_at_a_time(out, ranks.main):  # before anything in OUT is touched
            build_trainer(kw, ranks, device, state).fit()
    except (DataError, CheckpointError, ValueError, InputError) as exc:
        _fail(EXIT_USAGE, str(exc))
    except KeyboardInterrupt:
        saved = (out / CHECKPOINT).is_file()
        _fail(EXIT_INTERRUPTED, "interrupted; " + ("--resume continues from the last saved step"
                                                   if saved else "no step was saved"))
    except PermissionError as exc:  # an input or output the user may not read or write
        _fail(EXIT_USAGE, f"{exc.filename or out}: permission denied")
    except Exception as exc:  # a one-line report instead of a traceback
        full = full_disk_errno(exc)
        if full is not None:
            _fail(EXIT_USAGE, f"{getattr(exc, 'filename', None) or out}: cannot write "
                              f"({os.strerror(full)})")
        _fail(EXIT_INTERNAL, f"{type(exc).__name__}: {exc}")
    if ranks.main and not kw["quiet"]:
        click.echo(f"wrote {out / WEIGHTS}")
    _finish_distributed(ranks)


@contextlib.contextmanager
def _one_run_at_a_time(out: Path, main: bool):
    """Hold OUT's lock file while training (main process): a second run started on the same
    --out before the first saved a checkpoint would interleave their files."""
    if not main:
        yield
        return
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    with open(out / RUN_LOCK, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"{out}: another mmsep-finetune is training in this directory; "
                             "wait for it or give another --out") from None
        yield


def console(argv=None) -> None:
    """The console program: also one line for bad usage, and SIGTERM or SIGHUP as Ctrl-C
    (mmsep.console)."""
    from ..console import console_main

    console_main(main, PROG, sys.argv[1:] if argv is None else list(argv),
                 interrupted="interrupted")


def _check_paths(kw: dict) -> None:
    """Before any work: no file the run writes is one of its inputs, and --out and --cache can
    be directories that take new files (InputError otherwise)."""
    from mmsep.runtime.paths import check_directory_writable, check_outputs

    out = kw["out"]
    check_outputs({f"--out's {name}": out / name for name in (CHECKPOINT, WEIGHTS, METRICS)},
                  {"--init": kw["init"], "--data": kw["data"], "--val": kw["val"]})
    check_directory_writable(out, "--out")
    if kw["cache"] is not None:
        check_directory_writable(kw["cache"], "--cache")


def _fail(code: int, message: str) -> None:
    """One line on stderr, prefixed as the other mmsep commands do, then exit ``code``."""
    kind = {EXIT_USAGE: "error: ", EXIT_INTERNAL: "internal error: "}.get(code, "")
    line = message.splitlines()[0] if message else "failed"
    click.echo(f"{PROG}: {kind}{line}", err=True)
    sys.exit(code)


def _init_distributed(device) -> Ranks:
    """Ranks under torchrun: NCCL for processes on GPUs (each bound to its own), else gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks()
    import torch
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Ranks(dist.get_rank(), world)


def _finish_distributed(ranks: Ranks) -> None:
    if ranks.world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()


def _device(name: str):
    """The torch device of --device, proven usable by a first allocation (ValueError if not)."""
    import torch

    if name == "auto":
        return (torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                if torch.cuda.is_available() else torch.device("cpu"))
    try:
        device = torch.device(name)
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as exc:  # unknown type; no such device; no driver
        raise ValueError(f"--device {name}: not usable here "
                         f"({' '.join(str(exc).split())[:200]})") from None
    return device


def build_trainer(kw: dict, ranks: Ranks, device, state: dict | None = None) -> Trainer:
    """The Trainer for the command line's settings ``kw``, resumed from ``state`` (the run's
    checkpoint.pt) when given; whether it can resume is checked before the feature cache is
    built."""
    import mmsep.models as mm

    from .data import read_clips
    from .features import encoder_fingerprint, load_encoders

    log = (lambda msg: None) if kw["quiet"] or not ranks.main else click.echo
    clips = {split: read_clips(kw[split]) for split in ("data", "val")}
    net = mm.load_flow(kw["init"], duration=kw["duration"])
    if net.config.separation and kw["init_input_proj"] is not None:
        raise ValueError(f"--init-input-proj: {kw['init']} is already a separation network, "
                         "whose input projection fine-tuning continues from; leave the option "
                         "out")
    net = recipe.separation_start(net, kw["init_input_proj"] or recipe.INIT_INPUT_PROJ[0],
                                  kw["seed"])
    options = TrainOptions(**{k: kw[k] for k in ("steps", "batch_size", "lr", "warmup",
                                                  "val_every", "save_every", "log_every",
                                                  "seed", "val_seed", "train_fused")})
    check_batch_split(options, ranks.world)
    fingerprint = encoder_fingerprint(kw["weights_dir"], net.config.mode)
    setup = run_setup(kw, fingerprint)
    if state is not None:
        check_resumable(state, kw["out"] / CHECKPOINT, options, ranks.world, setup, net)
    encoders = load_encoders(kw["weights_dir"], net.config.mode, fingerprint)
    tables = _feature_tables(kw, clips, encoders, net, ranks, device, log)
    trainer = Trainer(net, encoders, tables["data"], tables["val"], options, kw["out"],
                      ranks=ranks, device=device, log=log, setup=setup)
    if state is not None:
        trainer.load_state(state)  # checked above, before the features
    return trainer


def _feature_tables(kw: dict, clips: dict, encoders, net, ranks: Ranks, device, log) -> dict:
    """{"data": ClipTable, "val": ClipTable}. Each process computes its share of the missing
    cache entries with the query encoders on its device and waits for the others' (however long
    that takes: the default group's collectives would time out), then stacks the whole cache."""
    from mmsep.runtime.atomic import remove_stale_partials

    from .data import SOURCE_PEAK, class_ids
    from .features import build_cache, load_table

    cache = kw["cache"] or kw["out"] / "cache"
    lengths = net.config.lengths
    peaks = {"data": SOURCE_PEAK, "val": None}  # validation clips keep their level
    if ranks.main and Path(cache).is_dir():
        remove_stale_partials(cache)  # those of a killed extraction on this machine
    encoders.place_query_encoders(device)
    for split, items in clips.items():
        build_cache(items[ranks.rank::ranks.world], encoders, lengths, cache,
                    source_peak=peaks[split], progress=_cache_progress(log, split, ranks.world))
    encoders.place_query_encoders("cpu")  # training needs only the VAE: free the device
    if ranks.world > 1:
        import torch.distributed as dist

        dist.barrier(group=dist.new_group(backend="gloo", timeout=FEATURE_WAIT))
    empty = tuple(e[0] for e in net.empty_conditions(1))
    return {split: load_table(build_cache(items, encoders, lengths, cache,
                                          source_peak=peaks[split]), class_ids(items), empty)
            for split, items in clips.items()}


def run_setup(kw: dict, encoder_fingerprint: str) -> dict:
    """What a resumed run must share with the saved one beyond TrainOptions: the window length,
    the clip lists' contents and the encoders' weights (which made its features)."""
    from mmsep.model_files import sha256_file

    return {"duration": kw["duration"], "data_sha256": sha256_file(kw["data"])[:16],
            "val_sha256": sha256_file(kw["val"])[:16],
            "weights_sha256": encoder_fingerprint[:16]}


PROGRESS_SECONDS = 10.0  # the longest silence while features are computed
FEATURE_WAIT = datetime.timedelta(days=3)  # how long a process waits for the others' features


def _cache_progress(log, split: str, processes: int = 1, clock=time.monotonic):
    """A progress line for the first clip, then at least every PROGRESS_SECONDS, and at the
    end (real clips take seconds each: a fixed count of clips could mean minutes of silence)."""
    last = [None]
    name = "train" if split == "data" else "val"
    share = f", this process's share of {processes}" if processes > 1 else ""

    def report(done: int, total: int) -> None:
        now = clock()
        if done == total or last[0] is None or now - last[0] >= PROGRESS_SECONDS:
            last[0] = now
            log(f"features ({name}{share}): {done}/{total} clips")
    return report


if __name__ == "__main__":
    console()
