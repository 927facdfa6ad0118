"""Turn a set of components into a self-contained model directory, atomically and incrementally.

Layout of a model directory:
    manifest.json              contracts, sources, hashes, validation results
                               (mmsep.export.manifest)
    <stage>.onnx[.data]        one graph per stage (external data for large graphs)
    <stage>.fp16.onnx[.data]   its mixed-precision copy (fp32 I/O), for ONNX Runtime CUDA and
                               TensorRT, unless the export's precision is not fp16
    <stage>.<precision>.engine TensorRT engines, when built
    frame_resize[_yuv].onnx/.engine  the TensorRT backend's video frame resize (RGB, yuv420p),
                               with the engines
    empty_features.npz         the flow network's learned empty clip/sync/text features
    bpe_simple_vocab_16e6.txt.gz   CLIP tokenizer vocabulary
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..models.components import Components
from ..runtime.atomic import (fsync_directory, remove_stale_partials, replace_directory,
                              temporary_name)
from ..runtime.resize_engine import ENGINE_NAMES
from ..model_files import MANIFEST, VOCAB_FILE, ManifestError, engine_records, manifest_files, \
    read_manifest, sha256_file
from ..stages import GENERATION_NOISE_SCALE, POSTERIOR_SAMPLE, Geometry, Stage, StageSpec, \
    build_stage_specs
from . import manifest as mf
from .errors import UsageError
from .mixed_precision import PASS_VERSION
from .onnx_graph import OPSET
from .parity import PARITY_BATCH, StageReference, check_onnxruntime
from .stage_graphs import GraphsWritten, GraphWork, GraphWriter
from .wrappers import build_stage_modules, geometry

EMPTY_FEATURES = "empty_features.npz"
DEFAULT_STEPS = 25
DEFAULT_CFG = 4.5
DEFAULT_OVERLAP = 1.0
NOISE_ORDER = ("rng = numpy.random.default_rng(seed); x0 = rng.standard_normal((items, N, C), "
               "float32) for all items; then per window in order: in generation mode its noise "
               f"audio {GENERATION_NOISE_SCALE} * rng.standard_normal(window_samples, float32), "
               "then under posterior-sample its posterior noise "
               "rng.standard_normal((N, C), float32)")

Progress = Callable[[str], None]


@dataclass
class ExportResult:
    directory: Path
    manifest: dict
    rebuilt: list[str]  # stages exported in this run
    reused: list[str]
    changed: bool  # whether the directory changed (a precision or engine change rebuilds none)

    @property
    def unchanged(self) -> bool:
        return not self.changed


def export_model(components: Components, out: Path, *, max_batch: int = 4,
                 sources: dict[str, dict] | None = None, force: bool = False,
                 stage_progress: Callable | None = None, log: Progress = print,
                 engine_builder: Callable | None = None,
                 engines_skipped: str = "not requested",
                 mixture_latent: str = POSTERIOR_SAMPLE,
                 onnx_precisions: tuple[str, ...] = ("fp16",),
                 parity_device: str = "cpu", jobs: int = 1) -> ExportResult:
    """Export every stage of ``components`` into ``out``.

    Stages whose content key (contract, weights, opset, exporter versions) matches the manifest
    already in ``out`` are reused; when nothing changed the directory is left untouched. The new
    directory is assembled beside ``out`` and moved into place only when complete.
    ``engine_builder(tmp_dir, manifest, modules, previous)`` returns the manifest's "tensorrt"
    section; without one, that section records ``engines_skipped`` as the reason.
    ``mixture_latent`` is the mix_encoder's convention (``mmsep.stages.MIXTURE_LATENTS``),
    recorded in the manifest's geometry. ``onnx_precisions`` are the reduced-precision graph
    copies written beside each fp32 graph (``mixed_precision.convert_graph``); each is recorded
    under the stage's "reduced". Every graph is checked against PyTorch fp32 on
    ``parity_device`` ("cpu", or "cuda": PyTorch and ONNX Runtime on the GPU). ``jobs`` > 1
    writes the stages' graphs in that many processes while this one checks them
    (``stage_graphs.GraphWriter``).
    """
    out = Path(out)
    previous = existing_model(out, force)
    g = geometry(components, mixture_latent)
    specs = build_stage_specs(g, max_batch=max_batch)
    modules = build_stage_modules(components, g)
    _check_disk(out, modules, specs, len(onnx_precisions))

    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out.parent)  # what killed exports (SIGKILL, power loss) left there
    tmp = out.parent / temporary_name(out.name)  # unique per run, as atomic_output's temporaries
    tmp.mkdir()  # exclusive, with the usual permissions (mkdtemp's 0700 would stay on the model)
    try:
        plans = {name: _plan_stage(name, modules[name], specs[name], tmp, previous,
                                   onnx_precisions) for name in specs}
        stages = _write_and_check(plans, modules, specs, tmp, parity_device, jobs,
                                  stage_progress, log)
        rebuilt = [name for name, plan in plans.items() if plan.work is not None]
        reused = [name for name, plan in plans.items() if plan.work is None]
        extras = _write_extras(components, specs[Stage.CONDITIONER], tmp)
        manifest = _manifest(components, g, specs, stages, extras, sources or {}, max_batch)
        if engine_builder is not None:
            manifest["tensorrt"] = engine_builder(tmp, manifest, modules, previous)
        else:
            manifest["tensorrt"] = _kept_engines(previous, manifest, tmp) or \
                {"status": "skipped", "reason": engines_skipped}
        if previous is not None and not rebuilt and not manifest["tensorrt"].get("rebuilt") \
                and _same_payload(previous, manifest):
            shutil.rmtree(tmp)
            previous.pop("_dir")
            return ExportResult(out, previous, [], reused, changed=False)
        mf.write_manifest(tmp, manifest)
        swap_into_place(tmp, out)
        return ExportResult(out, manifest, rebuilt, reused, changed=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def existing_model(out: Path, force: bool) -> dict | None:
    """The manifest of the model directory ``out`` replaces (None where there is none);
    UsageError where ``out`` holds something else that only ``force`` may replace."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise UsageError(f"{out}: exists and is not a directory")
    try:
        previous = read_manifest(out)
    except ManifestError:
        if any(out.iterdir()) and not force:
            raise UsageError(f"{out}: exists, is not empty and is not an mmsep model directory; "
                             "choose another --out or pass --force to replace it") from None
        return None
    if not force:
        _refuse_foreign_files(out, previous)
    return {**previous, "_dir": str(out)}


def _refuse_foreign_files(out: Path, manifest: dict) -> None:
    """The export replaces ``out`` as a whole: files its manifest does not account for (the
    user's own, put there since) are not deleted without --force."""
    try:
        ours = manifest_files(manifest)
    except (KeyError, TypeError, AttributeError):
        ours = {MANIFEST}  # a damaged manifest accounts for nothing else
    foreign = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir()
                     if p.name not in ours)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5
                                          else "")
        raise UsageError(f"{out}: holds {shown}, which mmsep-export did not write and replacing "
                         "the directory would delete; move them, or pass --force")


@dataclass
class _StagePlan:
    """What an export does with one stage: its content key, the previous export's records whose
    files were linked into the new directory, and the graphs still to write."""

    key: str
    weights: str
    precisions: tuple[str, ...]
    kept: dict | None  # the previous record of the fp32 graph
    kept_copies: dict[str, dict]  # precision -> the previous record of that copy
    work: GraphWork | None  # None: nothing to write, the stage is reused


def _plan_stage(name: str, module, spec: StageSpec, tmp: Path, previous: dict | None,
                precisions: tuple[str, ...]) -> _StagePlan:
    """Reuse the previous graph when its key matches and its files are intact, and each copy
    made from that same graph by the same conversion pass; the rest is work."""
    weights = mf.sha256_state(module)
    key = mf.stage_key(spec, weights, opset=OPSET)
    old = (previous or {}).get("stages", {}).get(name) or {}
    kept = old if old.get("key") == key and _reuse_files(old["files"], tmp, previous["_dir"]) \
        else None
    copies = {}
    for precision in precisions:
        copy = old.get("reduced", {}).get(precision)
        if copy and copy.get("source_key") == key and copy.get("pass") == PASS_VERSION \
                and _reuse_files(copy["files"], tmp, previous["_dir"]):
            copies[precision] = copy
    todo = tuple(p for p in precisions if p not in copies)
    work = GraphWork(name, kept is None, todo) if kept is None or todo else None
    return _StagePlan(key, weights, precisions, kept, copies, work)


def _write_and_check(plans: dict[str, _StagePlan], modules: dict, specs: dict, tmp: Path,
                     parity_device: str, jobs: int, stage_progress: Callable | None,
                     log: Progress) -> dict:
    """Every stage's record: its new graphs written (by ``jobs`` processes) and checked here on
    ``parity_device`` as each is done, in pipeline order."""
    stages = {}
    with GraphWriter(modules, specs, tmp, jobs) as writer:
        writer.start([plan.work for plan in plans.values() if plan.work is not None])
        for name in stage_progress(list(plans)) if stage_progress else plans:
            reference = StageReference(modules[name], specs[name], parity_device)
            stages[name] = _finish_stage(name, plans[name], writer.result(name), reference, tmp,
                                         log)
    return stages


def _finish_stage(name: str, plan: _StagePlan, written: GraphsWritten | None,
                  reference: StageReference, tmp: Path, log: Progress) -> dict:
    """The stage's manifest record: reused parts as they were, new graphs checked."""
    record = dict(plan.kept) if plan.kept else _check_new_graph(name, plan, written, reference,
                                                                  tmp, log)
    record["reduced"] = {
        precision: plan.kept_copies.get(precision) or _check_copy(
            name, precision, plan.key, written.conversions[precision], reference, tmp, log)
        for precision in plan.precisions}
    return record


def _check_new_graph(name: str, plan: _StagePlan, written: GraphsWritten,
                     reference: StageReference, tmp: Path, log: Progress) -> dict:
    spec, path = reference.spec, tmp / f"{name}.onnx"
    parity = check_onnxruntime(reference.module, spec, path, reference=reference)
    log(f"{name}: exported in {written.export_seconds:.1f} s, ONNX Runtime {reference.device} "
        f"rel L2 {parity.worst:.1e}")
    return {"key": plan.key, "weights_sha256": plan.weights, "spec": spec.to_json(),
            "files": _graph_files(path), "onnx": path.name, "graph": written.graph,
            "parity": {"onnxruntime": parity.to_json()},
            "export_seconds": round(written.export_seconds, 2)}


def _check_copy(name: str, precision: str, key: str, summary: dict, reference: StageReference,
                tmp: Path, log: Progress) -> dict:
    """The record of a new reduced-precision copy of the graph with content key ``key``, checked
    against PyTorch fp32."""
    from .precision_parity import check_reduced_precision

    spec, device, path = reference.spec, reference.device, tmp / f"{name}.{precision}.onnx"
    # on the CPU at batch 1: the fp32 check ran at another batch than the export's, the copy
    # keeps its axes (convert_graph checks the contract), and ORT's CPU fp16 kernels are slow
    # (BigVGAN v2's vocoder: 7 minutes at batch 3 on 2 cores); on the GPU at the fp32 check's
    # batch, against the same PyTorch outputs
    batch = PARITY_BATCH if device == "cuda" else 1
    parity = check_reduced_precision(reference.module, spec, path, precision, batch=batch,
                                     reference=reference)
    log(f"{name}: {precision} graph, ONNX Runtime {device} rel L2 {parity.worst:.1e}")
    return {"onnx": path.name, "files": _graph_files(path), "source_key": key,
            "pass": PASS_VERSION, "fp32_nodes": summary["fp32_nodes"],
            "parity": {"onnxruntime": parity.to_json()}}


def _graph_files(graph: Path) -> dict:
    """Hash and size of a graph file and of its external-data files (``<graph name>.*``)."""
    names = sorted(p.name for p in graph.parent.iterdir()
                   if p.name == graph.name or p.name.startswith(f"{graph.name}."))
    return {f: {"sha256": sha256_file(graph.parent / f), "bytes": (graph.parent / f).stat().st_size}
            for f in names}


def _reuse_files(files: dict, tmp: Path, old_dir: str) -> bool:
    """Link the previous run's files into ``tmp`` if they are all intact."""
    for name, meta in files.items():
        src = Path(old_dir) / name
        if not src.is_file() or src.stat().st_size != meta["bytes"] \
                or sha256_file(src) != meta["sha256"]:
            return False
    for name in files:
        link_file(Path(old_dir) / name, tmp / name)
    return True


def link_file(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _write_extras(components: Components, conditioner: StageSpec, tmp: Path) -> dict:
    """The learned empty features (one per conditioner input) and the tokenizer vocabulary."""
    empty = (f[0].detach().float().numpy() for f in components.flow.empty_conditions(1))
    np.savez(tmp / EMPTY_FEATURES, **dict(zip(conditioner.input_names, empty, strict=True)))
    shutil.copyfile(VOCAB_FILE, tmp / VOCAB_FILE.name)
    return {role: {"file": name, "sha256": sha256_file(tmp / name),
                   "bytes": (tmp / name).stat().st_size}
            for role, name in (("empty_features", EMPTY_FEATURES), ("tokenizer", VOCAB_FILE.name))}


def _manifest(components: Components, g: Geometry, specs: dict[str, StageSpec], stages: dict,
              extras: dict, sources: dict, max_batch: int) -> dict:
    c = components.flow.config
    manifest = mf.new_manifest()
    manifest["model"] = {
        "preset": c.name, "separation": c.separation, "mode": c.mode,
        "sample_rate": c.sample_rate, "window_seconds": c.duration,
        "window_samples": c.lengths.audio_samples, "latent_shape": [c.latent_seq_len, c.latent_dim],
        "default_steps": DEFAULT_STEPS, "default_cfg": DEFAULT_CFG,
        "default_overlap_seconds": DEFAULT_OVERLAP, "max_batch": max_batch,
        "noise": NOISE_ORDER,
    }
    manifest["geometry"] = g.to_json()
    manifest["sources"] = sources
    manifest["stage_order"] = list(specs)
    manifest["stages"] = stages
    manifest["files"] = extras
    manifest["opset"] = OPSET
    return manifest


def _kept_engines(previous: dict | None, manifest: dict, tmp: Path) -> dict | None:
    """The previous export's TensorRT section, its files linked into ``tmp``, where no engine
    can be built now but every stage graph the engines were built from is unchanged and their
    files are intact (engines built on a GPU machine with --engines-only survive a re-export on
    a machine without TensorRT); else None."""
    old = (previous or {}).get("tensorrt") or {}
    if old.get("status") != "built" or _stage_keys(previous) != _stage_keys(manifest):
        return None
    records = engine_records(old)
    engines = {r["file"]: {"sha256": r["sha256"], "bytes": r["bytes"]} for r in records}
    graphs = {r["onnx"] for r in records if "onnx" in r} - {p.name for p in tmp.iterdir()}
    old_dir = Path(previous["_dir"])
    if not all((old_dir / graph).is_file() for graph in graphs) or \
            not _reuse_files(engines, tmp, previous["_dir"]):
        return None
    for graph in graphs:  # a graph made for the engines alone (bf16): no hash of its own
        link_file(old_dir / graph, tmp / graph)
    return {**old, "rebuilt": [], "kept": True}


def _stage_keys(manifest: dict) -> dict:
    return {n: s["key"] for n, s in manifest["stages"].items()}


def _same_payload(previous: dict, manifest: dict) -> bool:
    keys = ("model", "geometry", "sources", "stage_order", "files")
    return all(previous.get(k) == manifest.get(k) for k in keys) and \
        _stage_keys(previous) == _stage_keys(manifest) and \
        _reduced_keys(previous) == _reduced_keys(manifest) and \
        _engine_keys(previous) == _engine_keys(manifest)


def _reduced_keys(manifest: dict) -> dict:
    return {n: {p: (r["source_key"], r["pass"]) for p, r in s.get("reduced", {}).items()}
            for n, s in manifest["stages"].items()}


def _engine_keys(manifest: dict) -> tuple:
    section = manifest.get("tensorrt") or {}
    engines = section.get("engines", {})
    resize = {n: (section.get(n) or {}).get("key") for n in ENGINE_NAMES.values()}
    return section.get("status"), section.get("reason"), \
        {n: e["key"] for n, e in engines.items()}, resize


def _check_disk(out: Path, modules: dict, specs: dict, reduced_copies: int) -> None:
    # each weight once: stage modules share networks (CLIP's towers, the VAE), each graph keeps
    # only the weights it uses
    weights = {id(p): p.numel() for name in specs for p in modules[name].parameters()}
    needed = int(sum(weights.values()) * 4 * (1.2 + 0.6 * reduced_copies)) + (64 << 20)
    parent = out.parent if out.parent.exists() else Path.cwd()
    free = shutil.disk_usage(parent).free
    if free < needed:
        raise UsageError(f"{parent}: insufficient disk space for the export: about "
                         f"{needed / 2**20:,.0f} MiB needed, {free / 2**20:,.0f} MiB free")


def swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the complete ``tmp`` to ``out`` and delete the previous ``out``
    (``atomic.replace_directory``). A run that loaded the previous directory keeps what it
    loaded (runtime/model_dir.py says what it does next)."""
    fsync_directory(tmp)  # a crash after the swap cannot leave a directory of truncated files
    replace_directory(tmp, out)
