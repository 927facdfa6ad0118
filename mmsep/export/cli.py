"""mmsep-export: a fine-tuned MMAudioSep checkpoint (or the tiny preset) -> a model directory."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from ..console import SEED, FiniteRange, echo_result, quiet_option
from ..exit_codes import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_USAGE, full_disk_errno
from ..models.io import CheckpointError
from ..models.presets import RELEASED_VARIANTS
from ..progress import track
from ..stages import MIXTURE_LATENTS, POSTERIOR_SAMPLE
from .errors import ExportError, UsageError
from .parity import PARITY_DEVICES, resolve_parity_device

PROG = "mmsep-export"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path),
              help="Fine-tuned MMAudioSep (or MMAudio generation) flow checkpoint, e.g. ft.pt. "
                   "Its variant is detected from the tensors.")
@click.option("--preset", default=None,
              help="Export a preset with random weights instead of a checkpoint "
                   "(default when no --checkpoint: tiny, the embedded demo model).")
@click.option("--weights-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Directory laid out like the MMAudioSep release (weights/mmaudiosep_<variant>"
                   ".pth, ext_weights/v1-16.pth, v1-44.pth, best_netG.pt, "
                   "synchformer_state_dict.pth, ...), for the companion networks.")
@click.option("--variant", default=None,
              help=f"Released variant to export from --weights-dir "
                   f"({', '.join(RELEASED_VARIANTS)}): weights/mmaudiosep_<variant>.pth, else "
                   "MMAudio's weights/mmaudio_<variant>.pth.")
@click.option("--vae", type=click.Path(path_type=Path),
              help="VAE checkpoint (overrides --weights-dir).")
@click.option("--vocoder", type=click.Path(path_type=Path),
              help="BigVGAN v2 directory with config.json + bigvgan_generator.pt (44.1 kHz), or "
                   "MMAudio's BigVGAN v1 file best_netG.pt (16 kHz).")
@click.option("--clip", "clip_path", type=click.Path(path_type=Path),
              help="open_clip DFN5B ViT-H-14-384 weights file (or its directory).")
@click.option("--synchformer", type=click.Path(path_type=Path), help="Synchformer state dict.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Model directory to write (default: models/<variant or preset>); never the "
                   "checkpoint's or weights' own paths, nor a directory holding them or inside "
                   "them.")
@click.option("--duration", type=FiniteRange(2.0, 60.0), default=8.0, show_default=True,
              help="Window length in seconds; fixes the per-window sequence lengths.")
@click.option("--max-batch", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Largest batch (windows x requests) of the graphs' optimisation profiles.")
@click.option("--seed", type=SEED, default=0, show_default=True,
              help="Seed for --preset weights.")
@click.option("--mixture-latent", type=click.Choice(MIXTURE_LATENTS), default=POSTERIOR_SAMPLE,
              show_default=True,
              help="How the mixture becomes the network's mixture latent: the VAE posterior "
                   "sample mean + std * noise, not normalised (the authors' evaluation), or the "
                   "normalised posterior mean. Recorded in the manifest.")
@click.option("--precision", type=click.Choice(["fp16", "bf16", "fp32"]), default="fp16",
              show_default=True,
              help="Reduced precision. fp16: mixed-precision copies of the graphs (fp32 inputs and "
                   "outputs) are written and checked, ONNX Runtime CUDA runs them, and fp16 "
                   "TensorRT engines are built from them; bf16: bf16 engines, no ONNX copies; "
                   "fp32: no copies, fp32 engines.")
@click.option("--parity-device", type=click.Choice(PARITY_DEVICES), default="auto",
              show_default=True,
              help="Where every graph is checked against its PyTorch fp32 module: cuda runs both "
                   "PyTorch and ONNX Runtime on the GPU (needs onnxruntime-gpu; the fp16 copies "
                   "are then checked with the GPU's own fp16 kernels), cpu on the CPU; auto "
                   "takes cuda where both see a GPU.")
@click.option("--jobs", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Stages whose graphs are written side by side, each in a process of its own "
                   "(tracing and the fp16 conversion use about one core each; every process "
                   "holds one stage's trace in memory, up to 10 GB for large_44k_v2's "
                   "denoiser); the checks run in this process meanwhile.")
@click.option("--engines/--no-engines", default=True, show_default=True,
              help="Build TensorRT engines when TensorRT and a CUDA GPU are present.")
@click.option("--timing-cache", type=click.Path(dir_okay=False, path_type=Path),
              help="TensorRT timing cache file (default: one per TensorRT version and GPU under "
                   "~/.cache/mmsep).")
@click.option("--engines-only", "engines_only", type=click.Path(file_okay=False, path_type=Path),
              help="Build the engines of an existing model directory (on the target GPU machine); "
                   "each engine is checked against the directory's fp32 ONNX graph.")
@click.option("--force", is_flag=True,
              help="Replace an existing --out that is not an mmsep model directory, or one that "
                   "(like an --engines-only directory) holds files the export did not write "
                   "(they are deleted).")
@quiet_option("No progress output.")
@click.option("--json", "as_json", is_flag=True, help="Print the export summary as JSON.")
def main(checkpoint, preset, weights_dir, variant, vae, vocoder, clip_path, synchformer, out,
         duration, max_batch, seed, mixture_latent, precision, parity_device, jobs, engines,
         timing_cache, engines_only, force, quiet, as_json):
    """Export every MMAudioSep stage to ONNX, check it, and write a self-contained model
    directory."""
    quiet = quiet or as_json
    engine_options = dict(precision=precision, timing_cache=timing_cache, quiet=quiet)
    try:
        if engines_only is not None:
            from .engines_only import build_engines_only

            result = build_engines_only(engines_only, precision=precision,
                                        timing_cache=timing_cache, force=force, log=_log(quiet))
        else:
            if variant is not None:
                checkpoint = _variant_checkpoint(checkpoint, preset, weights_dir, variant)
            result = _run(checkpoint, preset, weights_dir, vae, vocoder, clip_path, synchformer,
                          out, duration, max_batch, seed, force, quiet,
                          engine_options if engines else None, mixture_latent,
                          ("fp16",) if precision == "fp16" else (),
                          parity_device=resolve_parity_device(parity_device), jobs=jobs)
    except (UsageError, CheckpointError) as exc:
        click.echo(f"{PROG}: error: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        click.echo(f"{PROG}: interrupted; nothing was written", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:  # noqa: BLE001 - a bug or an environment failure: one line, exit 1
        full = full_disk_errno(exc)
        if full is not None:
            click.echo(f"{PROG}: error: cannot write the model directory "
                       f"({os.strerror(full)}); nothing was written", err=True)
            sys.exit(EXIT_USAGE)
        if isinstance(exc, ExportError):
            click.echo(f"{PROG}: export failed: {exc}", err=True)
            sys.exit(EXIT_INTERNAL)
        if os.environ.get("MMSEP_TRACEBACK"):
            raise
        click.echo(f"{PROG}: internal error: {type(exc).__name__}: "
                   f"{' '.join(str(exc).split())[:400]} (nothing was written; set "
                   "MMSEP_TRACEBACK=1 to see where)", err=True)
        sys.exit(EXIT_INTERNAL)
    if as_json:
        echo_result(json.dumps(_summary(result), indent=2))
    elif not quiet:
        _print_summary(result)


def console(argv=None) -> None:
    """The console program: also one line for bad usage (click's own errors), and SIGTERM or
    SIGHUP as Ctrl-C (mmsep.console)."""
    from ..console import console_main

    console_main(main, PROG, sys.argv[1:] if argv is None else list(argv),
                 interrupted="interrupted; nothing was written")


def _run(checkpoint, preset, weights_dir, vae, vocoder, clip_path, synchformer, out, duration,
         max_batch, seed, force, quiet, engine_options, mixture_latent=POSTERIOR_SAMPLE,
         onnx_precisions=(), parity_device="cpu", jobs=1):
    import torch

    from ..models.components import build_components, load_components
    from .exporter import existing_model, export_model
    from ..model_files import sha256_file

    if checkpoint is not None and preset is not None:
        raise UsageError("give either --checkpoint or --preset, not both")
    given = {label: path for label, path in (
        ("--checkpoint", checkpoint), ("--weights-dir", weights_dir), ("--vae", vae),
        ("--vocoder", vocoder), ("--clip", clip_path), ("--synchformer", synchformer)) if path}
    if checkpoint is None and given:
        raise UsageError(f"{', '.join(given)} name weights to export: give --checkpoint or "
                         "--variant with them (without, a --preset of random weights is "
                         "exported)")
    if out is not None:  # before anything is loaded
        _check_out(out, given)
        existing_model(out, force)
    if checkpoint is not None and not checkpoint.exists():
        raise UsageError(f"{checkpoint}: checkpoint not found")
    log = _log(quiet)
    log(f"parity checks on {parity_device}")
    torch.set_grad_enabled(False)
    if checkpoint is None:
        preset = preset or "tiny"
        log(f"building preset {preset!r} with random weights (seed {seed})")
        try:
            components = build_components(preset, duration=duration, seed=seed)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
        sources = {"preset": preset, "seed": seed}
    else:
        log(f"loading {checkpoint}")
        components = load_components(weights_dir, flow=checkpoint, vae=vae, vocoder=vocoder,
                                     clip=clip_path, synchformer=synchformer, duration=duration)
        c = components.flow.config
        log(f"a {c.name} {'separation' if c.separation else 'generation'} network "
            f"({c.duration:g} s windows)")
        # absolute: benchmarks/rtf.py reloads them from wherever it runs
        sources = {name: {"path": os.path.abspath(path),
                          "sha256": sha256_file(_weights_file(Path(path)))}
                   for name, path in components.sources.items()}
    out = out or Path("models") / components.config.name
    _check_out(out, {**given, **{f"the {name} weights": path for name, path in
                                 components.sources.items() if not path.startswith("random:")}})

    def stage_progress(names):
        return track(names, len(names), "export", "stage", enabled=not quiet)

    builder, skipped = _engine_builder(engine_options, log)
    return export_model(components, out, max_batch=max_batch, sources=sources, force=force,
                        stage_progress=stage_progress, log=log, engine_builder=builder,
                        engines_skipped=skipped, mixture_latent=mixture_latent,
                        onnx_precisions=onnx_precisions, parity_device=parity_device,
                        jobs=jobs)


def _check_out(out: Path, inputs: dict) -> None:
    """--out is never an input, never holds one and never lies inside an input directory: the
    exporter replaces the whole directory."""
    from ..runtime.errors import InputError
    from ..runtime.paths import check_directory_writable, check_output_dir

    try:
        check_directory_writable(out, "--out")
        # the new directory is assembled beside --out, then renamed into place
        check_directory_writable(out.absolute().parent, "the folder of --out")
        check_output_dir(out, inputs)
    except InputError as exc:
        raise UsageError(str(exc)) from None
    here, target = Path.cwd().resolve(), out.resolve()
    if target == here or target in here.parents:
        raise UsageError(f"--out {out} is the current directory or one above it, which the "
                         "export would replace; give a new or model directory")


def _variant_checkpoint(checkpoint, preset, weights_dir, variant) -> Path:
    from ..models.components import flow_file

    if checkpoint is not None or preset is not None:
        raise UsageError("give --variant (with --weights-dir), --checkpoint or --preset, "
                         "only one of them")
    if weights_dir is None:
        raise UsageError("--variant needs --weights-dir, the release directory to look in")
    return flow_file(weights_dir, variant)


def _log(quiet: bool):
    from tqdm import tqdm

    return (lambda msg: None) if quiet else (lambda msg: tqdm.write(msg, file=sys.stderr))


def _engine_builder(options: dict | None, log):
    """(builder, reason skipped): engines are built only where TensorRT and a GPU are usable."""
    if options is None:
        return None, "--no-engines"
    from .tensorrt_build import build_engines, unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        return None, reason

    def build(directory, manifest, modules, previous):
        return build_engines(directory, manifest, modules, precision=options["precision"],
                             timing_cache=options["timing_cache"], progress=log,
                             previous=previous)

    return build, None


def _weights_file(path: Path) -> Path:
    """The file whose hash identifies a component: a vocoder given as a directory (BigVGAN v2's
    download, which also holds its discriminator and optimiser) by its generator's weights."""
    from ..models.bigvgan import GENERATOR_FILE

    return path / GENERATOR_FILE if path.is_dir() else path


def _summary(result) -> dict:
    m = result.manifest
    return {"directory": str(result.directory),
            "model": {k: m["model"][k] for k in ("preset", "separation", "window_seconds")},
            "unchanged": result.unchanged, "rebuilt": result.rebuilt, "reused": result.reused,
            "stages": {name: {"rel_l2": s["parity"]["onnxruntime"]["rel_l2"],
                              "checked_with": s["parity"]["onnxruntime"]["backend"],
                              "bytes": sum(f["bytes"] for f in s["files"].values()),
                              **{f"{p}_rel_l2": r["parity"]["onnxruntime"]["rel_l2"]
                                 for p, r in s.get("reduced", {}).items()},
                              **{f"{p}_checked_with": r["parity"]["onnxruntime"]["backend"]
                                 for p, r in s.get("reduced", {}).items()}}
                       for name, s in m["stages"].items()},
            "tensorrt": m.get("tensorrt")}


def _print_summary(result) -> None:
    m = result.manifest
    status = "unchanged (nothing to do)" if result.unchanged else \
        f"{len(result.rebuilt)} stage(s) exported, {len(result.reused)} reused"
    model = m["model"]
    kind = "separation" if model["separation"] else "generation"
    click.echo(f"\n{result.directory} ({model['preset']} {kind}): {status}")
    click.echo(f"{'stage':<13}{'size':>10}  {'ORT vs PyTorch (rel L2)':>24}  {'bound':>7}"
               f"  {'fp16 copy':>10}  {'bound':>7}  checked with")
    for name, s in m["stages"].items():
        size = sum(f["bytes"] for f in s["files"].values())
        parity = s["parity"]["onnxruntime"]
        fp16 = s.get("reduced", {}).get("fp16", {}).get("parity", {}).get("onnxruntime")
        copy = f"  {max(fp16['rel_l2'].values()):>10.2e}  {fp16['tolerance']:>7.0e}" if fp16 \
            else f"  {'-':>10}  {'-':>7}"
        click.echo(f"{name:<13}{_size(size):>10}  {max(parity['rel_l2'].values()):>24.2e}  "
                   f"{parity['tolerance']:>7.0e}{copy}  {parity['backend']}"
                   f"{', ' + fp16['backend'] if fp16 else ''}")
    trt = m.get("tensorrt") or {}
    if trt.get("status") == "skipped":
        click.echo(f"TensorRT engines skipped: {trt.get('reason')}")
    elif trt.get("status") == "built":
        kept = ", kept from the previous export" if trt.get("kept") else ""
        click.echo(f"TensorRT {trt['version']} {trt['precision']} engines for {trt['gpu']} "
                   f"(sm{trt['compute_capability']}{kept}):")
        for name, engine in trt["engines"].items():
            parity = engine["parity"]
            click.echo(f"  {name:<13}{_size(engine['bytes']):>10}  "
                       f"{max(parity['rel_l2'].values()):>24.2e}  {parity['tolerance']:>7.0e}")
        from ..runtime.resize_engine import ENGINE_NAMES

        for name in ENGINE_NAMES.values():
            if trt.get(name):
                click.echo(f"  {name:<17}{_size(trt[name]['bytes']):>10}  "
                           f"{trt[name]['parity']['max_grey_levels']:>7.2g} grey levels from PIL")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


if __name__ == "__main__":
    console()
