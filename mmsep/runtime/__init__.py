"""The torch-free runtime: tokenizer, media I/O, windowing, sampling loop and backends.

Nothing reachable from this package imports torch. Names are resolved lazily from the table
below, so a heavy or optional dependency only loads when the name that needs it is used; to
export a new name, add ``"Name": "submodule"``.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "tokenize": "tokenizer",
    "ClipTokenizer": "tokenizer",
    "Separator": "separator",
    "SeparationResult": "separator",
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


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mmsep.runtime' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
