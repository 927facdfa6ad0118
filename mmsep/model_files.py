"""What a model directory's files are called and how they are fingerprinted (torch-free).

Shared by the exporter, which writes them, and the runtime, which checks them.
"""

from __future__ import annotations

import hashlib
import os

MANIFEST = "manifest.json"
# Version of manifest.json and of the stage contracts it carries; the runtime reads only this one.
MANIFEST_FORMAT_VERSION = 2
_CHUNK = 1 << 22


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
