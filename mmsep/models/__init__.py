"""PyTorch definitions of every network MMAudioSep uses, and their loaders.

Names are resolved lazily so that ``import mmsep.models`` stays cheap and a missing optional
dependency (open_clip for CLIP) only matters to the code that needs it.
"""

from __future__ import annotations

from mmsep._lazy import lazy_exports

_EXPORTS = {
    # flow network, presets, checkpoints
    "build": "flow",
    "FlowConfig": "flow",
    "FLOW_PRESETS": "flow",
    "MMAudioFlow": "flow",
    "load_flow": "checkpoint",
    "detect_flow_config": "checkpoint",
    "convert_to_separation": "checkpoint",
    "sample": "sampler",
    "randomize_": "randomize",
    "CheckpointError": "io",
    # audio
    "MelSpectrogram": "mel",
    "load_vae": "vae",
    "build_vae": "vae",
    "load_vocoder": "bigvgan",
    "build_vocoder": "bigvgan",
    # feature encoders
    "load_clip": "clip",
    "build_clip": "clip",
    "load_synchformer": "synchformer",
    "build_synchformer": "synchformer",
    # everything of one deployment
    "Components": "components",
    "build_components": "components",
    "load_components": "components",
    "save_components": "components",
    # geometry
    "sequence_lengths": "presets",
    "AUDIO_MODES": "presets",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
