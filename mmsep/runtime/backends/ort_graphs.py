"""CUDA graphs of the denoiser loop on ONNX Runtime CUDA (``OrtBackend.sample``).

ONNX Runtime captures one session run as a CUDA graph (provider option ``enable_cuda_graph``) and
replays it on later runs when every node of the session runs on the CUDA provider and every run
binds the same device buffers at the same shapes. A free batch axis keeps shape arithmetic on the
CPU, which rules capture out, so each batch size gets its own session with its batch axes fixed
(``add_free_dimension_override_by_name``) and its own device buffers, bound once. Two graphs
(``gpu_graph_id`` 1 and 2) swap the roles of two x buffers, so a step reads what the previous
step wrote without a copy; per step the host writes only ``t``, per request x0 and the
step-invariant inputs. ORT runs each graph id uncaptured twice (to allocate what the capture then
reuses) and captures it on its third run, so the first steps of the first request at a batch size
run uncaptured, with the same results. Captures are kept per calling thread by ORT.

ORT captures in CUDA's global mode, in which a synchronous CUDA call from another thread (the
next window's frames uploaded for resizing, say) invalidates the capture: every device run of the
backend holds the backend's ``lock``. A batch size's session holds its own copy of the denoiser's
weights and takes seconds to load, so the first ``SESSIONS`` batch sizes used get one and keep it
(a service whose batch sizes vary would otherwise load sessions over and over); other batch sizes
run the plain loop. On the CPU the same pinned, bound loop runs without capture (how its buffer
logic is tested without a GPU).
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from ...closing import Closing
from ...stages import StageSpec, Tensor, euler_schedule
from ..errors import ModelDirError, one_line

SESSIONS = 2  # pinned batch sizes: a job's steady batch and its last, smaller one


def batch_dims(spec: StageSpec, batch: int) -> dict[str, int]:
    """Each symbolic leading axis of ``spec`` ("batch", "2*batch") and its size at ``batch``."""
    return {t.shape[0]: t.concrete(batch)[0] for t in (*spec.inputs, *spec.outputs)
            if isinstance(t.shape[0], str)}


class PinnedDenoiser(Closing):
    """The denoiser at one batch size: a session with fixed batch axes, its inputs bound to
    device buffers once, two bindings that alternate the x buffers, one graph id each."""

    def __init__(self, ort, path: Path, spec: StageSpec, batch: int, *, options,
                 providers: list, device: str, device_id: int, capture: bool):
        for name, size in batch_dims(spec, batch).items():
            options.add_free_dimension_override_by_name(name, size)
        self.batch = batch
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        if device == "cuda" and self.session.get_providers()[0] != "CUDAExecutionProvider":
            raise RuntimeError(f"the CUDA provider did not start ({self.session.get_providers()})")

        def buffer(name: str):
            tensor = spec.tensor(name)
            return ort.OrtValue.ortvalue_from_shape_and_type(
                tensor.concrete(batch), np.dtype(tensor.dtype), device, device_id)

        self.inputs = {name: buffer(name) for name in spec.input_names}
        self._x = (self.inputs[Tensor.X], buffer(Tensor.X_NEXT))
        self._bindings = [self._bind(parity) for parity in (0, 1)]
        self._run_options = [self._graph_options(ort, parity + 1) if capture else None
                             for parity in (0, 1)]

    def _bind(self, parity: int):
        binding = self.session.io_binding()
        for name, value in self.inputs.items():
            binding.bind_ortvalue_input(name, self._x[parity] if name == Tensor.X else value)
        binding.bind_ortvalue_output(Tensor.X_NEXT, self._x[1 - parity])
        return binding

    @staticmethod
    def _graph_options(ort, graph_id: int):
        options = ort.RunOptions()
        options.add_run_config_entry("gpu_graph_id", str(graph_id))  # 0 is ORT's own; -1 skips
        return options

    def sample(self, x0: np.ndarray, fixed: Mapping[str, np.ndarray], times: Sequence[float],
               step: float, cfg: float, lock: threading.Lock) -> np.ndarray:
        """Every step from ``x0``; returns the final x as a host array (the buffers are reused
        by the next request)."""
        per_item = {Tensor.DT: step, Tensor.CFG: cfg}
        with lock:
            for name, value in fixed.items():
                self.inputs[name].update_inplace(np.ascontiguousarray(value, np.float32))
            for name, value in per_item.items():
                self.inputs[name].update_inplace(np.full(self.batch, value, np.float32))
            self._x[0].update_inplace(np.ascontiguousarray(x0, np.float32))
        for k, t in enumerate(times):
            with lock:
                self.inputs[Tensor.T].update_inplace(np.full(self.batch, t, np.float32))
                self.session.run_with_iobinding(self._bindings[k % 2], self._run_options[k % 2])
        return np.array(self._x[len(times) % 2].numpy(), copy=True)

    def close(self) -> None:
        self._bindings.clear()
        self.inputs.clear()
        self.session = None


class DenoiserGraphs(Closing):
    """Pinned denoiser sessions by batch size; ``sample`` returns None where the plain loop
    runs instead (graphs off, or a batch size beyond the first ``SESSIONS``)."""

    def __init__(self, ort, path: Path, spec: StageSpec, *, options: Callable[[], object],
                 providers: list, device: str, device_id: int, lock: threading.Lock,
                 check_unchanged: Callable[[], None]):
        self._ort, self._path, self._spec = ort, path, spec
        self._check_unchanged = check_unchanged  # ModelDir's: graphs only from the checked dir
        self._options, self._providers = options, providers
        self._device, self._device_id, self._lock = device, device_id, lock
        self._capture = device == "cuda"
        self._pinned: dict[int, PinnedDenoiser] = {}
        self.enabled = True

    def sample(self, x0: np.ndarray, fixed: Mapping[str, np.ndarray], steps: int,
               cfg: float) -> np.ndarray | None:
        """The final latent of the loop, or None when graphs are (now) off: a failure to create
        or capture turns them off with a warning, and the caller runs the steps one by one."""
        if not self.enabled or (x0.shape[0] not in self._pinned and
                                len(self._pinned) >= SESSIONS):
            return None
        times, step = euler_schedule(steps)
        try:
            return self._session(x0.shape[0]).sample(x0, fixed, times, step, cfg, self._lock)
        except ModelDirError:
            raise
        except Exception as exc:  # noqa: BLE001 - ORT's own types; the plain loop reruns it
            warnings.warn(f"CUDA graphs of the denoiser loop are off for this backend "
                          f"({one_line(exc, 300)}); running the steps one by one",
                          RuntimeWarning, stacklevel=3)
            self.enabled = False
            self.close()
            return None

    def _session(self, batch: int) -> PinnedDenoiser:
        pinned = self._pinned.get(batch)
        if pinned is None:
            providers = self._providers
            if self._capture:
                name, options = providers[0]
                providers = [(name, {**options, "enable_cuda_graph": "1"}), *providers[1:]]
            self._check_unchanged()
            with self._lock:  # creating a session allocates device memory
                pinned = PinnedDenoiser(self._ort, self._path, self._spec, batch,
                                        options=self._options(), providers=providers,
                                        device=self._device, device_id=self._device_id,
                                        capture=self._capture)
            self._check_unchanged()
            self._pinned[batch] = pinned
        return pinned

    def close(self) -> None:
        for pinned in self._pinned.values():
            pinned.close()
        self._pinned.clear()
