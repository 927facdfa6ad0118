"""The torch-free runtime: tokenizer, media I/O, windowing, sampling loop and backends.

Nothing reachable from this package imports torch. Names are resolved lazily from the table
below, so a heavy or optional dependency only loads when the name that needs it is used; to
export a new name, add ``"Name": "submodule"``.
"""

from __future__ import annotations

from mmsep._lazy import lazy_exports

_EXPORTS = {  # submodule: the public names it defines
    "tokenizer": ("tokenize", "ClipTokenizer"),
    "separator": ("Separator",),
    "requests": ("SeparationResult",),
    "model_dir": ("ModelDir", "ModelInfo"),
    "backends": ("create_backend", "OrtBackend"),
    "errors": ("InputError", "ModelDirError", "BackendError", "BackendUnavailable"),
}

__all__ = sorted(name for names in _EXPORTS.values() for name in names)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
