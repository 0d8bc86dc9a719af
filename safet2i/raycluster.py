"""Connecting to a Ray cluster, shared by ``safet2i audit --ray`` and ``safet2i bench --ray``
(``docs/scale.md``). Ray is an optional extra (``pip install 'safet2i[ray]'``); nothing here is
imported without ``--ray``."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from .errors import MissingDependencyError, SafeT2IError


def import_ray(what: str, data: bool = False):
    """``ray`` (and ``ray.data`` with ``data``), or a :class:`MissingDependencyError` naming
    ``what`` needs it and how to install it."""
    try:
        import ray  # noqa: PLC0415

        if data:
            import ray.data  # noqa: F401, PLC0415
    except ImportError as exc:
        raise MissingDependencyError(
            "ray[data]" if data else "ray", what,
            "Install it with: python -m pip install 'safet2i[ray]'  (or: 'ray[data]' pyarrow)") from exc
    return ray


def _is_loopback(host: str) -> bool:
    import ipaddress  # noqa: PLC0415

    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def ray_init(ray, address: str, workers: int | None = None) -> None:
    """Connect to the cluster at ``address``, or with ``"auto"`` start a private one on this
    machine whose every server listens on 127.0.0.1 only (fail closed: refused otherwise).

    Ray binds its servers (GCS, raylet, workers, agents) to the node's address, but ``ray.init``
    turns a ``_node_ip_address`` of 127.0.0.1 into this machine's routable address
    (``services.resolve_ip_for_localhost``), so the servers listened on every interface. Ray keeps
    a local node on loopback when ``ENABLE_RAY_CLUSTER`` is off (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``,
    its default on macOS/Windows): it is switched off for this ``ray.init`` only."""
    if address != "auto":
        ray.init(address=address, log_to_driver=False, configure_logging=False)
        return
    try:
        from ray._private import ray_constants  # noqa: PLC0415
    except ImportError:  # pragma: no cover - checked below
        ray_constants = None
    saved = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    if ray_constants is not None and saved is not None:
        ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False,
                 num_cpus=workers or None, log_to_driver=False, configure_logging=False)
    finally:
        if ray_constants is not None and saved is not None:
            ray_constants.ENABLE_RAY_CLUSTER = saved
    addrs = [n.get("NodeManagerAddress", "") for n in ray.nodes()]
    if not addrs or not all(_is_loopback(a) for a in addrs):
        ray.shutdown()
        raise SafeT2IError(f"--ray auto: the local Ray cluster did not stay on 127.0.0.1 (its node address: "
                           f"{', '.join(addrs) or 'none'}); refusing to run it listening on other interfaces. "
                           "Start a cluster yourself (ray start --head --node-ip-address=127.0.0.1) and pass "
                           "its address to --ray.")


@contextlib.contextmanager
def connected(what: str, address: str, workers: int | None = None, data: bool = False) -> Iterator:
    """``with connected("safet2i audit --ray", "auto") as ray:`` the Ray module, connected to the
    cluster (an existing connection of this process is used as it is); a cluster or connection
    started here is shut down on exit."""
    ray = import_ray(what, data)
    started = False
    if not ray.is_initialized():
        ray_init(ray, address, workers)
        started = True
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def default_workers(ray, workers: int | None) -> tuple[int, bool]:
    """``(workers, gpu)``: ``workers`` when given, else one per GPU of the cluster, else its
    CPUs less one (the driver's); ``gpu``: whether each worker takes a GPU."""
    res = ray.cluster_resources()
    gpus = int(res.get("GPU", 0))
    cpus = max(1, int(res.get("CPU", 1)))
    return (workers or (gpus if gpus else max(1, cpus - 1))), bool(gpus)


def actor_cpu_threads() -> None:
    """In a Ray actor: run onnxruntime (``SAFET2I_ORT_THREADS``) and torch on the CPUs Ray
    assigned to it (``num_cpus``), not on every core of the node, so that several actors of a
    node do not oversubscribe it. An explicit ``SAFET2I_ORT_THREADS`` is kept."""
    import ray  # noqa: PLC0415

    from .runtime import ENV_THREADS  # noqa: PLC0415

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    n = max(1, int(cpus or 1))
    os.environ.setdefault(ENV_THREADS, str(n))
    try:
        import torch  # noqa: PLC0415
    except ImportError:
        return
    torch.set_num_threads(n)


def error_cause(exc: BaseException) -> str:
    """A worker's own error message out of Ray's wrapper exception: its ``cause``, else the last
    non-empty line of Ray's text (where the worker's exception is named)."""
    cause = getattr(exc, "cause", None)
    if cause is not None and not isinstance(cause, type(exc)):
        return f"{type(cause).__name__}: {cause}"
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__


@contextlib.contextmanager
def quiet_ray_data() -> Iterator[None]:
    """Ray Data's own log lines (dataset started and finished; its traceback of a failure, which
    the caller reports as one line) off the terminal for the run; its log files keep them."""
    import logging  # noqa: PLC0415

    log = logging.getLogger("ray.data")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def fault_injection(env: str) -> None:
    """The tests' fault injection in a Ray worker: when the environment variable ``env`` names a
    file that does not exist yet, create it and kill this process (``os._exit``) mid-run; once
    per run, as the file then exists. Nothing happens when ``env`` is not set."""
    marker = os.environ.get(env)
    if not marker:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    os._exit(1)
