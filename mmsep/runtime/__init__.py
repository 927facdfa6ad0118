"""The torch-free runtime: tokenizer, media I/O, windowing, sampling loop and backends.

Nothing reachable from this package imports torch. Names are resolved lazily from the table
below, so a heavy or optional dependency only loads when the name that needs it is used; to
export a new name, add ``"Name": "submodule"``.
"""

from __future__ import annotations

from mmsep._lazy import lazy_exports

_EXPORTS = {
    "tokenize": "tokenizer",
    "ClipTokenizer": "tokenizer",
    "Separator": "separator",
    "SeparationResult": "requests",
    "ModelDir": "model_dir",
    "ModelInfo": "model_dir",
    "create_backend": "backends",
    "OrtBackend": "backends",
    "InputError": "errors",
    "ModelDirError": "errors",
    "BackendError": "errors",
    "BackendUnavailable": "errors",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
