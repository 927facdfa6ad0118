"""The Backend protocol: every backend class implements every member with the protocol's
signature (checked by inspection, no GPU needed), and the package has no import cycle."""

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from mmsep.runtime.backends import Backend, OrtBackend, TrtBackend

PACKAGE = Path(__file__).resolve().parents[3] / "mmsep" / "runtime" / "backends"
REPO = PACKAGE.parents[2]
MEMBERS = sorted({name for name in vars(Backend) if not name.startswith("_")}
                 | set(Backend.__annotations__) | {"__enter__", "__exit__"})


def test_the_protocol_states_what_the_runtime_uses():
    assert MEMBERS == ["__enter__", "__exit__", "close", "condition", "frame_resizer",
                       "max_batch", "name", "precision", "run", "sample", "to_host"]


def _parameters(function) -> list[tuple]:
    """(name, kind, default) of every parameter after ``self``."""
    return [(p.name, p.kind, p.default)
            for p in list(inspect.signature(function).parameters.values())[1:]]


@pytest.mark.parametrize("backend", [OrtBackend, TrtBackend], ids=lambda cls: cls.__name__)
@pytest.mark.parametrize("member", MEMBERS)
def test_each_backend_implements_the_member(backend, member):
    want = getattr(Backend, member, None)
    assert hasattr(backend, member), f"{backend.__name__} lacks {member}"
    got = getattr(backend, member)
    if member == "name":  # a string attribute: a class attribute or a property
        assert isinstance(got, (str, property))
    elif isinstance(want, property):
        assert isinstance(got, property), f"{backend.__name__}.{member} is not a property"
    else:
        assert callable(got)
        assert _parameters(got) == _parameters(want), \
            f"{backend.__name__}.{member}{inspect.signature(got)} differs from the protocol's " \
            f"{inspect.signature(want)}"


def test_backend_instances_are_backends(model_dir, gpu, trt_dir):
    """Both backends as created, TensorRT on the CPU stand-in: the protocol's runtime check, and
    the members the Separator reads at start."""
    from mmsep.runtime.backends import create_backend
    from mmsep.runtime.model_dir import ModelDir

    with create_backend(ModelDir(model_dir), "ort-cpu") as ort, \
            create_backend(ModelDir(trt_dir), "trt") as trt:
        assert isinstance(ort, Backend) and isinstance(trt, Backend)
        assert (ort.name, ort.max_batch, ort.precision) == ("ort-cpu", None, "fp32")
        assert (trt.name, trt.max_batch) == ("trt", trt.model.info.max_batch)
        assert trt.precision == trt.model.manifest["tensorrt"]["precision"]
        assert ort.frame_resizer(384, 224) is None  # on the CPU, PIL's resize is faster
        resizer = trt.frame_resizer(384, 224)  # the model's frame-resize engine
        assert resizer.takes_yuv and resizer.accepts(720, 1280)
        assert not resizer.accepts(2160, 3840)  # beyond the engine's profile: on the host


def _imported_backends(module: str) -> set[str]:
    """The package's modules that ``module`` imports anywhere in its source (also lazily,
    inside functions)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module} if node.module else {a.name for a in node.names}
    return found


def test_ort_and_tensorrt_import_the_protocol_never_each_other():
    assert _imported_backends("protocol") == set()
    assert "protocol" in _imported_backends("ort") and "tensorrt" not in _imported_backends("ort")
    assert "protocol" in _imported_backends("tensorrt")
    assert "ort" not in _imported_backends("tensorrt")
    assert {"ort", "tensorrt"} <= _imported_backends("factory")


@pytest.mark.parametrize("module,absent", [
    ("protocol", {"ort", "tensorrt", "factory"}),
    ("ort", {"tensorrt", "factory"}),
    ("tensorrt", {"ort", "factory"}),
    ("factory", {"tensorrt"}),  # TensorRT's module loads only when it is asked for or tried
])
def test_importing_a_module_loads_no_other_backend(module, absent):
    code = (f"import sys, mmsep.runtime.backends.{module}; print(' '.join(sorted(m.rsplit('.', 1)"
            "[1] for m in sys.modules if m.startswith('mmsep.runtime.backends.'))))")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout.split()
    assert module in loaded and not absent & set(loaded), loaded
