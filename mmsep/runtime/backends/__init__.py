"""Backends that run the stage graphs of a model directory: one protocol (protocol.py), one
module per backend (ort.py, tensorrt.py), one factory (factory.py). Names resolve lazily, so
TensorRT's module loads only when one of its names is used."""

from __future__ import annotations

from mmsep._lazy import lazy_exports

_EXPORTS = {
    "Backend": "protocol",
    "check_inputs": "protocol",
    "stack_branches": "protocol",
    "unconditional_half": "protocol",
    "OrtBackend": "ort",
    "TrtBackend": "tensorrt",
    "BACKENDS": "factory",
    "create_backend": "factory",
    "cuda_available": "factory",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
