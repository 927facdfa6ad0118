"""mmsep-serve's command line: start (or join) Ray, run the service until Ctrl-C or SIGTERM.

Exit codes: 0 stopped by a signal, 2 bad usage (unusable model, missing ray extra), 1 internal
failure.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import sys
import threading
from pathlib import Path

import click

from mmsep.console import FiniteRange, console_main, terminate_as_interrupt
from mmsep.exit_codes import EXIT_OK
from mmsep.runtime.atomic import check_writable
from mmsep.runtime.backend_options import backend_options
from mmsep.runtime.errors import InputError
from mmsep.runtime.model_dir import ModelDir
from mmsep.runtime.paths import check_directory_path

from .cluster import actors_that_fit, describe, init_ray

PROG = "mmsep-serve"
APP = "mmsep"  # the Ray Serve application's name


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "model_dir", type=click.Path(path_type=Path), required=True,
              help="Model directory written by mmsep-export.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True,
              help="Port to listen on.")
@backend_options("replica")
@click.option("--batch-wait-ms", type=FiniteRange(0, 10000), default=20.0,
              show_default=True, help="How long a request waits for others to share its batch.")
@click.option("--max-upload-mb", type=FiniteRange(0.001), default=100.0, show_default=True,
              help="Largest request body; larger ones get 413.")
@click.option("--max-seconds", type=FiniteRange(0.1), default=600.0, show_default=True,
              help="Longest media (or generated duration); longer gets 413.")
@click.option("--max-queue", type=click.IntRange(1), default=64, show_default=True,
              help="Requests a replica holds at once (read, waiting or running); more get 503.")
@click.option("--replicas", type=click.IntRange(1), default=1, show_default=True,
              help="Replicas (each one Separator), unless --max-replicas asks for autoscaling.")
@click.option("--min-replicas", type=click.IntRange(0), default=1, show_default=True,
              help="Autoscaling: fewest replicas.")
@click.option("--max-replicas", type=click.IntRange(1),
              help="Autoscaling: most replicas (turns Ray Serve's autoscaling on).")
@click.option("--target-ongoing-requests", type=FiniteRange(0.1), default=8.0,
              show_default=True, help="Autoscaling: requests per replica to aim for.")
@click.option("--cpus-per-replica", type=FiniteRange(0.01), default=1.0, show_default=True,
              help="CPUs Ray reserves for each replica.")
@click.option("--gpus-per-replica", type=FiniteRange(0),
              help="GPUs per replica (default: 1 where the cluster has GPUs, else 0).")
@click.option("--ray-address", help="Ray cluster to join ('auto': the one `ray start` made); "
                                    "default: start a local instance.")
@click.option("--work-dir", type=click.Path(path_type=Path, file_okay=False),
              help="Folder for uploads while a request runs (default: the system's temporary "
                   "folder); each request's files are removed when it is answered.")
def cli(model_dir, host, port, backend_options, batch_wait_ms, max_upload_mb,
        max_seconds, max_queue, replicas, min_replicas, max_replicas, target_ongoing_requests,
        cpus_per_replica, gpus_per_replica, ray_address, work_dir):
    """Serve separation over HTTP: POST /v1/separate (multipart form: mix and/or video files,
    text (repeatable), negative_text, seed, steps, cfg, generate, duration), GET /v1/model,
    GET /healthz. Concurrent requests share the model's batches."""
    _check_before_ray(model_dir, host, port, work_dir)
    if max_replicas is not None and max_replicas < min_replicas:
        raise InputError("--max-replicas must be at least --min-replicas")
    try:
        import ray
        from ray import serve

        from .serve import build_app
        from .service import Limits
    except ImportError as exc:
        raise InputError(f"mmsep-serve needs the ray extra (pip install 'mmsep[ray]'): "
                         f"{exc}") from None

    stack = contextlib.ExitStack()
    init_ray(ray, ray_address, include_dashboard=False, configure_logging=False)
    try:
        stack.enter_context(terminate_as_interrupt())  # ray.init installed its own handler
        cluster = ray.cluster_resources()
        if gpus_per_replica is None:
            gpus_per_replica = 1.0 if cluster.get("GPU", 0) >= 1 else 0.0
        _check_fits(cluster, cpus_per_replica, gpus_per_replica,
                    min_replicas if max_replicas is not None else replicas)
        autoscaling = None
        if max_replicas is not None:
            autoscaling = {"min_replicas": min_replicas, "max_replicas": max_replicas,
                           "target_ongoing_requests": target_ongoing_requests}
        limits = Limits(round(max_upload_mb * 2 ** 20), max_seconds, max_queue)
        application = build_app(model_dir, backend_options=backend_options,
                                batch_wait_ms=batch_wait_ms,
                                limits=limits, work_dir=str(work_dir) if work_dir else None,
                                replicas=replicas, autoscaling=autoscaling,
                                cpus_per_replica=cpus_per_replica,
                                gpus_per_replica=gpus_per_replica)
        _deploy(serve, application, host, port)
        click.echo(f"{PROG}: listening on http://{host}:{port} (POST /v1/separate); Ctrl-C or "
                   "SIGTERM stops it", err=True)
        stack.close()  # from here on a signal ends the wait below
        _wait_for_signal()
        click.echo(f"{PROG}: stopping; requests already running may finish (Ctrl-C again "
                   "stops at once)", err=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        serve.delete(APP)  # drains the replicas while the proxies still answer
        if not serve.status().applications:  # others deployed meanwhile keep their Serve
            serve.shutdown()
    finally:
        stack.close()
        ray.shutdown()


def _check_before_ray(model_dir, host: str, port: int, work_dir: Path | None) -> None:
    """What can be refused in one line before Ray starts: the model directory (its manifest and
    files; the replicas check the hashes), the address, the uploads' folder."""
    ModelDir(model_dir, verify=False)
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port,
                                                         type=socket.SOCK_STREAM)[0][:5]
        with socket.socket(family, kind) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as exc:  # socket.gaierror included
        raise InputError(f"--host {host} --port {port}: cannot listen there "
                         f"({exc.strerror or exc})") from None
    if work_dir is not None:
        check_directory_path(work_dir, "--work-dir")
        try:
            work_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"--work-dir {work_dir}: cannot create it "
                             f"({exc.strerror or exc})") from None
        check_writable(work_dir / "upload", label=f"--work-dir {work_dir}")


def _check_fits(cluster: dict, cpus: float, gpus: float, replicas: int) -> None:
    """Replicas that ask for more than the cluster has would wait for ever (and the service
    would never start listening)."""
    room = actors_that_fit(cluster, cpus, gpus)
    if room < replicas:
        raise InputError(f"{replicas} replica(s) of --cpus-per-replica {cpus:g} and "
                         f"--gpus-per-replica {gpus:g}: the Ray cluster has {describe(cluster)} "
                         f"in all, room for {room}")


def _deploy(serve, application, host: str, port: int) -> None:
    """Start Ray Serve on ``host``:``port`` and run the application; one line for what stops
    it: a Serve that another program started (its HTTP address is fixed, and stopping would
    shut it down), replicas that do not start."""
    running = serve.status()
    if running.applications or running.proxies:
        names = ", ".join(running.applications) or "none"
        raise InputError(f"Ray Serve already runs on this Ray cluster (applications: {names}) "
                         "with its own HTTP address; mmsep-serve starts Serve on --host and "
                         "--port and shuts it down when it stops: give a cluster where Serve "
                         "is not running")
    serve.start(http_options={"host": host, "port": port})
    try:
        serve.run(application, name=APP, route_prefix="/")
    except Exception as exc:  # noqa: BLE001 - replaced by the replica's reason, if one
        raise _replica_failure(serve) or exc from None


def _replica_failure(serve) -> Exception | None:
    """What stopped the replicas from starting (a model that fails its hash check, a backend
    this machine lacks), from the deployment's status; None when it says nothing of it."""
    from .serve import replica_start_error

    try:
        deployments = serve.status().applications[APP].deployments.values()
    except Exception:  # noqa: BLE001 - no status to read: the original error stands
        return None
    return replica_start_error("\n".join(d.message or "" for d in deployments))


def _wait_for_signal() -> None:
    """Until Ctrl-C, SIGTERM or SIGHUP (the terminal closed; unless ignored, as under nohup):
    each lets running requests finish."""
    stop = threading.Event()
    hangup = getattr(signal, "SIGHUP", None)
    for sig in (signal.SIGINT, signal.SIGTERM, hangup):
        if sig is not None and signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass


def main(argv=None) -> None:
    """Console entry point: one-line errors, exit codes 0/1/2, never a traceback."""
    console_main(cli, PROG, sys.argv[1:] if argv is None else list(argv), interrupted=None,
                 interrupted_code=EXIT_OK)

if __name__ == "__main__":
    main()
