"""A model directory written by ``mmsep-export``: manifest, stage graphs, empty features.

Loading checks, in order: the directory and its manifest exist, the manifest is of a format this
runtime reads, every stage the model needs is described, and every file the manifest lists is
present with the recorded size and SHA-256 (a mismatch means the directory was tampered with or
copied incompletely). Each failure is one ModelDirError naming the directory and the file.

A directory re-exported while a run uses it: mmsep-export assembles the new directory beside the
old one and swaps it in with renames, then deletes the old one. What a run has already loaded
(graphs, engines, features, tokenizer) is in memory and unaffected. A graph loaded later is read
only if the path still names the directory that was checked (``check_unchanged``); otherwise the
run stops with a ModelDirError instead of mixing files of two exports.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..model_files import MANIFEST, ManifestError, read_manifest, sha256_file
from ..stages import MIXTURE_LATENTS, Geometry, Stage, StageSpec, stage_names
from .errors import ModelDirError
from .tokenizer import ClipTokenizer


@dataclass(frozen=True)
class ModelInfo:
    """The model facts the runtime needs: the manifest's ``model`` section and its ``geometry``,
    read once. The geometry's facts read as attributes of the model (``info.clip_len``)."""

    preset: str
    default_steps: int
    default_cfg: float
    default_overlap_seconds: float
    max_batch: int
    geometry: Geometry

    @property
    def latent_shape(self) -> tuple[int, int]:
        """(N, C) of one window's latent."""
        return self.geometry.latent_len, self.geometry.latent_dim

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "geometry":  # not set yet (copy, pickle)
            raise AttributeError(name)
        return getattr(self.geometry, name)


def hash_mismatch(path: Path, *, skipped: bool = False) -> ModelDirError:
    """The error for a model file whose SHA-256 is not the manifest's; ``skipped``: found only
    after a failure, the start-up check having been skipped (--no-verify)."""
    why = "; --no-verify skipped this check at start" if skipped else ""
    return ModelDirError(f"{path}: SHA-256 does not match the manifest (tampered or "
                         f"incomplete{why})")


class ModelDir:
    """A checked model directory. ``verify=False`` skips the hashes (sizes are still checked)."""

    def __init__(self, path: str | os.PathLike, *, verify: bool = True):
        self.path = Path(path)
        self._identity = _directory_identity(self.path)  # before the manifest is read
        self.manifest = manifest = read_model_manifest(self.path)
        manifest_path = self.path / MANIFEST
        try:
            self.info = _model_info(manifest)
            self.specs = {name: StageSpec.from_json(stage["spec"])
                          for name, stage in manifest["stages"].items()}
            self._files = {name: stage["files"] for name, stage in manifest["stages"].items()}
            self._onnx = {name: {"fp32": stage["onnx"], **{
                precision: copy["onnx"] for precision, copy in stage.get("reduced", {}).items()}}
                for name, stage in manifest["stages"].items()}
            self._files.update({f"{name}.{precision}": copy["files"]
                                for name, stage in manifest["stages"].items()
                                for precision, copy in stage.get("reduced", {}).items()})
            self._extras = {role: entry["file"] for role, entry in manifest["files"].items()}
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelDirError(f"{manifest_path}: incomplete manifest (bad or missing {exc})") \
                from None
        if self.info.separation and self.info.mixture_latent not in MIXTURE_LATENTS:
            raise ModelDirError(f"{manifest_path}: no mixture latent convention recorded (exported "
                                "by an older mmsep-export); re-export the model")
        missing = [name for name in stage_names(self.info.separation) if name not in self.specs]
        if missing:
            raise ModelDirError(f"{manifest_path}: no stage {', '.join(missing)} in the manifest")
        for role in ("empty_features", "tokenizer"):
            if role not in self._extras:
                raise ModelDirError(f"{manifest_path}: no {role} file in the manifest")
        self._check_files(verify)
        self._empty: dict[str, np.ndarray] | None = None
        self.check_unchanged()

    def check_unchanged(self) -> None:
        """Raise ModelDirError if ``path`` no longer names the directory that was checked (it
        was re-exported, moved or deleted since)."""
        if _directory_identity(self.path) != self._identity:
            raise ModelDirError(f"model directory {self.path} was replaced or removed while in "
                                "use (re-exported?); nothing from the new one was mixed in; "
                                "run again")

    # -- files ---------------------------------------------------------------------------------
    def _listed_files(self) -> list[tuple[str, str, int | None]]:
        """(name, SHA-256, bytes or None) of every file the manifest lists."""
        listed: list[tuple[str, str, int | None]] = []
        try:
            for files in self._files.values():
                listed += [(name, meta["sha256"], meta.get("bytes"))
                           for name, meta in files.items()]
            listed += [(entry["file"], entry["sha256"], entry.get("bytes"))
                       for entry in self.manifest["files"].values()]
        except (KeyError, TypeError, AttributeError) as exc:
            raise ModelDirError(f"{self.path / MANIFEST}: incomplete manifest (bad or missing "
                                f"{exc})") from None
        return listed

    def _check_files(self, verify: bool) -> None:
        self.verified = verify
        for name, sha, size in self._listed_files():
            if not (self.path / name).is_file():
                raise ModelDirError(f"{self.path}: missing file {name} (incomplete model "
                                    "directory; re-export or copy it again)")
            self.check_file(name, sha, size)

    def check_file(self, name: str, sha: str, size: int | None) -> Path:
        """The path of the directory's file ``name`` after checking it against its record: its
        size (when recorded) always, its SHA-256 unless the directory was opened with
        ``verify=False``. Also for files outside the stage records (TensorRT engines)."""
        path = self.path / name
        if size is not None and path.stat().st_size != size:
            raise ModelDirError(f"{path}: {path.stat().st_size} bytes, the manifest says "
                                f"{size} (tampered or incomplete)")
        try:
            digest = sha256_file(path) if self.verified else sha
        except OSError as exc:  # no permission, an I/O error
            raise ModelDirError(f"{path}: cannot read ({exc.strerror or exc})") from None
        if digest != sha:
            raise hash_mismatch(path)
        return path

    def check_damage(self, path: Path) -> None:
        """After ``path`` failed to load from a directory opened with ``verify=False``: raise
        ModelDirError if its SHA-256 is not the manifest's, so that a damaged file is reported
        as one (exit 2) rather than as a failure of the runtime."""
        if self.verified:
            return
        name = path.relative_to(self.path).as_posix()
        groups = [files for files in self._files.values() if name in files]  # graph + data
        groups += [{name: {"sha256": self.manifest["files"][role]["sha256"]}}
                   for role, file in self._extras.items() if file == name]
        for files in groups:
            for listed, meta in files.items():
                if sha256_file(self.path / listed) != meta["sha256"]:
                    raise hash_mismatch(self.path / listed, skipped=True)

    def tokenizer(self) -> ClipTokenizer:
        """The CLIP tokenizer over the directory's vocabulary."""
        path = self.tokenizer_vocab
        try:
            return ClipTokenizer(path)
        except ValueError as exc:  # names the file
            self.check_damage(path)
            raise ModelDirError(str(exc)) from None

    def onnx_path(self, stage: str, precision: str = "fp32") -> Path:
        """The stage's graph: the fp32 export, or a reduced-precision copy it lists."""
        return self.path / self._onnx[stage][precision]

    def has_precision(self, precision: str) -> bool:
        """Whether every stage has a graph in ``precision`` (fp32 always)."""
        return all(precision in graphs for graphs in self._onnx.values())

    @property
    def tokenizer_vocab(self) -> Path:
        return self.path / self._extras["tokenizer"]

    def empty_features(self) -> dict[str, np.ndarray]:
        """The learned empty clip (Tc, Dc), sync (Ts, Ds) and text (77, Dt) features."""
        if self._empty is None:
            path = self.path / self._extras["empty_features"]
            try:
                with np.load(path, allow_pickle=False) as data:
                    empty = {key: np.ascontiguousarray(data[key], dtype=np.float32)
                             for key in self.specs[Stage.CONDITIONER].input_names}
            except (OSError, KeyError, ValueError, zipfile.BadZipFile, zlib.error) as exc:
                self.check_damage(path)
                raise ModelDirError(f"{path}: unreadable empty features ({exc})") from None
            spec = self.specs[Stage.CONDITIONER]
            for key, value in empty.items():
                want = spec.tensor(key).concrete(1)[1:]
                if value.shape != want:
                    raise ModelDirError(f"{path}: {key} has shape {value.shape}, the conditioner "
                                        f"expects {want}")
            self._empty = empty
        return self._empty


def read_model_manifest(path: str | os.PathLike) -> dict:
    """The manifest of model directory ``path`` (no graph is read or hashed); ModelDirError
    names what is wrong: missing, not a directory, no or a bad manifest."""
    path = Path(path)
    if not path.exists():
        raise ModelDirError(f"model directory {path} does not exist (create one with "
                            "mmsep-export)")
    if not path.is_dir():
        raise ModelDirError(f"model directory {path} is not a directory")
    try:
        return read_manifest(path)
    except ManifestError as exc:
        raise ModelDirError(str(exc)) from None


def _directory_identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _model_info(manifest: dict) -> ModelInfo:
    model = manifest["model"]
    return ModelInfo(
        preset=str(model.get("preset", "")),
        default_steps=int(model["default_steps"]), default_cfg=float(model["default_cfg"]),
        default_overlap_seconds=float(model["default_overlap_seconds"]),
        max_batch=int(model["max_batch"]), geometry=Geometry.from_json(manifest["geometry"]))
