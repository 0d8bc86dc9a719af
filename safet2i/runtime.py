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

A model file is read **once** into memory; those bytes are hashed, compared with the
sidecar's ``sha256`` pin, and the very same bytes are given to onnxruntime (never the path,
which could be read again after a swap). Consequences, chosen on purpose:

* Models with *external data* (weights in a second file) are refused: onnxruntime would read
  that file from disk, outside the pin. The session option
  ``session.model_external_initializers_file_folder_path`` is pointed below the model file
  itself, where no file can exist, so onnxruntime fails instead of looking in the working
  directory. ONNX files over 2 GiB (which need external data) are refused before reading.
* TensorRT names its engine cache after the graph's structure when a model comes from
  bytes, not after its weights. Each model therefore gets its own engine cache folder named
  by the sha256 of the verified bytes (``$SAFET2I_CACHE/trt/<sha256>``): an engine is only
  ever reused for byte-identical model files.
* onnxruntime keeps the model bytes alive with the session (a few MB for the built-ins).
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
ENV_REQUIRE_PINNED = "SAFET2I_REQUIRE_PINNED"

#: Largest .onnx file read: protobuf cannot hold more, bigger models need external data.
MAX_MODEL_BYTES = 2 * 1024**3
_OFF = ("", "0", "false", "no", "off")


def require_pinned() -> bool:
    """Whether the operator requires every model to be pinned by a sidecar ``sha256``
    (``SAFET2I_REQUIRE_PINNED``, read on every call). Fails closed: any value except empty,
    ``0``, ``false``, ``no`` or ``off`` turns the requirement on."""
    return os.environ.get(ENV_REQUIRE_PINNED, "").strip().lower() not in _OFF


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


def read_model_bytes(path: Path) -> tuple[bytes, tuple[int, int]]:
    """The whole file, read once, and ``(size, mtime_ns)`` of the file that was read (from
    the open handle, so a rename in between cannot mix two files)."""
    try:
        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            if st.st_size > MAX_MODEL_BYTES:
                raise ModelLoadError(
                    f"ONNX model {path} is {st.st_size} bytes, over the 2 GiB a single ONNX file can "
                    "hold; models with external data are not supported (the sha256 pin could not "
                    "cover the external file)."
                )
            data = fh.read(MAX_MODEL_BYTES + 1)
    except OSError as exc:
        raise ModelLoadError(f"Cannot read ONNX model {path}: {exc}") from exc
    if len(data) > MAX_MODEL_BYTES:
        raise ModelLoadError(f"ONNX model {path} grew past 2 GiB while it was read; refusing it.")
    return data, (st.st_size, st.st_mtime_ns)


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


def _provider_options(provider: str, digest: str) -> dict:
    if provider == "TensorrtExecutionProvider":
        # One folder per verified model: TensorRT keys engines on the graph structure only
        # (a model given as bytes has no path), so a shared folder could hand the engine of
        # one file to another file with the same layers and different weights.
        cache = Path(os.environ.get("SAFET2I_CACHE", Path.home() / ".cache" / "safet2i")) / "trt" / digest
        return {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache)}
    return {}


def _session_options(ort, path: str):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    threads = os.environ.get(ENV_THREADS)
    if threads:
        so.intra_op_num_threads = int(threads)
    so.log_severity_level = 3
    # External data would be read from disk outside the pin: point its folder below the
    # model *file*, where nothing can exist, so such a model fails to load.
    so.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                str(Path(path) / "no-external-data"))
    return so


def _create(ort, data: bytes, path: str, digest: str, providers: list[str]):
    """Create a session from the verified ``data`` on the first provider chain that works,
    falling back towards CPU. ``path`` is only used in messages."""
    errors = []
    for start in range(len(providers)):
        chain = providers[start:]
        try:
            sess = ort.InferenceSession(
                data,
                sess_options=_session_options(ort, path),
                providers=[(p, _provider_options(p, digest)) for p in chain],
            )
            if errors:
                log.warning("SafeT2I: fell back to %s for %s after: %s", chain[0], path, "; ".join(errors))
            return sess
        except Exception as exc:  # noqa: BLE001 - any provider failure means: try the next
            errors.append(f"{chain[0]}: {type(exc).__name__}: {exc}")
    hint = ""
    if any("external data" in e.lower() for e in errors):
        hint = (" (the model keeps its weights in an external data file; SafeT2I loads only "
                "single-file ONNX models, whose bytes the sha256 pin covers)")
    raise ModelLoadError(f"Cannot open ONNX model {path}{hint}: " + " | ".join(errors))


def get_session(
    path: str | os.PathLike,
    providers: str | list[str] | None = None,
    expected_sha256: str | None = None,
) -> LoadedSession:
    """Return the shared session for ``path``, opening it on first use.

    The file is read once; ``expected_sha256`` pins those bytes (a truncated download or a
    different model raises :class:`ModelLoadError` before onnxruntime parses anything), and
    the same bytes are what onnxruntime parses. ``LoadedSession.sha256`` is always the digest
    of the bytes the session was made from.

    Cache: sessions are shared per (file, size, mtime, providers). A cached session is
    returned for a pin only if it was made from bytes with exactly that digest; otherwise the
    file is read and verified again (a file swapped in with the same size and mtime is never
    taken as verified from the cache).
    """
    ort = import_onnxruntime()
    p = Path(path)
    if not p.is_file():
        raise ModelLoadError(f"ONNX model file not found: {p}")
    chain = tuple(resolve_providers(providers))
    want = expected_sha256.lower() if expected_sha256 else None
    resolved = str(p.resolve())
    st = p.stat()
    with _LOCK:
        hit = _CACHE.get((resolved, st.st_size, st.st_mtime_ns, chain))
        if hit is not None and (want is None or hit.sha256 == want):
            return hit
        data, (size, mtime) = read_model_bytes(p)
        digest = hashlib.sha256(data).hexdigest()
        if want and digest != want:
            raise ModelLoadError(
                f"{p} has sha256 {digest}, expected {expected_sha256}: the file is corrupt, "
                "truncated or a different model. Replace it with the original file."
            )
        sess = _create(ort, data, str(p), digest, list(chain))
        loaded = LoadedSession(sess, str(p), digest, tuple(sess.get_providers()))
        _CACHE[(resolved, size, mtime, chain)] = loaded
        log.info("SafeT2I: loaded %s (sha256 %s) on %s", p.name, digest[:12], ", ".join(loaded.providers))
        return loaded


def clear_cache() -> None:
    """Forget every cached session (tests and model reloads)."""
    with _LOCK:
        _CACHE.clear()
