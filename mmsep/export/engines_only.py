"""``mmsep-export --engines-only DIR``: TensorRT engines for a model directory exported earlier.

Like an export, the work happens in a new directory beside DIR (its graphs and files linked in,
new engines written there) that replaces DIR only when complete: a failed or interrupted build
leaves DIR as it was.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from ..model_files import MANIFEST, ManifestError, engine_records, manifest_files, read_manifest
from ..runtime.atomic import remove_stale_partials, temporary_name
from .errors import UsageError


class OnnxReference:
    """A stage's fp32 ONNX graph on ONNX Runtime (CPU), callable like its PyTorch module.

    --engines-only has no checkpoint at hand: the fp32 graph, itself checked against PyTorch at
    export time, is the reference for the engine parity check.
    """

    def __init__(self, path: Path, spec):
        import onnxruntime as ort

        self.spec = spec
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def parameters(self):
        return iter(())

    def eval(self):
        return self

    def to(self, device):
        return self

    def __call__(self, *inputs):
        import torch

        device = inputs[0].device
        feeds = {name: t.detach().cpu().numpy() for name, t in zip(self.spec.input_names, inputs)}
        outs = [torch.from_numpy(o).to(device) for o in self.session.run(None, feeds)]
        return outs[0] if len(outs) == 1 else tuple(outs)


def build_engines_only(directory: Path, *, precision: str, timing_cache, force: bool,
                       log: Callable[[str], None]):
    """The engines of model directory ``directory`` (an ``ExportResult``); UsageError where it is
    none, holds files of others (without ``force``) or TensorRT is not usable here."""
    from ..stages import StageSpec
    from .exporter import ExportResult, existing_model, link_file, swap_into_place
    from .manifest import write_manifest
    from .tensorrt_build import build_engines, unavailable_reason

    directory = Path(directory)
    try:
        read_manifest(directory)  # its own message for a directory that holds no model
    except ManifestError as exc:
        raise UsageError(str(exc)) from None
    previous = existing_model(directory, force)  # files of others are not replaced
    reason = unavailable_reason()
    if reason is not None:
        raise UsageError(f"cannot build TensorRT engines on this machine: {reason}")
    manifest = {k: v for k, v in previous.items() if k != "_dir"}
    references = {name: OnnxReference(directory / stage["onnx"], StageSpec.from_json(stage["spec"]))
                  for name, stage in manifest["stages"].items()}
    remove_stale_partials(directory.parent)
    tmp = directory.parent / temporary_name(directory.name)
    tmp.mkdir()
    try:
        # every file but the engines, which are built anew (never written through a link into
        # the live directory) or linked again when reused
        engines = {record["file"] for record in engine_records(manifest.get("tensorrt"))}
        for name in manifest_files(manifest) - engines - {MANIFEST}:
            if (directory / name).exists():  # a graph made for old engines may be gone
                link_file(directory / name, tmp / name)
        manifest["tensorrt"] = build_engines(tmp, manifest, references, precision=precision,
                                             timing_cache=timing_cache, progress=log,
                                             previous=previous)
        changed = bool(manifest["tensorrt"].get("rebuilt")) or \
            (previous.get("tensorrt") or {}).get("status") != "built"
        if changed:
            write_manifest(tmp, manifest)
            swap_into_place(tmp, directory)
        else:
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(directory, manifest, [], list(manifest["stages"]), changed=changed)
