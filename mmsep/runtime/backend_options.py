"""The backend options of every program that runs a model (mmsep-run, mmsep-batch, mmsep-serve),
defined once so that their names, choices, defaults and help agree everywhere."""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import click

from .backends import BACKENDS, PRECISIONS


@dataclass(frozen=True)
class BackendOptions:
    """How a ``Separator`` runs: ``Separator(model_dir, **options.separator_kwargs())``."""

    backend: str = "auto"
    threads: int = 0
    precision: str = "auto"
    verify: bool = True

    def separator_kwargs(self) -> dict:
        return asdict(self)


def backend_options(each: str = ""):
    """Click decorator: --backend, --threads, --precision and --no-verify, given to the command
    as one ``backend_options`` argument (a ``BackendOptions``). ``each`` names what holds its own
    backend ("worker", "replica"), for the help texts."""
    per = f" Each {each} loads its own." if each else ""
    options = [
        click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
                     help="Inference backend; auto picks the fastest usable one: the model's "
                          "TensorRT engines (when built for this GPU and TensorRT version), then "
                          "ONNX Runtime CUDA, then ONNX Runtime CPU, and says which." + per),
        click.option("--threads", type=click.IntRange(0, 1024), default=0, show_default=True,
                     help="ONNX Runtime intra-op threads (0: its default)" +
                          (f", per {each}." if each else ".")),
        click.option("--precision", type=click.Choice(PRECISIONS), default="auto",
                     show_default=True,
                     help="ONNX Runtime's graphs: auto runs the fp16 mixed-precision graphs on "
                          "CUDA (fp32 where the model directory has none) and fp32 on the CPU; "
                          "fp32 runs fp32 with TF32 off. TensorRT engines keep the precision "
                          "they were built with."),
        click.option("--no-verify", is_flag=True,
                     help="Skip the SHA-256 check of the model files at load (sizes are still "
                          "checked); saves seconds on multi-GB models."),
    ]

    def decorate(command):
        @functools.wraps(command)
        def with_options(*args, backend, threads, precision, no_verify, **kwargs):
            chosen = BackendOptions(backend, threads, precision, not no_verify)
            return command(*args, backend_options=chosen, **kwargs)

        for option in reversed(options):
            with_options = option(with_options)
        return with_options

    return decorate
