"""What a model directory's files are called and how they are fingerprinted (torch-free).

Shared by the exporter, which writes them, and the runtime, which checks them; ``read_manifest``
is the one reader of manifest.json.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST = "manifest.json"
# Version of manifest.json and of the stage contracts and geometry it carries; the runtime reads
# only this one. 3: the geometry carries the window length and Synchformer's rate and stride.
MANIFEST_FORMAT_VERSION = 3
# The CLIP tokenizer's vocabulary, shipped with the package and copied into every model directory.
VOCAB_FILE = Path(__file__).with_name("runtime") / "data" / "bpe_simple_vocab_16e6.txt.gz"
_CHUNK = 1 << 22


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class ManifestError(ValueError):
    """A directory has no readable manifest.json of this format version (one-line message)."""


def read_manifest(directory: str | os.PathLike) -> dict:
    """The manifest of ``directory``: exists, is JSON, is an object, has this format version."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{directory}: no {MANIFEST}; not an mmsep model directory "
                            "(create one with mmsep-export)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict):
        raise ManifestError(f"{path}: not an mmsep manifest")
    version = manifest.get("format_version")
    if version != MANIFEST_FORMAT_VERSION:
        raise ManifestError(f"{path}: format version {version!r} is not supported by this version "
                            f"of mmsep (reads version {MANIFEST_FORMAT_VERSION}); re-export the "
                            "model with a matching mmsep-export")
    return manifest


def manifest_files(manifest: dict) -> set[str]:
    """Every file name of a model directory that its manifest accounts for (the stages' graphs
    and copies, the extra files, the TensorRT engines and their graphs, the manifest itself)."""
    names = {MANIFEST}
    for stage in manifest.get("stages", {}).values():
        names.update(stage.get("files", {}))
        for copy in stage.get("reduced", {}).values():
            names.update(copy.get("files", {}))
    names.update(entry["file"] for entry in manifest.get("files", {}).values())
    names.update(record[k] for record in engine_records(manifest.get("tensorrt"))
                 for k in ("file", "onnx") if k in record)
    return names


def engine_records(section: dict | None) -> list[dict]:
    """The records of every engine in a manifest's "tensorrt" section: the stages' and the
    frame-resize engines'."""
    section = section or {}
    return [*(section.get("engines") or {}).values(),
            *(r for r in section.values() if isinstance(r, dict) and "file" in r)]
