"""The weights both pipelines run: a model directory and the PyTorch components it came from."""

from __future__ import annotations

from pathlib import Path

SEED = 0


class WeightsError(ValueError):
    """The baseline's weights cannot be found or do not match the model directory."""


def prepare_model(model_dir: Path | None, preset: str | None, *, checkpoint=None,
                  weights_dir=None, cache_dir: Path, log) -> tuple[Path, object]:
    """(model directory, Components). ``preset``: random weights exported to a cached directory
    (re-exporting only what changed); ``model_dir``: the components its manifest names."""
    from mmsep.export.errors import UsageError
    from mmsep.models import build_components

    if preset is not None:
        log(f"building preset {preset!r} with random weights (seed {SEED})")
        try:
            components = build_components(preset, duration=8.0, seed=SEED)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        out = cache_dir / "models" / f"{preset}-seed{SEED}"
        _export(components, out, {"preset": preset, "seed": SEED}, log)
        return out, components
    from mmsep.runtime.model_dir import ModelDir

    # one-line errors for a missing or broken directory
    manifest = ModelDir(model_dir, verify=False).manifest
    return model_dir, components_for(manifest, checkpoint=checkpoint, weights_dir=weights_dir)


def _export(components, out: Path, sources: dict, log) -> None:
    from mmsep.export.exporter import export_model

    out.parent.mkdir(parents=True, exist_ok=True)
    log(f"exporting to {out} (reused when unchanged)")
    export_model(components, out, sources=sources, log=lambda msg: None)


def components_for(manifest: dict, *, checkpoint=None, weights_dir=None):
    """The PyTorch components of a model directory's manifest ("sources")."""
    from mmsep.models import build_components, load_components
    from mmsep.model_files import sha256_file

    sources = manifest.get("sources") or {}
    window = float(manifest["model"]["window_seconds"])
    if checkpoint is None and weights_dir is None and "preset" in sources:
        return build_components(sources["preset"], duration=window, seed=int(sources["seed"]))
    hint = "pass --checkpoint and --weights-dir"
    recorded = {name: entry.get("path") for name, entry in sources.items()
                if isinstance(entry, dict)}
    flow = Path(checkpoint) if checkpoint is not None else (
        Path(recorded["flow"]) if recorded.get("flow") else None)
    if flow is None:
        raise WeightsError(f"the manifest records no flow checkpoint; {hint}")
    if not flow.is_file():
        raise WeightsError(f"{flow}: flow checkpoint not found; {hint}")
    if checkpoint is None:
        want = sources["flow"].get("sha256")
        if want and sha256_file(flow) != want:
            raise WeightsError(f"{flow}: SHA-256 differs from the one the model directory was "
                               f"exported from; {hint}")
    companions = {} if weights_dir is not None else {
        name: recorded.get(name) for name in ("vae", "vocoder", "clip", "synchformer")}
    return load_components(weights_dir, flow=flow, duration=window, **companions)
