"""mmsep-run: separate (or generate) the audio of a video / text query with a model directory.

Exit codes: 0 success, 2 bad input or usage (the message names the file or option) or an
output that cannot be written (disk full, size limit), 1 internal failure, 130 interrupted
(Ctrl-C or SIGTERM). Before any work, every output is checked against every input (--mix,
--video, the model's files) by identity, links included (``paths.check_outputs``). Outputs are
written to a temporary file beside the target as the windows are joined (a long output is never
held whole) and renamed into place only when complete, so a failed or interrupted run leaves no
output behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from pathlib import Path

import click

from ..console import FiniteRange, console_main, echo_result, interrupts_held, quiet_option
from .audio import MAX_GENERATED_SECONDS, MIN_SECONDS
from .audio_writer import FORMATS, SUBTYPES, open_audio_outputs, output_format
from .backend_options import backend_options
from .mux import MUX_FORMATS, check_muxable

PROG = "mmsep-run"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "model_dir", type=click.Path(path_type=Path),
              default=Path("models/tiny"), show_default=True,
              help="Model directory written by mmsep-export.")
@click.option("--video", type=click.Path(path_type=Path),
              help="Video of the target source (any container/codec FFmpeg decodes). Without "
                   "--mix its audio track is the mixture.")
@click.option("--mix", type=click.Path(path_type=Path),
              help="Mixture to separate: wav/flac/ogg, or any media file with an audio track.")
@click.option("--text", "texts", multiple=True,
              help="Text description of the target source. Repeat for several targets: one "
                   "output per text, all computed in one batch.")
@click.option("--negative-text", help="Text for the unconditional guidance branch "
                                      "(what the output should not sound like).")
@click.option("--generate", is_flag=True,
              help="Ignore any audio track and generate audio for the query from a noise "
                   "mixture (also the mode when there is no mixture and no video).")
@click.option("--duration", type=FiniteRange(MIN_SECONDS, MAX_GENERATED_SECONDS),
              help="Length in seconds of generated audio (default: the video's length, else "
                   "one window); not with a mixture.")
@click.option("--output", "-o", type=click.Path(),
              help="Output audio file; its extension picks the format ("
                   f"{', '.join('.' + f for f in FORMATS)}; ogg is Vorbis); no extension: "
                   "--format's. An existing directory means the default "
                   "name inside it. Default: <mix or video name>_separated.<format>, or "
                   "generated.<format>, in the current directory. With several --text: "
                   "<stem>_<k><suffix>, k = 0, 1, ... in --text order. Never an input's path.")
@click.option("--format", "fmt", type=click.Choice(list(FORMATS)),
              help="Format of an output name without an extension, the default names "
                   "included (default: wav); must match the extension otherwise.")
@click.option("--subtype", type=click.Choice(list(SUBTYPES)),
              help=f"Sample format of wav/flac output (default: {SUBTYPES[0]}; FLOAT needs "
                   "wav; ogg is always Vorbis).")
@click.option("--steps", type=click.IntRange(1, 1000),
              help="Euler steps (default: the model's, 25).")
@click.option("--cfg", type=FiniteRange(0.0, 100.0),
              help="Classifier-free guidance strength (default: the model's, 4.5); below 1 the "
                   "conditional branch alone, as at 1.")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True,
              help="Noise seed: x0 = numpy.random.default_rng(seed).standard_normal(...).")
@click.option("--overlap", type=float,
              help="Overlap of consecutive windows in seconds, 0 to half a window "
                   "(default: the model's, 1 s).")
@click.option("--max-batch", type=click.IntRange(1, 1024),
              help="Most (window, text) items per batch (default: the model's max batch).")
@backend_options()
@click.option("--mux", type=click.Path(path_type=Path),
              help=f"Also write this video file ({', '.join(MUX_FORMATS)}): the input video "
                   "stream copied without re-encoding plus the separated audio as AAC (one "
                   "track per text). Never an input's path.")
@click.option("--json", "as_json", is_flag=True,
              help="Print a JSON summary on stdout instead of the closing line: outputs, "
                   "backend, mode, windows, items ((window, text) pairs), batches, per-stage "
                   "seconds (timings_s) and real_time_factor (processing seconds per second of "
                   "audio; below 1 is faster than real time). README's 'mmsep-run --json' "
                   "lists every field.")
@quiet_option("No progress or summary output.")
def cli(model_dir, video, mix, texts, negative_text, generate, duration, output, fmt, subtype,
        steps, cfg, seed, overlap, max_batch, backend_options, mux, as_json, quiet):
    """Separate the sound of a video / text query from a mixture (or generate it) with an
    exported MMAudioSep model, without PyTorch."""
    _check_flag_combinations(video, mix, texts, negative_text, generate, duration)
    output = _output_option(output)
    _check_default_model(model_dir)
    summary = run(model_dir=model_dir, video=video, mix=mix, texts=list(texts),
                  negative_text=negative_text, generate=generate, duration=duration,
                  output=output, fmt=fmt, subtype=subtype, steps=steps, cfg=cfg, seed=seed,
                  overlap=overlap, max_batch=max_batch, **backend_options.separator_kwargs(),
                  mux_path=mux, show_progress=not (quiet or as_json))
    if as_json:
        echo_result(json.dumps(summary, indent=2))
    elif not quiet:
        outs = ", ".join(summary["outputs"] + ([summary["mux"]] if summary.get("mux") else []))
        click.echo(f"wrote {outs} ({summary['audio_seconds']:.2f} s of audio, "
                   f"{summary['mode']}, {summary['backend']}; real-time factor "
                   f"{summary['real_time_factor']:.3f}: processing seconds per second of audio, "
                   "below 1 is faster than real time)", err=True)


def _check_flag_combinations(video, mix, texts, negative_text, generate, duration
                             ) -> None:
    """Refusals in the words of the command line (the Python API names its arguments)."""
    from .errors import InputError

    if mix is not None and generate:
        raise InputError("--mix and --generate: --generate makes audio from a noise mixture and "
                         "would ignore --mix; drop one of them")
    if mix is not None and duration is not None:
        raise InputError("--duration sets the length of generated audio; with --mix the output "
                         "has the mixture's length")
    for flag, text in [*(("--text", t) for t in texts), ("--negative-text", negative_text)]:
        if text is not None and not text.strip():
            raise InputError(f"{flag} is empty")


def _check_duration_for(info, video, generate: bool, duration) -> None:
    """--video with --duration: the video's audio track is the mixture of a separation model
    (and sets the output's length); a generation-only model generates ``duration`` seconds."""
    from .errors import InputError

    if video is not None and duration is not None and not generate and info.separation:
        raise InputError("--duration sets the length of generated audio; with --video alone the "
                         "video's audio track is the mixture and sets the output's length "
                         "(--generate makes new audio for the video)")


def _output_option(output: str | None) -> Path | None:
    """--output as a path; a name ending in a separator must be an existing directory (a Path
    would drop the separator and write ``<name>.wav`` beside it)."""
    from .errors import InputError

    if output is not None and output.endswith(("/", os.sep)) and not Path(output).is_dir():
        raise InputError(f"--output {output}: directory does not exist (make it first, or give "
                         "a file name)")
    return None if output is None else Path(output)


def _check_default_model(model_dir: Path) -> None:
    """The default --model is named in the refusal: a user who forgot the option should not
    be sent to create that directory."""
    from .errors import InputError

    source = click.get_current_context().get_parameter_source("model_dir")
    if source is click.core.ParameterSource.DEFAULT and not model_dir.exists():
        raise InputError(f"no --model given, and the default model directory {model_dir} does "
                         "not exist; pass --model with a directory mmsep-export wrote")


def run(*, model_dir, video, mix, texts, negative_text, generate, duration, output, fmt, subtype,
        steps, cfg, seed, overlap, max_batch, backend, threads, precision="auto", verify=True,
        mux_path=None, show_progress=True) -> dict:
    from .atomic import atomic_output, remove_stale_partials_of
    from .requests import Timings
    from .separator import Separator

    total_started = time.perf_counter()
    paths, fmt = _plan_outputs(output, fmt, subtype, len(texts), mix, video, model_dir,
                               mux_path)
    remove_stale_partials_of([*paths, *([mux_path] if mux_path else [])])  # a killed run left
    clock = Timings(("load", "write", "mux"))
    with clock.measure("load"):
        sep = Separator(model_dir, backend, max_batch=max_batch, overlap=overlap,
                        threads=threads, precision=precision, verify=verify)
    # every output goes to a temporary file first, written as the windows are joined (no
    # full-length copy is held); all are renamed into place together at the end, so a failure
    # or Ctrl-C anywhere leaves none of them behind
    with sep, contextlib.ExitStack() as outputs:
        _check_duration_for(sep.info, video, generate, duration)
        writers = open_audio_outputs(outputs, paths, sep.sample_rate, fmt, subtype)
        unguided = mix is not None and video is None and not texts and not generate
        result = _separate(sep, writers, clock, show_progress,
                           NO_QUERY_WARNING if unguided else None, mix=mix, video=video,
                           text=texts or None, negative_text=negative_text, steps=steps,
                           cfg=cfg, seed=seed, generate=generate, duration=duration)
        with clock.measure("write"):
            for writer in writers:
                writer.close()  # complete the files: --mux reads them back
        frames = writers[0].frames
        if mux_path is not None:
            from .mux import mux

            with clock.measure("mux"):
                tmp = outputs.enter_context(atomic_output(mux_path))
                mux(video, [w.path for w in writers], result.sample_rate, tmp, titles=texts,
                    atomic=False, name=mux_path, start=result.video_start)
        with interrupts_held(PROG):  # the renames into place: a signal cannot cut them short
            outputs.pop_all().close()
    total_s = time.perf_counter() - total_started
    audio_seconds = frames / result.sample_rate
    timings = {"load": clock["load"], **result.timings, "write": clock["write"],
               "mux": clock["mux"], "total": total_s}
    return {
        "outputs": [str(p) for p in paths], "mux": str(mux_path) if mux_path else None,
        "model": str(model_dir), "backend": sep.backend_name,
        "precision": sep.backend.precision, "mode": result.mode,
        "sample_rate": result.sample_rate, "audio_seconds": audio_seconds,
        "windows": result.windows, "items": result.items, "batches": result.batches,
        "steps": steps or sep.info.default_steps,
        "cfg": sep.info.default_cfg if cfg is None else cfg, "seed": seed,
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
        # processing seconds per second of audio (below 1: faster than real time)
        "real_time_factor": round(total_s / max(audio_seconds, 1e-9), 4),
    }


NO_QUERY_WARNING = "no --video or --text: nothing told the model which source to separate"


def _separate(sep, writers: list, clock, show_progress: bool, warning: str | None, **request):
    """``sep.process(**request)`` with its output streamed into ``writers`` (the time spent
    writing added to ``clock["write"]``) and a progress bar over the batches. ``warning`` is
    given once the first batch has run: after every input check, so never before a refusal."""
    from ..progress import Progress

    def sink(k, samples):
        with clock.measure("write"):
            writers[k].write(samples)

    bar = None

    def progress(done, total):
        nonlocal bar, warning
        if warning is not None:
            warnings.warn(warning, stacklevel=2)
            warning = None
        if not show_progress or total < 2:
            return
        if bar is None:
            bar = Progress(total, PROG, "batch")
        bar.update(done)

    try:
        return sep.process(**request, progress=progress, sink=sink)
    finally:
        if bar is not None:
            bar.close()


def _plan_outputs(output, fmt, subtype, n_texts, mix, video, model_dir, mux_path
                  ) -> tuple[list[Path], str]:
    """The output paths and format, after every check that needs no work: the inputs exist, the
    outputs' formats and directories are usable, and no output is the same file as an input."""
    from .atomic import check_not_special, check_writable
    from .audio_writer import check_format
    from .errors import InputError
    from .paths import check_outputs, model_files

    if mux_path is not None and video is None:
        raise InputError("--mux needs --video (the video stream to copy)")
    check_input_files(video, mix)
    for flag, name in (("--output", output), ("--mux", mux_path)):
        if name is not None and str(name) == "-":  # the usual spelling of stdout
            raise InputError(f"{flag} -: outputs go to files (written whole, then renamed into "
                             "place); give a file name")
    if output is not None:  # a device or pipe: not a new <name>.wav beside it
        check_not_special(output, f"--output {output}")
    if output is not None and Path(output).is_dir():  # the default name inside it
        paths = [Path(output) / p for p in output_paths(None, fmt, n_texts, mix, video)]
    else:
        paths = output_paths(output, fmt, n_texts, mix, video)
    outputs = {"--output": paths[0]} if len(paths) == 1 else \
        {f"--output (text {k})": p for k, p in enumerate(paths)}
    if mux_path is not None:
        outputs["--mux"] = Path(mux_path)
    for path in outputs.values():
        if path.is_dir():
            raise InputError(f"{path}: is a directory; give a file name")
        if not path.parent.is_dir():
            raise InputError(f"{path}: output directory {path.parent} does not exist")
        check_writable(path)
    inputs = {label: path for label, path in (("--mix", mix), ("--video", video)) if path}
    check_outputs(outputs, {**inputs, **model_files(model_dir)})
    _check_suffix(paths[0], fmt)
    fmt = fmt or output_format(paths[0])
    check_format(fmt, subtype)
    if mux_path is not None and Path(mux_path).suffix.lower() not in MUX_FORMATS:
        raise InputError(f"--mux {mux_path}: unsupported extension; use one of "
                         f"{', '.join(MUX_FORMATS)}")
    if mux_path is not None:
        check_muxable(video, mux_path)
    return paths, fmt


def check_input_files(video, mix) -> None:
    """Input files must exist (also used by mmsep-batch and mmsep-serve)."""
    from .errors import InputError

    for path in (video, mix):
        if path is not None and not Path(path).exists():
            raise InputError(f"{path}: file not found")


def output_paths(output, fmt, n_texts, mix, video) -> list[Path]:
    """Output files of a request: ``output`` (default: derived from the mix or video name),
    or ``<stem>_<k><suffix>`` per text when there are several."""
    if output is None:
        source = mix or video
        name = f"{Path(source).stem}_separated" if source is not None else "generated"
        output = Path(f"{name}.{fmt or 'wav'}")
    output = Path(output)
    if output.name.startswith(".") and output.name[1:].lower() in FORMATS:
        from .errors import InputError

        raise InputError(f"--output {output}: give a file name before the extension")
    if not output.suffix:
        output = output.with_suffix(f".{fmt or 'wav'}")
    if n_texts <= 1:
        return [output]
    return [output.with_name(f"{output.stem}_{k}{output.suffix}") for k in range(n_texts)]


def _check_suffix(output: Path, fmt: str | None) -> None:
    from .errors import InputError

    found = output_format(output)
    if found is None:
        raise InputError(f"--output {output}: unknown extension {output.suffix}; use one of "
                         f"{', '.join('.' + f for f in FORMATS)}")
    if fmt is not None and fmt != found:
        raise InputError(f"--format {fmt} does not match --output {output}; drop one of them")


def main(argv=None) -> None:
    """Console entry point: one-line errors and warnings, exit codes 0/1/2/130, never a
    traceback."""
    console_main(cli, PROG, argv, interrupted="interrupted; nothing was written")


if __name__ == "__main__":
    main()
