"""ONNX Runtime sessions: execution-provider choice and a process-wide, thread-safe cache.

A model file is opened once per process and per provider choice, then shared by every
caller (CLI, ComfyUI nodes, A1111 scripts). Providers are chosen automatically from what
the installed onnxruntime build offers, fastest first, with an override:

* the ``providers`` argument of :func:`get_session` (``"auto"``, ``"cpu"``, ``"cuda"``,
  ``"tensorrt"``, ``"directml"``, ``"coreml"``, ``"rocm"``, ``"openvino"``, or a
  comma-separated list of those or of full onnxruntime provider names);
* else the environment variable ``SAFET2I_ORT_PROVIDERS`` with the same syntax.

If a session cannot be created with an accelerator provider, it is retried on the next
one and finally on the CPU, with a warning naming what failed. If it cannot be created at
all, :class:`~safet2i.errors.ModelLoadError` names the file and the cause.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from .errors import MissingDependencyError, ModelLoadError

log = logging.getLogger("safet2i")

#: Automatic order, fastest first. TensorRT builds an engine on first use (slow once,
#: cached on disk afterwards), so it comes first only when the build ships it.
AUTO_ORDER = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "ROCMExecutionProvider",
    "DmlExecutionProvider",
    "CoreMLExecutionProvider",
    "OpenVINOExecutionProvider",
    "CPUExecutionProvider",
)

ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "gpu": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "directml": "DmlExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
}

ENV_PROVIDERS = "SAFET2I_ORT_PROVIDERS"
ENV_THREADS = "SAFET2I_ORT_THREADS"


def import_onnxruntime():
    """Import onnxruntime or raise a :class:`MissingDependencyError` saying what to install."""
    try:
        import onnxruntime  # noqa: PLC0415
    except ImportError as exc:  # pragma: no cover - exercised through monkeypatching
        raise MissingDependencyError(
            "onnxruntime",
            "The SafeT2I image filter",
            "Install exactly one build: `python -m pip install onnxruntime` (CPU), or "
            "onnxruntime-gpu / onnxruntime-directml for a GPU. Never both.",
        ) from exc
    return onnxruntime


def resolve_providers(requested: str | list[str] | None = None) -> list[str]:
    """Turn a provider request into an ordered list of providers this build offers.

    Unknown names raise ``ValueError``; known but unavailable ones are dropped with a
    warning. The CPU provider is always last, so a session can always be made.
    """
    ort = import_onnxruntime()
    available = list(ort.get_available_providers())
    if requested is None:
        requested = os.environ.get(ENV_PROVIDERS, "auto")
    names = [p.strip() for p in requested.split(",")] if isinstance(requested, str) else list(requested)
    names = [n for n in names if n]
    if not names or names == ["auto"]:
        chosen = [p for p in AUTO_ORDER if p in available]
    else:
        chosen = []
        for name in names:
            full = ALIASES.get(name.lower(), name)
            if full not in ALIASES.values() and not full.endswith("ExecutionProvider"):
                raise ValueError(
                    f"Unknown onnxruntime provider {name!r}; use auto, "
                    f"{', '.join(sorted(ALIASES))} or a full provider name."
                )
            if full in available:
                chosen.append(full)
            else:
                log.warning(
                    "SafeT2I: provider %s is not offered by this onnxruntime build (%s); skipping it.",
                    full, ", ".join(available),
                )
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return list(dict.fromkeys(chosen))


def host_providers(choice: str, cpu_only: bool = False) -> str | None:
    """Provider request for a host's "providers" widget: an explicit choice is kept; "auto"
    defers to ``SAFET2I_ORT_PROVIDERS`` when the operator set it (returns None, so
    :func:`resolve_providers` reads it), else means CPU when the host runs on the CPU only
    (ComfyUI's ``--cpu``), else the automatic order."""
    if choice != "auto":
        return choice
    if os.environ.get(ENV_PROVIDERS, "").strip():
        return None
    return "cpu" if cpu_only else "auto"


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class LoadedSession:
    """An onnxruntime session plus what it was made from."""

    session: object
    path: str
    sha256: str
    providers: tuple[str, ...]

    @property
    def input_name(self) -> str:
        return self.session.get_inputs()[0].name

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]


_CACHE: dict[tuple, LoadedSession] = {}
_LOCK = threading.Lock()


def _provider_options(provider: str) -> dict:
    if provider == "TensorrtExecutionProvider":
        cache = Path(os.environ.get("SAFET2I_CACHE", Path.home() / ".cache" / "safet2i")) / "trt"
        return {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache)}
    return {}


def _session_options(ort):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    threads = os.environ.get(ENV_THREADS)
    if threads:
        so.intra_op_num_threads = int(threads)
    so.log_severity_level = 3
    return so


def _create(ort, path: str, providers: list[str]):
    """Create a session on the first provider chain that works, falling back towards CPU."""
    errors = []
    for start in range(len(providers)):
        chain = providers[start:]
        try:
            sess = ort.InferenceSession(
                path,
                sess_options=_session_options(ort),
                providers=[(p, _provider_options(p)) for p in chain],
            )
            if errors:
                log.warning("SafeT2I: fell back to %s for %s after: %s", chain[0], path, "; ".join(errors))
            return sess
        except Exception as exc:  # noqa: BLE001 - any provider failure means: try the next
            errors.append(f"{chain[0]}: {type(exc).__name__}: {exc}")
    raise ModelLoadError(f"Cannot open ONNX model {path}: " + " | ".join(errors))


def get_session(
    path: str | os.PathLike,
    providers: str | list[str] | None = None,
    expected_sha256: str | None = None,
) -> LoadedSession:
    """Return the shared session for ``path``, opening it on first use.

    ``expected_sha256`` pins the file: a different file (truncated download, wrong model)
    raises :class:`ModelLoadError` before onnxruntime ever parses it.
    """
    ort = import_onnxruntime()
    p = Path(path)
    if not p.is_file():
        raise ModelLoadError(f"ONNX model file not found: {p}")
    chain = tuple(resolve_providers(providers))
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns, chain)
    with _LOCK:
        hit = _CACHE.get(key)
        if hit is not None:
            return hit
        digest = file_sha256(p)
        if expected_sha256 and digest != expected_sha256.lower():
            raise ModelLoadError(
                f"{p} has sha256 {digest}, expected {expected_sha256}: the file is corrupt, "
                "truncated or a different model. Replace it with the original file."
            )
        sess = _create(ort, str(p), list(chain))
        loaded = LoadedSession(sess, str(p), digest, tuple(sess.get_providers()))
        _CACHE[key] = loaded
        log.info("SafeT2I: loaded %s on %s", p.name, ", ".join(loaded.providers))
        return loaded


def clear_cache() -> None:
    """Forget every cached session (tests and model reloads)."""
    with _LOCK:
        _CACHE.clear()
