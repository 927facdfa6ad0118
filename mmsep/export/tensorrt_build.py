"""TensorRT engines for the stage graphs: strongly typed builds, profiles, timing cache (the
engine-vs-PyTorch check is tensorrt_parity.py).

Targets TensorRT 10.x and 11.x with one code path. TensorRT 11 removed weak typing (the FP16/BF16
builder flags and per-layer precision constraints): every network is strongly typed and takes its
precision from the ONNX graph, which mmsep.export.mixed_precision writes. TensorRT 10 builds the
same way when the network is created with NetworkDefinitionCreationFlag.STRONGLY_TYPED (set when
the flag exists; 11.x accepts and ignores it). Only APIs present in both are used: the name-based
I/O tensor API, set_memory_pool_limit, ITimingCache, build_serialized_network, execute_async_v3.

Engines are specific to the TensorRT version, the GPU model and its compute capability:
engine_info() records all three for the manifest, and they are part of every engine's key.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from ..runtime.atomic import write_bytes_atomically
from ..stages import StageSpec
from .errors import ExportError
from ..model_files import sha256_file
from .mixed_precision import PASS_VERSION, PRECISIONS, convert_graph

MIN_TENSORRT = (10, 0)  # strongly typed networks + the name-based tensor API
FP32_ENGINE_TOLERANCE = 1e-3  # fp32 engines (TF32 off) against PyTorch fp32 on the GPU
Progress = Callable[[str], None]


class EngineBuildError(ExportError):
    """TensorRT refused a graph, a setting or a build; the message names the stage."""


# ---- availability ----------------------------------------------------------------------------

def _tensorrt():
    import tensorrt  # noqa: PLC0415 - optional dependency

    return tensorrt


def unavailable_reason() -> str | None:
    """Why engines cannot be built here (None when TensorRT and a CUDA GPU are usable)."""
    try:
        trt = _tensorrt()
    except ImportError as exc:
        return f"TensorRT is not installed (import tensorrt failed: {exc})"
    except Exception as exc:  # a broken install raises OSError/RuntimeError from its libraries
        return f"TensorRT cannot be loaded: {type(exc).__name__}: {exc}"
    version = _version_tuple(getattr(trt, "__version__", "0"))
    if version < MIN_TENSORRT:
        return (f"TensorRT {trt.__version__} is too old: strongly typed builds need "
                f"{'.'.join(map(str, MIN_TENSORRT))} or newer")
    try:
        import torch
    except ImportError:
        return ("PyTorch is not installed (the engine parity check runs the stage modules on "
                "the GPU)")
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    return None


def engine_info() -> dict:
    """TensorRT version, GPU name and compute capability (engines are specific to all three)."""
    import torch

    trt = _tensorrt()
    device = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(device)
    return {"version": trt.__version__, "gpu": torch.cuda.get_device_name(device),
            "compute_capability": f"{major}.{minor}", "cuda": torch.version.cuda}


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


# ---- building --------------------------------------------------------------------------------

def _logger(trt, stage: str):
    """A TensorRT logger that keeps the errors, so the exceptions can quote them."""

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(str(msg))
            elif os.environ.get("MMSEP_TRT_VERBOSE"):
                print(f"[TensorRT] {stage}: {msg}")

    return Logger()


def _checker(logger, stage: str):
    """need(value, what): value, or EngineBuildError when TensorRT returned None/False."""

    def need(value, what: str):
        if value is None or value is False:
            detail = f": {'; '.join(logger.errors[-3:])}" if logger.errors else ""
            raise EngineBuildError(f"stage {stage}: TensorRT could not {what}{detail}")
        return value

    return need


def _network_flags(trt) -> int:
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)  # absent: strongly typed is the only mode


def build_engine(onnx_path: Path, spec: StageSpec, engine_path: Path, *, timing_cache: Path,
                 workspace_bytes: int | None = None) -> dict:
    """The engine of a stage graph: one optimisation profile covers spec.min/opt/max_batch for
    every input (``build_graph_engine``)."""
    profile = {tensor.name: tuple(tensor.concrete(b) for b in (spec.min_batch, spec.opt_batch,
                                                                 spec.max_batch))
               for tensor in spec.inputs}
    return build_graph_engine(onnx_path, spec.name, profile, list(spec.output_names),
                              engine_path, timing_cache=timing_cache,
                              workspace_bytes=workspace_bytes)


def build_graph_engine(onnx_path: Path, name: str, profile: dict, outputs: list[str],
                       engine_path: Path, *, timing_cache: Path,
                       workspace_bytes: int | None = None) -> dict:
    """Parse ``onnx_path`` into a strongly typed network and build ``engine_path`` from it.

    ``profile`` gives (min, opt, max) shapes per input, in the graph's input order, and
    ``outputs`` the graph's outputs; the persistent timing cache at ``timing_cache`` is loaded
    (when present and readable) and saved back. The engine is written atomically. Every
    refusal by TensorRT raises EngineBuildError naming ``name``. Returns the engine's record
    for the manifest (without parity).
    """
    trt = _tensorrt()
    onnx_path, engine_path, timing_cache = Path(onnx_path), Path(engine_path), Path(timing_cache)
    logger = _logger(trt, name)
    need = _checker(logger, name)
    builder = need(trt.Builder(logger), "create a builder")
    network = need(builder.create_network(_network_flags(trt)), "create a network")
    parser = need(trt.OnnxParser(network, logger), "create an ONNX parser")
    if not parser.parse_from_file(str(onnx_path)):  # resolves external data next to the file
        errors = [_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError(f"stage {name}: TensorRT's ONNX parser rejected {onnx_path.name} "
                               f"({len(errors)} error(s)): " + " | ".join(errors or logger.errors))
    _check_network_io(network, name, list(profile), outputs)

    config = need(builder.create_builder_config(), "create a builder config")
    if workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if _graph_precision(onnx_path) == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # an fp32 engine is the accuracy reference
    optimisation = need(builder.create_optimization_profile(), "create an optimisation profile")
    shapes = {}
    for tensor, (low, opt, high) in profile.items():
        try:
            optimisation.set_shape(tensor, low, opt, high)
        except (RuntimeError, TypeError) as exc:  # its binding raises instead of returning
            raise EngineBuildError(f"stage {name}: TensorRT refused the shapes {list(low)} / "
                                   f"{list(opt)} / {list(high)} of input {tensor!r} ({exc})") \
                from None
        shapes[tensor] = [list(low), list(opt), list(high)]
    if config.add_optimization_profile(optimisation) < 0:
        need(False, f"accept the optimisation profile {shapes}")
    cache_state = _attach_timing_cache(config, timing_cache, need)
    if cache_state.startswith("replaced"):
        logger.errors.clear()  # what TensorRT logged about the old cache is not a build failure

    started = time.perf_counter()
    serialized = need(builder.build_serialized_network(network, config), "build the engine")
    build_seconds = time.perf_counter() - started
    _save_timing_cache(config, timing_cache, need)
    write_bytes_atomically(engine_path, memoryview(serialized))
    return {"file": engine_path.name, "sha256": sha256_file(engine_path),
            "bytes": engine_path.stat().st_size, "build_seconds": round(build_seconds, 2),
            "profile": shapes, "timing_cache": cache_state}


def _parser_error(error) -> str:
    where = f"node {error.node()}"
    for attr in ("node_name", "node_operator"):
        getter = getattr(error, attr, None)
        if getter is not None and getter():
            where += f" {getter()!r}" if attr == "node_name" else f" ({getter()})"
    return f"{where}: {error.desc()}"


def _check_network_io(network, name: str, inputs: list[str], outputs: list[str]) -> None:
    got_inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    got_outputs = [network.get_output(i).name for i in range(network.num_outputs)]
    if got_inputs != inputs or got_outputs != outputs:
        raise EngineBuildError(f"stage {name}: the parsed network's inputs {got_inputs} / "
                               f"outputs {got_outputs} differ from the contract {inputs} / "
                               f"{outputs}")


def _graph_precision(path: Path) -> str:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((p.value for p in model.metadata_props if p.key == "mmsep.precision"), "fp32")


def _attach_timing_cache(config, path: Path, need) -> str:
    blob = b""
    state = "new"
    if path.is_file():
        blob, state = path.read_bytes(), "loaded"
    try:  # a corrupt blob may give None or raise, depending on the TensorRT version
        cache, problem = config.create_timing_cache(blob), "TensorRT returned no cache"
    except Exception as exc:  # noqa: BLE001 - any failure to read it means a fresh cache
        cache, problem = None, f"{type(exc).__name__}: {exc}"
    if cache is None and blob:
        warnings.warn(f"timing cache {path} is unreadable ({problem}); starting a fresh one",
                      RuntimeWarning, stacklevel=3)
        cache, state = config.create_timing_cache(b""), "replaced (unreadable)"
    need(cache, "create a timing cache")
    if not config.set_timing_cache(cache, False):
        cache = need(config.create_timing_cache(b""), "create a timing cache")
        need(config.set_timing_cache(cache, False), "attach the timing cache")
        state = "replaced (did not match this GPU / TensorRT)"
    return state


def _save_timing_cache(config, path: Path, need) -> None:
    cache = need(config.get_timing_cache(), "return the timing cache")
    data = need(cache.serialize(), "serialise the timing cache")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomically(path, memoryview(data))


# ---- a whole model directory -----------------------------------------------------------------

def default_timing_cache(info: dict) -> Path:
    """A per-user timing cache per TensorRT version and GPU model (outlives model directories)."""
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mmsep"
    gpu = "".join(ch if ch.isalnum() else "-" for ch in info["gpu"]).strip("-")
    return base / f"tensorrt-{info['version']}-{gpu}-sm{info['compute_capability']}.timing"


def machine_key(content: dict, info: dict) -> str:
    """Content address of an engine built from ``content`` on the machine ``info`` describes
    (TensorRT version, GPU, compute capability)."""
    payload = {**content, "tensorrt": info["version"], "gpu": info["gpu"],
               "compute_capability": info["compute_capability"]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def engine_key(stage_record: dict, precision: str, info: dict) -> str:
    """Content address of one engine: the fp32 graph's key, precision pass, TensorRT, GPU."""
    return machine_key({"graph": stage_record["key"], "precision": precision,
                        "mixed_precision_pass": PASS_VERSION}, info)


def build_engines(model_dir: Path, manifest: dict, modules: dict, *, precision: str = "fp16",
                  timing_cache: Path | None = None, progress: Progress | None = None,
                  previous: dict | None = None, workspace_bytes: int | None = None) -> dict:
    """Build and check one engine per stage of ``manifest`` in ``model_dir``, and the
    frame-resize engines (tensorrt_resize.py).

    ``precision`` "fp16"/"bf16" builds from ``<stage>.<precision>.onnx`` (written here with
    convert_graph when absent), "fp32" from ``<stage>.onnx``. ``previous`` (a previous manifest
    with its directory under "_dir") lets unchanged engines be reused. Returns the manifest's
    "tensorrt" section: {"status": "built", ...} or {"status": "skipped", "reason": ...}.
    """
    from .tensorrt_parity import check_engine  # they import this module
    from .tensorrt_resize import build_frame_resize_engines

    if precision not in (*PRECISIONS, "fp32"):
        raise ValueError(f"unknown precision {precision!r}; expected fp16, bf16 or fp32")
    reason = unavailable_reason()
    if reason is not None:
        return {"status": "skipped", "reason": reason}
    log = progress or (lambda message: None)
    model_dir = Path(model_dir)
    info = engine_info()
    timing_cache = Path(timing_cache) if timing_cache else default_timing_cache(info)
    old = (previous or {}).get("tensorrt", {})
    old_engines = old.get("engines", {}) if old.get("status") == "built" else {}
    engines, rebuilt = {}, []
    for name in manifest["stage_order"]:
        record = manifest["stages"][name]
        spec = StageSpec.from_json(record["spec"])
        key = engine_key(record, precision, info)
        engine_path = model_dir / f"{name}.{precision}.engine"
        reused = reuse_engine(old_engines.get(name), key, engine_path, previous)
        if reused is not None:
            engines[name] = reused
            log(f"{name}: engine unchanged, reused")
            continue
        graph = _graph_for(model_dir, name, spec, precision)
        log(f"{name}: building the {precision} TensorRT engine")
        built = build_engine(graph, spec, engine_path, timing_cache=timing_cache,
                             workspace_bytes=workspace_bytes)
        tolerance = FP32_ENGINE_TOLERANCE if precision == "fp32" else None
        parity = check_engine(modules[name], spec, engine_path, tolerance=tolerance)
        engines[name] = {**built, "key": key, "onnx": graph.name,
                         "parity": parity.to_json()}
        rebuilt.append(name)
        log(f"{name}: built in {built['build_seconds']:.1f} s, rel L2 {parity.worst:.1e}")
    resize, built = build_frame_resize_engines(model_dir, info, timing_cache=timing_cache,
                                               previous=previous,
                                               workspace_bytes=workspace_bytes)
    rebuilt += built
    for name, record in resize.items():
        log(f"{name}: " + (f"built, {record['parity']['max_grey_levels']:.1g} grey levels from "
                           "the host's resize" if name in built else "engine unchanged, reused"))
    return {"status": "built", "version": info["version"], "gpu": info["gpu"],
            "compute_capability": info["compute_capability"], "cuda": info["cuda"],
            "precision": precision, "strongly_typed": True, "timing_cache": str(timing_cache),
            "engines": engines, **resize, "rebuilt": rebuilt}


def _graph_for(model_dir: Path, name: str, spec: StageSpec, precision: str) -> Path:
    if precision == "fp32":
        return model_dir / f"{name}.onnx"
    graph = model_dir / f"{name}.{precision}.onnx"
    if not graph.is_file():
        convert_graph(model_dir / f"{name}.onnx", graph, spec, precision)
    return graph


def reuse_engine(old: dict | None, key: str, engine_path: Path,
                 previous: dict | None) -> dict | None:
    """``old``'s record, its file linked (or copied) to ``engine_path``, where the key is
    unchanged and the previous directory's file is intact; else None."""
    if not old or old.get("key") != key or not previous or "_dir" not in previous:
        return None
    src = Path(previous["_dir"]) / old["file"]
    if not src.is_file() or src.stat().st_size != old["bytes"] or sha256_file(src) != old["sha256"]:
        return None
    if src.resolve() != engine_path.resolve():
        try:
            os.link(src, engine_path)
        except OSError:
            import shutil

            shutil.copy2(src, engine_path)
    return {**old, "reused": True}
