"""Backends that run the stage graphs of a model directory: one protocol (protocol.py), one
module per backend (ort.py, tensorrt.py), one factory (factory.py). Names resolve lazily, so
TensorRT's module loads only when one of its names is used."""

from __future__ import annotations

from mmsep._lazy import lazy_exports

_EXPORTS = {  # submodule: the public names it defines
    "protocol": ("Backend", "check_inputs", "stack_branches", "unconditional_half"),
    "ort": ("OrtBackend", "PRECISIONS"),
    "tensorrt": ("TrtBackend",),
    "factory": ("BACKENDS", "create_backend", "cuda_available"),
}

__all__ = sorted(name for names in _EXPORTS.values() for name in names)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
