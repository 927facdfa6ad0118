"""Write random-weight checkpoints in the MMAudio release layout (for trying a deployment).

    python -m mmsep.models.random_weights --preset small_44k --out /tmp/random_weights

writes weights/mmaudiosep_<preset>.pth (a separation checkpoint; with --generation MMAudio's
weights/mmaudio_<preset>.pth) and every companion network under ext_weights/ (the 16 kHz VAE and
BigVGAN v1 best_netG.pt for 16 kHz presets, the 44.1 kHz VAE and the BigVGAN v2 directory
otherwise), all randomised (no weight left at zero). The files load with
``mmsep.models.load_components`` and ``mmsep-export --weights-dir DIR --variant <preset>``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--preset", default="tiny", show_default=True,
              help="Flow network preset (small_16k, small_44k, ..., tiny, tiny_16k).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Weights directory to write.")
@click.option("--generation", is_flag=True,
              help="Write a generation (not separation) flow network.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
def main(preset: str, out: Path, generation: bool, seed: int) -> None:
    """Write a random-weight flow checkpoint and companions in the release layout."""
    from .components import build_components, save_components

    started = time.perf_counter()
    try:
        components = build_components(preset, separation=not generation, seed=seed)
    except ValueError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    paths = save_components(components, out)
    for name, path in paths.items():
        click.echo(f"{name:<12} {path}")
    click.echo(f"wrote random {preset} weights in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
