"""Operator enforcement, host-agnostic core (issue 19): every image a server emits is filtered
with the operator's policy, whatever the workflow or the API ask for.

The operator turns it on outside any workflow with the environment variable
``SAFET2I_ENFORCE`` (:func:`config_from_env`): a policy preset name (``strict-5``,
``broad-9``, ``face-only``) with ``SAFET2I_ENFORCE_ACTION`` for the action (default
``blur``), or the path of a ``.toml`` file with every setting (``docs/deploy.md``). A host
builds one :class:`Enforcer` at start-up, logs :meth:`Enforcer.describe`, calls
:meth:`Enforcer.load` (a failure refuses every prompt) and passes each IMAGE batch that
reaches an output node through :meth:`Enforcer.enforce`.

Everything here fails closed: a bad setting, a model that cannot load or run, an audit log
that cannot be written raise :class:`EnforcementError`; an image judged unsafe under the
``block`` action raises :class:`EnforcementBlocked`. No image data is ever put into an
error message or the audit log.

Cost: pixels SafeT2I's own filter node produced under a policy at least as strict are
remembered by content (:meth:`Enforcer.mark_checked`, a bounded LRU of SHA-256 digests plus
dtype, shape and byte length) and not run through the models again.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import SafeT2IError, UnsafeContentError

log = logging.getLogger("safet2i")

ENV = "SAFET2I_ENFORCE"
ENV_ACTION = "SAFET2I_ENFORCE_ACTION"

#: The actions an operator may enforce (``pass`` would only flag: refused).
ENFORCE_ACTIONS = ("blur", "pixelate", "fill", "black", "placeholder", "block")
#: How much of an image each action lets out: a node's action is kept only when its rank is
#: at least the operator's (region censoring < whole image withheld < nothing leaves).
ACTION_RANK = {"pass": 0, "blur": 1, "pixelate": 1, "fill": 1, "black": 2, "placeholder": 2, "block": 3}
PREVIEW_MODES = ("off", "blur")
CONFIG_KEYS = ("policy", "action", "thresholds", "models", "providers", "previews", "audit_log",
               "audit_max_bytes", "audit_backups", "deny_nodes")
#: Smallest audit-log size before rotation (a smaller one would rotate on every record).
MIN_AUDIT_BYTES = 4096
MAX_AUDIT_BACKUPS = 1000
#: Pixels (H x W per image, summed over a chunk) converted and filtered at a time.
CHUNK_PIXELS = 16 * 1024 * 1024
CHUNK_IMAGES = 16
#: Per-image digests remembered by :meth:`Enforcer.mark_checked`.
CHECKED_CAPACITY = 256
#: Longest string an audit record may hold (an error text); longer ones are cut.
AUDIT_MAX_STRING = 1000


class EnforcementError(SafeT2IError):
    """Enforcement is misconfigured, or its filter cannot load or run: prompts are refused."""


class EnforcementBlocked(SafeT2IError):
    """A ``block`` verdict on an output node's images: the node must not run. The message
    names the node, the batch positions and the flagged labels; it never holds image data."""

    def __init__(self, message: str, *, node: str = "", node_id: str = "", indices=(), labels=()):
        super().__init__(message)
        self.node, self.node_id = node, node_id
        self.indices, self.labels = list(indices), list(labels)


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class EnforceConfig:
    policy: str
    action: str = "blur"
    thresholds: str = ""
    models: tuple[str, ...] = ("nudenet",)
    providers: str = "auto"
    previews: str = "off"
    audit_log: str | None = None
    audit_max_bytes: int = 10 * 2**20
    audit_backups: int = 3
    deny_nodes: tuple[str, ...] = ()
    source: str = ""

    def validate(self) -> EnforceConfig:
        """Check every field (:class:`EnforcementError` naming the field and value); returns self."""
        where = f" ({self.source})" if self.source else ""
        _check_policy(self.policy, self.thresholds, where)
        if self.action not in ENFORCE_ACTIONS:
            raise EnforcementError(f"SafeT2I enforcement{where}: action {self.action!r} is not one of "
                                   f"{', '.join(ENFORCE_ACTIONS)} ('pass' would censor nothing).")
        if not isinstance(self.models, tuple) or not self.models or not all(
                isinstance(m, str) and m.strip() for m in self.models):
            raise EnforcementError(f"SafeT2I enforcement{where}: models must be a non-empty list of model names "
                                   f"or sidecar paths, got {self.models!r}.")
        from .filter.detectors import BUILTIN  # noqa: PLC0415

        for m in self.models:
            if m not in BUILTIN and not m.lower().endswith((".json", ".onnx")):
                raise EnforcementError(f"SafeT2I enforcement{where}: unknown model {m!r}; use one of "
                                       f"{', '.join(BUILTIN)} or the path of a sidecar .json.")
        if not isinstance(self.providers, str) or not self.providers.strip():
            raise EnforcementError(f"SafeT2I enforcement{where}: providers must be a non-empty string such as "
                                   f"'auto' or 'cpu', got {self.providers!r}.")
        if self.previews not in PREVIEW_MODES:
            raise EnforcementError(f"SafeT2I enforcement{where}: previews {self.previews!r} is not one of "
                                   f"{', '.join(PREVIEW_MODES)}.")
        if self.audit_log is not None and (not isinstance(self.audit_log, str) or not self.audit_log.strip()):
            raise EnforcementError(f"SafeT2I enforcement{where}: audit_log must be a file path, got "
                                   f"{self.audit_log!r} (leave it out for no audit log).")
        if not _is_int(self.audit_max_bytes) or self.audit_max_bytes < MIN_AUDIT_BYTES:
            raise EnforcementError(f"SafeT2I enforcement{where}: audit_max_bytes must be an integer >= "
                                   f"{MIN_AUDIT_BYTES}, got {self.audit_max_bytes!r}.")
        if not _is_int(self.audit_backups) or not 1 <= self.audit_backups <= MAX_AUDIT_BACKUPS:
            raise EnforcementError(f"SafeT2I enforcement{where}: audit_backups must be an integer in "
                                   f"[1, {MAX_AUDIT_BACKUPS}], got {self.audit_backups!r}.")
        if not isinstance(self.deny_nodes, tuple) or not all(
                isinstance(n, str) and n.strip() and n == n.strip() for n in self.deny_nodes):
            raise EnforcementError(f"SafeT2I enforcement{where}: deny_nodes must be a list of node class names, "
                                   f"got {self.deny_nodes!r}.")
        return self


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_policy(policy, thresholds, where: str):
    """The enforced :class:`~safet2i.filter.Policy` (preset, or ``custom`` with thresholds)."""
    from .filter.policy import PRESETS, get_policy  # noqa: PLC0415

    if not isinstance(policy, str) or (policy not in PRESETS and policy != "custom"):
        raise EnforcementError(f"SafeT2I enforcement{where}: unknown policy {policy!r}; use one of "
                               f"{', '.join(PRESETS)} (or custom with thresholds).")
    if not isinstance(thresholds, str):
        raise EnforcementError(f"SafeT2I enforcement{where}: thresholds must be a string like "
                               f"'LABEL=0.5, OTHER=0.7', got {thresholds!r}.")
    try:
        return get_policy(policy, thresholds)
    except SafeT2IError as exc:
        raise EnforcementError(f"SafeT2I enforcement{where}: thresholds {thresholds!r}: {exc}") from exc


def config_from_env(environ: Mapping[str, str] | None = None) -> EnforceConfig | None:
    """The operator's enforcement settings, or ``None`` when ``SAFET2I_ENFORCE`` is unset or empty.

    ``SAFET2I_ENFORCE`` is a preset name (then ``SAFET2I_ENFORCE_ACTION`` is the action, default
    ``blur``) or the path of a ``.toml`` file (:func:`config_from_toml`; setting
    ``SAFET2I_ENFORCE_ACTION`` as well is refused as ambiguous). Anything else is an
    :class:`EnforcementError` naming the value: a typo must not leave the server unenforced.
    """
    env = os.environ if environ is None else environ
    value = (env.get(ENV) or "").strip()
    if not value:
        return None
    action = (env.get(ENV_ACTION) or "").strip()
    from .filter.policy import PRESETS  # noqa: PLC0415

    if value in PRESETS:
        return EnforceConfig(policy=value, action=action or "blur",
                             source=f"preset {value} from {ENV}" + (f", action from {ENV_ACTION}" if action else "")
                             ).validate()
    if value.lower().endswith(".toml"):
        if action:
            raise EnforcementError(
                f"SafeT2I enforcement: {ENV} names the file {value} and {ENV_ACTION}={action!r} is set too; "
                f"set the action in the file's 'action' key and unset {ENV_ACTION} (ambiguous).")
        return config_from_toml(value)
    raise EnforcementError(
        f"SafeT2I enforcement: {ENV}={value!r} is neither a policy preset ({', '.join(PRESETS)}) nor the path "
        "of a .toml file; refusing to start unenforced.")


def _load_toml(path: Path) -> dict:
    try:
        import tomllib  # noqa: PLC0415 - Python 3.11+
    except ImportError:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib  # noqa: PLC0415
        except ImportError as exc:
            raise EnforcementError(f"SafeT2I enforcement: reading {path} needs Python 3.11+ (tomllib) or the "
                                   "package tomli.") from exc
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise EnforcementError(f"SafeT2I enforcement: cannot read the config file {path}: {exc}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise EnforcementError(f"SafeT2I enforcement: the config file {path} is not valid TOML: {exc}") from exc


def config_from_toml(path: str | os.PathLike) -> EnforceConfig:
    """Read an enforcement ``.toml`` file (keys: :data:`CONFIG_KEYS`; ``policy`` required).
    Relative paths in ``models`` and ``audit_log`` are relative to the file's folder."""
    p = Path(path).expanduser().absolute()
    data = _load_toml(p)
    where = f" (file {p})"
    unknown = sorted(set(data) - set(CONFIG_KEYS))
    if unknown:
        raise EnforcementError(f"SafeT2I enforcement{where}: unknown key(s) {', '.join(map(repr, unknown))}; "
                               f"the keys are {', '.join(CONFIG_KEYS)}.")
    if "policy" not in data:
        raise EnforcementError(f"SafeT2I enforcement{where}: the key 'policy' is required (e.g. policy = \"strict-5\").")
    kw: dict = {}
    for key in ("policy", "action", "providers", "previews"):
        if key in data:
            if not isinstance(data[key], str):
                raise EnforcementError(f"SafeT2I enforcement{where}: {key} must be a string, got {data[key]!r}.")
            kw[key] = data[key]
    if "thresholds" in data:
        th = data["thresholds"]
        if isinstance(th, dict):     # a TOML table LABEL = 0.5
            bad = [k for k, v in th.items() if isinstance(v, bool) or not isinstance(v, (int, float))]
            if bad:
                raise EnforcementError(f"SafeT2I enforcement{where}: thresholds: {bad[0]} = {th[bad[0]]!r} is "
                                       "not a number.")
            th = ", ".join(f"{k}={float(v)!r}" for k, v in th.items())
        if not isinstance(th, str):
            raise EnforcementError(f"SafeT2I enforcement{where}: thresholds must be a string or a table of "
                                   f"LABEL = score, got {th!r}.")
        kw["thresholds"] = th
    for key in ("models", "deny_nodes"):
        if key in data:
            v = data[key]
            if isinstance(v, str):
                v = [v]
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise EnforcementError(f"SafeT2I enforcement{where}: {key} must be a list of strings, got {v!r}.")
            kw[key] = tuple(v)
    if "models" in kw:
        from .filter.detectors import BUILTIN  # noqa: PLC0415

        kw["models"] = tuple(str(_beside(p, m)) if m not in BUILTIN and m.lower().endswith((".json", ".onnx"))
                             else m for m in kw["models"])
    if "audit_log" in data:
        v = data["audit_log"]
        if not isinstance(v, str) or not v.strip():
            raise EnforcementError(f"SafeT2I enforcement{where}: audit_log must be a file path, got {v!r} "
                                   "(leave the key out for no audit log).")
        kw["audit_log"] = str(_beside(p, v))
    for key in ("audit_max_bytes", "audit_backups"):
        if key in data:
            kw[key] = data[key]
    return EnforceConfig(**kw, source=f"file {p}").validate()


def _beside(config_file: Path, value: str) -> Path:
    q = Path(value).expanduser()
    return q if q.is_absolute() else config_file.parent / q


# --------------------------------------------------------------------------- strictness


def policy_at_least(candidate, required) -> bool:
    """Whether the :class:`~safet2i.filter.Policy` ``candidate`` flags at least what
    ``required`` flags and censors at least as much of it: every label ``required`` gives a
    threshold has one in ``candidate`` no higher, boxes grow at least as far, and sidecar
    thresholds apply if they do in ``required``. (``broad-9`` is at least ``strict-5``;
    ``face-only`` is not.) The webui extension's ``AT_LEAST`` table is this, for presets."""
    for label, t in required.thresholds.items():
        mine = candidate.thresholds.get(label)
        if mine is None or float(mine) > float(t):
            return False
    if required.use_model_defaults and not candidate.use_model_defaults:
        return False
    return float(candidate.expand) >= float(required.expand)


def action_at_least(candidate: str, required: str) -> bool:
    """Whether the action ``candidate`` lets out no more than ``required`` (:data:`ACTION_RANK`)."""
    return candidate in ACTION_RANK and ACTION_RANK[candidate] >= ACTION_RANK[required]


# --------------------------------------------------------------------------- audit log


def _clean(value, path: str = "record"):
    """A JSON-safe copy of an audit value; anything else (arrays, tensors, bytes, images) is an
    error, so image data can never reach the log; long strings are cut."""
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return value if len(value) <= AUDIT_MAX_STRING else value[:AUDIT_MAX_STRING] + "…"
    if isinstance(value, Mapping):
        return {str(k): _clean(v, f"{path}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v, f"{path}[{i}]") for i, v in enumerate(value)]
    raise EnforcementError(f"SafeT2I audit log: {path} is a {type(value).__name__}; only JSON values (no image "
                           "data) are written.")


class AuditLog:
    """JSON lines, one record per :meth:`write`, appended with one ``write`` call under a lock
    (thread-safe; every line whole). When the file would grow past ``max_bytes`` it is rotated
    first: ``path.(N-1)`` -> ``path.N`` ... ``path`` -> ``path.1`` by atomic renames
    (``os.replace``), keeping ``backups`` old files; the oldest beyond them is dropped."""

    def __init__(self, path, max_bytes: int = 10 * 2**20, backups: int = 3):
        self.path = Path(path)
        if not _is_int(max_bytes) or max_bytes < 1:
            raise EnforcementError(f"SafeT2I audit log: max_bytes must be a positive integer, got {max_bytes!r}.")
        if not _is_int(backups) or backups < 1:
            raise EnforcementError(f"SafeT2I audit log: backups must be an integer >= 1, got {backups!r}.")
        self.max_bytes, self.backups = max_bytes, backups
        self._lock = threading.Lock()

    def check(self) -> None:
        """Fail now (not at the first image) when the log cannot be written."""
        if not self.path.parent.is_dir():
            raise EnforcementError(f"SafeT2I audit log: the folder {self.path.parent} does not exist.")
        if self.path.is_dir():
            raise EnforcementError(f"SafeT2I audit log: {self.path} is a folder, not a file.")
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        except OSError as exc:
            raise EnforcementError(f"SafeT2I audit log: cannot open {self.path} for appending: {exc}") from exc
        os.close(fd)

    def write(self, record: dict) -> None:
        rec = _clean(dict(record))
        rec.setdefault("time", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds"))
        line = (json.dumps(rec, ensure_ascii=False, separators=(",", ":"), allow_nan=False) + "\n").encode("utf-8")
        with self._lock:
            try:
                try:
                    size = self.path.stat().st_size
                except FileNotFoundError:
                    size = 0
                if size and size + len(line) > self.max_bytes:
                    self._rotate()
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
                try:
                    view = memoryview(line)
                    while view:
                        n = os.write(fd, view)
                        view = view[n:]
                finally:
                    os.close(fd)
            except OSError as exc:
                raise EnforcementError(f"SafeT2I audit log: cannot write {self.path}: {exc}") from exc

    def _rotate(self) -> None:
        for i in range(self.backups - 1, 0, -1):
            src = self.path.with_name(f"{self.path.name}.{i}")
            if src.exists():
                os.replace(src, self.path.with_name(f"{self.path.name}.{i + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))


# --------------------------------------------------------------------------- the enforcer


def _tensor_bytes(img):
    """``(dtype, shape, uint8 buffer)`` of one image (torch tensor or NumPy array), CPU, contiguous."""
    if hasattr(img, "detach"):
        t = img.detach().cpu().contiguous()
        return str(t.dtype), tuple(t.shape), t.reshape(-1).view(__import__("torch").uint8).numpy()
    a = np.ascontiguousarray(img)
    return str(a.dtype), tuple(a.shape), a.reshape(-1).view(np.uint8)


def pixel_key(img) -> tuple:
    """Content key of one image: dtype, shape, byte length and SHA-256 of its bytes (a digest
    collision alone cannot match different pixels of another shape, dtype or length)."""
    dtype, shape, buf = _tensor_bytes(img)
    return dtype, shape, int(buf.nbytes), hashlib.sha256(memoryview(buf)).digest()


class Enforcer:
    """The operator's filter for every output (module docstring)."""

    def __init__(self, config: EnforceConfig, filter_factory=None, *, checked_capacity: int = CHECKED_CAPACITY,
                 chunk_pixels: int = CHUNK_PIXELS, chunk_images: int = CHUNK_IMAGES):
        if not isinstance(config, EnforceConfig):
            raise EnforcementError(f"SafeT2I enforcement needs an EnforceConfig, got {type(config).__name__}.")
        self.config = config.validate()
        self.policy = _check_policy(config.policy, config.thresholds, f" ({config.source})" if config.source else "")
        self._factory = filter_factory or default_filter
        self._filter = None
        self._load_error: EnforcementError | None = None
        self._lock = threading.Lock()
        self._checked: OrderedDict[tuple, None] = OrderedDict()
        self._checked_lock = threading.Lock()
        self.checked_capacity = max(1, int(checked_capacity))
        self.chunk_pixels, self.chunk_images = max(1, int(chunk_pixels)), max(1, int(chunk_images))
        self.audit = (AuditLog(config.audit_log, config.audit_max_bytes, config.audit_backups)
                      if config.audit_log else None)

    # ---------------------------------------------------------------- start-up
    def load(self) -> None:
        """Build the filter (its models are loaded once per process and shared) and open the
        audit log. Any failure -> :class:`EnforcementError` naming the cause; it is remembered,
        so every later :meth:`enforce` refuses with the same message."""
        with self._lock:
            if self._filter is not None:
                return
            try:
                if self.audit is not None:
                    self.audit.check()
                flt = self._factory(self.config)
                if flt is None or not callable(getattr(flt, "run", None)):
                    raise EnforcementError(f"the filter factory returned {type(flt).__name__}, not a filter")
            except Exception as exc:  # noqa: BLE001 - fail closed on anything
                err = EnforcementError(
                    f"SafeT2I enforcement ({self.config.source or 'config'}) cannot load its filter "
                    f"(models {', '.join(self.config.models)}, policy {self.config.policy}): "
                    f"{type(exc).__name__}: {exc}. Prompts are refused until this is fixed.")
                self._load_error = err
                raise err from exc
            self._filter, self._load_error = flt, None

    @property
    def loaded(self) -> bool:
        return self._filter is not None

    def describe(self) -> str:
        c = self.config
        audit = (f"audit log {c.audit_log} (rotated at {c.audit_max_bytes} bytes, {c.audit_backups} backups)"
                 if c.audit_log else "no audit log")
        extra = f", thresholds {c.thresholds}" if c.thresholds.strip() else ""
        deny = f"; refused nodes: {', '.join(c.deny_nodes)}" if c.deny_nodes else ""
        return (f"SafeT2I enforcement ON ({c.source or 'config'}): policy {c.policy}{extra}, action {c.action}, "
                f"models {', '.join(c.models)} on {c.providers}, live previews {c.previews}, {audit}{deny}")

    # ---------------------------------------------------------------- workflows' own filter nodes
    def override(self, policy, action: str, thresholds: str = "") -> tuple[str, str, bool]:
        """What a SafeT2I filter node in a workflow may run with: its ``policy`` (+``thresholds``)
        and ``action`` when at least as strict as the operator's (:func:`policy_at_least`,
        :data:`ACTION_RANK`), else the operator's. Returns ``(policy, action, weaker)``;
        ``weaker`` says the request was weaker (log the attempt). When the returned policy is the
        operator's, use the operator's thresholds (``config.thresholds``) with it, not the node's.
        An unreadable request counts as weaker. ``policy`` may also be a built Policy."""
        weaker_policy = True
        try:
            from .filter.policy import Policy, get_policy  # noqa: PLC0415

            cand = policy if isinstance(policy, Policy) else get_policy(str(policy), thresholds or None)
            weaker_policy = not policy_at_least(cand, self.policy)
        except Exception:  # noqa: BLE001 - an unreadable request is refused, not trusted
            weaker_policy = True
        name = policy.name if hasattr(policy, "thresholds") else policy
        weaker_action = not action_at_least(action, self.config.action)
        return ((self.config.policy if weaker_policy else name),
                (self.config.action if weaker_action else action),
                weaker_policy or weaker_action)

    def uses_models(self, models) -> bool:
        """Whether ``models`` are the enforcer's own filter models, by content (file sha256, kind,
        mode, labels, input/output layout and thresholds of the sidecar), not by their names,
        which any sidecar can choose. False while the enforcer's filter is not loaded."""
        models_of_mine = getattr(self._filter, "models", None)
        if models_of_mine is None:
            return False
        mine = [model_identity(m) for m in models_of_mine]
        theirs = [model_identity(m) for m in models]
        if None in mine or None in theirs:
            return False
        return sorted(mine) == sorted(theirs)

    def mark_checked(self, images, *, policy=None, action: str | None = None) -> None:
        """Remember these pixels (each image of the batch, by :func:`pixel_key`) as checked under
        the operator's policy. Called by SafeT2I's own filter node on the images it outputs, after
        :meth:`override`. With ``policy`` / ``action`` given (what the node ran), pixels checked
        under something weaker are not remembered."""
        if policy is not None:
            try:
                from .filter.policy import Policy, get_policy  # noqa: PLC0415

                pol = policy if isinstance(policy, Policy) else get_policy(str(policy))
            except Exception:  # noqa: BLE001
                return
            if not policy_at_least(pol, self.policy):
                return
        if action is not None and not action_at_least(action, self.config.action):
            return
        keys = [pixel_key(img) for img in _images_of(images)]
        with self._checked_lock:
            for k in keys:
                self._checked[k] = None
                self._checked.move_to_end(k)
            while len(self._checked) > self.checked_capacity:
                self._checked.popitem(last=False)

    def was_checked(self, images) -> bool:
        """Whether every image of the batch is pixels :meth:`mark_checked` remembered."""
        imgs = _images_of(images)
        return bool(imgs) and all(self._is_checked(pixel_key(i)) for i in imgs)

    def _is_checked(self, key) -> bool:
        with self._checked_lock:
            if key in self._checked:
                self._checked.move_to_end(key)
                return True
        return False

    # ---------------------------------------------------------------- outputs
    def enforce(self, images, *, node: str, node_id: str, prompt_id: str | None = None):
        """Filter an IMAGE batch ``[B, H, W, C]`` (float, C = 1, 3 or 4) before output node
        ``node`` (id ``node_id``) runs. Returns the same tensor object when nothing was censored
        and every value is within [0, 1] (else the pixels that were judged: clipped to [0, 1]),
        else a censored copy of the input's dtype, shape and device (alpha kept, a one-channel
        image stays one channel); the input is never written. Raises :class:`EnforcementBlocked`
        for a ``block`` verdict and :class:`EnforcementError` for anything else that went wrong.
        Writes one audit record per call."""
        record = {"prompt_id": prompt_id, "node": node, "node_id": str(node_id), "policy": self.config.policy,
                  "action": self.config.action}
        try:
            out, per_image = self._enforce(images, str(node), str(node_id))
        except EnforcementBlocked as exc:
            self._audit({**record, "verdict": "blocked", "cost": None, "labels": exc.labels,
                         "images": [{"index": i, "verdict": "blocked"} for i in exc.indices],
                         "reason": str(exc)}, fail_closed=True)
            raise
        except Exception as exc:  # noqa: BLE001 - fail closed on anything
            if isinstance(exc, EnforcementError):
                err = exc
            else:
                err = EnforcementError(f"SafeT2I enforcement could not check the images of node {node} "
                                       f"(id {node_id}): {type(exc).__name__}: {exc}")
            self._audit({**record, "verdict": "error", "cost": None, "labels": [], "images": [],
                         "reason": str(err)}, fail_closed=False)
            if err is exc:
                raise
            raise err from exc
        states = {p["verdict"] for p in per_image}
        overall = ("censored" if "censored" in states else "safe" if "safe" in states
                   else "reused" if states else "empty")
        costs = [p["cost"] for p in per_image if p.get("cost") is not None]
        labels = sorted({lab for p in per_image for lab in p.get("labels", [])})
        self._audit({**record, "verdict": overall, "cost": max(costs) if costs else None, "labels": labels,
                     "images": per_image}, fail_closed=True)
        return out

    def _audit(self, record: dict, fail_closed: bool) -> None:
        if self.audit is None:
            return
        try:
            self.audit.write(record)
        except EnforcementError:
            if fail_closed:
                raise
            log.error("SafeT2I: the audit record of a refused output could not be written", exc_info=True)

    def _enforce(self, images, node: str, node_id: str):
        if self._filter is None:
            if self._load_error is not None:
                raise self._load_error
            self.load()
        torch = _torch()
        if not isinstance(images, torch.Tensor):
            raise EnforcementError(f"SafeT2I enforcement expects an IMAGE tensor [B, H, W, C], got "
                                   f"{type(images).__name__}.")
        if images.ndim != 4:
            raise EnforcementError(f"SafeT2I enforcement expects an IMAGE tensor [B, H, W, C], got shape "
                                   f"{tuple(images.shape)}.")
        b, h, w, c = (int(s) for s in images.shape)
        if c not in (1, 3, 4):
            raise EnforcementError(f"SafeT2I enforcement: an IMAGE needs 1, 3 or 4 channels, got {c} "
                                   f"(shape {tuple(images.shape)}).")
        if not images.dtype.is_floating_point:
            raise EnforcementError(f"SafeT2I enforcement: an IMAGE holds floats in [0, 1], got dtype "
                                   f"{images.dtype}.")
        if b == 0:
            return images, []
        if h < 1 or w < 1:
            raise EnforcementError(f"SafeT2I enforcement: empty images of shape {tuple(images.shape)}.")
        lo, hi = torch.aminmax(images.detach())
        if bool(torch.isfinite(lo) & torch.isfinite(hi)) and (bool(lo < 0) or bool(hi > 1)):
            # The filter judges pixels clipped to [0, 1]; those are the pixels that leave, never
            # the unclipped values (x1000 or -x would look white or black to the detector while
            # a saver that rescales shows the picture). NaN/inf: not clipped, refused by the filter.
            images = images.clamp(0, 1)
        with self._checked_lock:
            any_checked = bool(self._checked)
        per_image: list[dict] = [{} for _ in range(b)]
        out = None          # allocated at the first censored image only
        step = max(1, min(self.chunk_images, self.chunk_pixels // max(1, h * w)))
        for start in range(0, b, step):
            src = images[start:start + step].detach().cpu()
            todo = []
            for j in range(src.shape[0]):
                if any_checked and self._is_checked(pixel_key(src[j])):
                    per_image[start + j] = {"index": start + j, "verdict": "reused"}
                else:
                    todo.append(j)
            if not todo:
                continue
            rgb = src[todo].float()
            if c == 1:
                rgb = rgb.expand(-1, -1, -1, 3)
            elif c == 4:
                rgb = rgb[..., :3]
            try:
                res = self._filter.run(rgb.numpy())
            except UnsafeContentError as exc:
                raise self._blocked(exc, [start + todo[i] for i in exc.indices], node, node_id) from None
            if len(res.verdicts) != len(todo) or len(res.images) != len(todo):
                raise EnforcementError(f"the filter returned {len(res.verdicts)} verdicts for {len(todo)} images")
            for j, v, img in zip(todo, res.verdicts, res.images):
                labels = sorted({f.detection.label for f in v.flagged})
                entry = {"index": start + j, "verdict": "censored" if v.unsafe else "safe",
                         "cost": round(float(v.cost), 6), "labels": labels}
                if v.escalated:
                    entry["escalated"] = v.escalated
                per_image[start + j] = entry
                if not v.unsafe:
                    continue
                if self.config.action == "block":      # a filter that did not raise itself
                    raise self._blocked(UnsafeContentError([start + j], [v.to_dict()]), [start + j], node, node_id)
                if out is None:
                    out = images.detach().to("cpu", copy=True)
                cens = torch.from_numpy(np.asarray(img, dtype=np.float32))
                if cens.shape != (h, w, 3):
                    raise EnforcementError(f"the filter returned an image of shape {tuple(cens.shape)} for "
                                           f"{h}x{w}")
                if c == 1:
                    out[start + j] = cens.mean(dim=2, keepdim=True).to(out.dtype)
                elif c == 4:
                    out[start + j, ..., :3] = cens.to(out.dtype)
                else:
                    out[start + j] = cens.to(out.dtype)
        if out is None:
            return images, per_image
        return out.to(images.device), per_image

    def _blocked(self, exc: UnsafeContentError, indices: list[int], node: str, node_id: str) -> EnforcementBlocked:
        labels = sorted({d["label"] for r in exc.report for d in r.get("detections", []) if d.get("flagged")})
        return EnforcementBlocked(
            f"SafeT2I enforcement blocked the output of node {node} (id {node_id}): "
            f"{len(indices)} image(s) unsafe at batch position(s) {indices}"
            f"{' (' + ', '.join(labels) + ')' if labels else ''} under the operator's policy "
            f"{self.config.policy}; nothing of this node was written.",
            node=node, node_id=node_id, indices=indices, labels=labels)


#: ``previews = "blur"``: a live preview is shrunk so its longer side has this many pixels.
PREVIEW_CELLS = 8


def model_identity(model) -> str | None:
    """What makes two loaded filter models judge alike (``None`` when a model does not say)."""
    try:
        spec = model.spec
        ident = {"kind": spec.kind, "sha256": model.loaded.sha256, "labels": list(spec.labels),
                 "input": spec.input, "output": spec.output, "thresholds": spec.thresholds,
                 "mode": getattr(model, "mode", None), "class": type(model).__name__}
    except AttributeError:
        return None
    return json.dumps(ident, sort_keys=True, default=str)


def censor_preview(image):
    """A live preview for ``previews = "blur"``: shrunk to :data:`PREVIEW_CELLS` pixels on its
    longer side (area average) and blown up again as blocks (a mosaic), so only a few colour
    cells remain, whatever the latent shows. Takes a PIL image or a ``uint8 [H, W, C]`` array;
    returns the same kind and size. Nothing of the input is reused beyond those few averages."""
    from PIL import Image  # noqa: PLC0415

    pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    w, h = pil.size
    scale = PREVIEW_CELLS / max(w, h, 1)
    small = pil.convert("RGB").resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BOX)
    out = small.resize((w, h), Image.Resampling.NEAREST)
    return out if isinstance(image, Image.Image) else np.asarray(out)


def _images_of(images) -> list:
    """The single images of a batch ``[B, H, W, C]`` (or one ``[H, W, C]`` image, or a list)."""
    if isinstance(images, (list, tuple)):
        return list(images)
    if getattr(images, "ndim", None) == 3:
        return [images]
    if getattr(images, "ndim", None) != 4:
        raise EnforcementError(f"SafeT2I enforcement expects an IMAGE batch [B, H, W, C], got shape "
                               f"{tuple(getattr(images, 'shape', ()))}.")
    return [images[i] for i in range(images.shape[0])]


def _torch():
    try:
        import torch  # noqa: PLC0415
    except ImportError as exc:  # pragma: no cover - hosts have torch
        raise EnforcementError("SafeT2I enforcement of IMAGE tensors needs torch.") from exc
    return torch


def default_filter(config: EnforceConfig, cpu_only: bool = False):
    """The real filter: the operator's models (shared per process), policy and action, on the
    providers the host's nodes would use (``cpu_only``: the host runs on the CPU only, e.g.
    ComfyUI's ``--cpu``, so ``providers = "auto"`` means CPU there as in its loader node)."""
    from .filter import SafetyFilter, get_policy  # noqa: PLC0415
    from .runtime import host_providers  # noqa: PLC0415

    return SafetyFilter(list(config.models), get_policy(config.policy, config.thresholds or None), config.action,
                        providers=host_providers(config.providers, cpu_only))
