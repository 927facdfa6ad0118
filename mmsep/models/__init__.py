"""PyTorch definitions of every network MMAudioSep uses, and their loaders.

Names are resolved lazily so that ``import mmsep.models`` stays cheap and a missing optional
dependency (open_clip for CLIP) only matters to the code that needs it.
"""

from __future__ import annotations

from mmsep._lazy import lazy_exports

_EXPORTS = {  # submodule: the public names it defines
    "flow": ("build", "FlowConfig", "FLOW_PRESETS", "MMAudioFlow"),
    "checkpoint": ("load_flow", "detect_flow_config", "convert_to_separation"),
    "sampler": ("sample",),
    "randomize": ("randomize_",),
    "io": ("CheckpointError",),
    "mel": ("MelSpectrogram",),
    "vae": ("load_vae", "build_vae"),
    "bigvgan": ("load_vocoder", "build_vocoder"),
    "clip": ("load_clip", "build_clip"),
    "synchformer": ("load_synchformer", "build_synchformer"),
    "components": ("Components", "build_components", "load_components", "save_components"),
    "presets": ("sequence_lengths", "AUDIO_MODES"),
}

__all__ = sorted(name for names in _EXPORTS.values() for name in names)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
