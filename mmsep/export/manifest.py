"""manifest.json: what a model directory holds, where it came from, and how it was checked."""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path

import torch

from .. import __version__
from ..model_files import MANIFEST
from ..runtime.atomic import write_bytes_atomically
from ..model_files import MANIFEST_FORMAT_VERSION as FORMAT_VERSION
from ..stages import StageSpec


def sha256_state(module: torch.nn.Module) -> str:
    """Content hash of a module's parameters and buffers (names, dtypes, shapes, values)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict(keep_vars=False).items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def stage_key(spec: StageSpec, weights_sha: str, *, opset: int) -> str:
    """Content address of one exported graph: contract, weights, opset and exporter versions."""
    payload = json.dumps({"spec": spec.to_json(), "weights": weights_sha, "opset": opset,
                          "torch": torch.__version__, "mmsep": __version__}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def environment() -> dict:
    import onnx
    import onnxruntime

    return {"python": platform.python_version(), "torch": torch.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "machine": platform.machine(), "system": platform.system()}


def write_manifest(directory: Path, manifest: dict) -> Path:
    text = json.dumps(manifest, indent=2, sort_keys=False) + "\n"
    return write_bytes_atomically(Path(directory) / MANIFEST, text.encode())


def new_manifest() -> dict:
    return {"format_version": FORMAT_VERSION, "package": "mmsep", "package_version": __version__,
            "environment": environment()}
