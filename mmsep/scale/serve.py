"""mmsep-serve: separation over HTTP on Ray Serve, concurrent requests batched together.

Each replica holds one Separator. Requests that arrive within ``--batch-wait-ms`` of each other
(up to the model's max batch of them) go to ``Separator.process_many`` together, so the
(window, text) items of different requests share denoiser batches. The answer's
``X-Mmsep-Batch-Requests`` header says how many requests its batch held.
"""

# no ``from __future__ import annotations``: FastAPI reads the route annotations at run time
import asyncio
import re
import time
from pathlib import Path

from fastapi import FastAPI, Request  # the ray extra
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from ray import serve

from mmsep.runtime import InputError, Separator
from mmsep.runtime.backend_options import BackendOptions
from mmsep.runtime.errors import one_line

from .service import (HttpError, Limits, Upload, answer_body, check_form_complete,
                      check_form_request, model_facts, receive_body, remove_stale_uploads,
                      request_options)

app = FastAPI(title="mmsep")
DRAIN_SECONDS = 120.0  # on SIGTERM, how long requests already running may take to finish


def _error(status: int, message: str):
    return JSONResponse({"error": " ".join(message.split())}, status_code=status)


async def _form(request, body: Path):
    """Parse the received (size-checked) body, the file ``body``, as a form, a block at a
    time."""
    from starlette.requests import Request as StarletteRequest

    with open(body, "rb") as f:
        async def replay():
            if f.closed:
                return {"type": "http.disconnect"}
            block = f.read(1 << 20)
            if not block:
                f.close()
            return {"type": "http.request", "body": block, "more_body": bool(block)}

        try:
            return await StarletteRequest(request.scope, replay).form(max_files=4, max_fields=64)
        except Exception as exc:  # noqa: BLE001 - a malformed form is bad input
            raise InputError(f"not a multipart form ({type(exc).__name__}: {exc})") from None


class ReplicaStartError(RuntimeError):
    """Why a replica's Separator did not load. Ray Serve reports a replica's failed constructor
    only as a traceback in the deployment's status; ``replica_start_error`` finds this line in
    it again for the command's one-line error and exit code."""

    def __init__(self, exc: Exception):
        kind = "input" if isinstance(exc, InputError) else "internal"
        detail = one_line(exc) if kind == "input" else f"{type(exc).__name__}: {one_line(exc)}"
        super().__init__(f"{kind}: {detail}")


_REPLICA_START_ERROR = re.compile(rf"{ReplicaStartError.__name__}: (input|internal): (.*)")


def replica_start_error(status_message: str) -> Exception | None:
    """The exception a replica's ``ReplicaStartError`` in ``status_message`` stands for: an
    InputError (bad model, backend unavailable) or a RuntimeError; None when there is none."""
    found = _REPLICA_START_ERROR.findall(status_message or "")
    if not found:
        return None
    kind, detail = found[-1]
    return InputError(detail) if kind == "input" else RuntimeError(
        f"a replica did not start: {detail}")


# (the helpers above are defined before the class: serve.ingress captures it when decorating)


@serve.deployment
@serve.ingress(app)
class SeparationService:
    """One replica: one Separator, requests batched by ``run_batch``."""

    def __init__(self, model_dir: str, backend_options: BackendOptions, batch_wait_ms: float,
                 limits: Limits, work_dir: str | None):
        try:
            self.separator = Separator(model_dir, **backend_options.separator_kwargs())
        except Exception as exc:  # noqa: BLE001 - to the command, through the status
            raise ReplicaStartError(exc) from None
        self.facts = {**model_facts(model_dir), "backend": self.separator.backend_name,
                      "precision": self.separator.backend.precision}
        self.limits, self.work_dir = limits, work_dir
        remove_stale_uploads(work_dir)
        self.held = 0  # requests in this replica: being read, waiting or running
        self.run_batch.set_max_batch_size(self.separator.max_batch)
        self.run_batch.set_batch_wait_timeout_s(batch_wait_ms / 1000)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.01)
    async def run_batch(self, requests: list[dict]) -> list[tuple]:
        started = time.perf_counter()
        results = await asyncio.to_thread(self.separator.process_many, requests)
        seconds = time.perf_counter() - started
        return [(result, len(requests), seconds) for result in results]

    @app.get("/healthz")
    async def healthz(self):
        return PlainTextResponse("ok")

    @app.get("/v1/model")
    async def model(self):
        return JSONResponse(self.facts)

    @app.post("/v1/separate")
    async def separate(self, request: Request):
        if self.held >= self.limits.max_queue:
            return _error(503, f"overloaded: {self.held} requests are waiting; retry later")
        started = time.perf_counter()
        upload = None
        self.held += 1
        try:
            check_form_request(request.headers.get("content-type"), request.url.query)
            upload = Upload(self.work_dir)
            with upload:
                body = upload.dir / "body"
                await receive_body(request, body, self.limits.max_upload_bytes)
                check_form_complete(request.headers.get("content-type"), body)
                form = await _form(request, body)
                body.unlink()  # parsed: its parts are the form's files now
                try:
                    options = await request_options(form, upload, self.limits,
                                                    self.facts["window_seconds"])
                finally:
                    await form.close()
                result, batch, batch_seconds = await self.run_batch(options)
            if isinstance(result, BaseException):
                raise result
            content, media_type = await asyncio.to_thread(  # encoding: off the event loop
                answer_body, result, isinstance(options.get("text"), list))
        except HttpError as exc:
            return _error(exc.status, upload.public(str(exc)) if upload else str(exc))
        except InputError as exc:
            return _error(400, upload.public(str(exc)) if upload else str(exc))
        except Exception as exc:  # noqa: BLE001 - one line, never a traceback
            return _error(500, f"internal error: {type(exc).__name__}: {exc}")
        finally:
            self.held -= 1
        return Response(content, media_type=media_type, headers={
            "X-Mmsep-Batch-Requests": str(batch),
            "X-Mmsep-Batch-Seconds": f"{batch_seconds:.4f}",
            "X-Mmsep-Total-Seconds": f"{time.perf_counter() - started:.4f}",
            "X-Mmsep-Audio-Seconds": f"{result.duration:.4f}"})


def build_app(model_dir, *, backend_options: BackendOptions = BackendOptions(),
              batch_wait_ms: float = 20.0, limits: Limits, work_dir: str | None = None,
              replicas: int = 1, autoscaling: dict | None = None, cpus_per_replica: float = 1.0,
              gpus_per_replica: float = 0.0):
    """The Ray Serve application (not yet running)."""
    scaling = {"autoscaling_config": autoscaling} if autoscaling else {"num_replicas": replicas}
    deployment = SeparationService.options(
        max_ongoing_requests=limits.max_queue + 1,
        graceful_shutdown_timeout_s=DRAIN_SECONDS,
        ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica},
        **scaling)
    return deployment.bind(str(Path(model_dir).resolve()), backend_options, batch_wait_ms,
                           limits, work_dir)
