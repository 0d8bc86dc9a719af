"""Output filter for the webui: PIL images in, checked and censored PIL images out, failing closed.

Filters are built once per (policy, action) and share the process-wide model cache of the
core, so a model is loaded once per webui process. Any error (missing model, broken image,
a bug) yields a black placeholder image and an error verdict instead of the unchecked image.
"""

from __future__ import annotations

import json
import logging
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from safet2i.errors import ModelLoadError, UnsafeContentError
from safet2i.filter import SafetyFilter
from safet2i.images import float_to_uint8
from safet2i.filter.censor import placeholder

log = logging.getLogger("safet2i")
_LOCK = threading.Lock()
_FILTERS: dict[tuple, SafetyFilter] = {}
MARK = "safet2i"   # PIL Image.info key set on images this extension produced (informative only)
_CHECKED: dict[int, weakref.ref] = {}


def mark_checked(image: Image.Image) -> Image.Image:
    """Remember this very image object as produced by the filter. Identity, not ``info``: a
    file's text chunks become ``Image.info`` when it is opened, so an ``info`` key could be
    forged by an uploaded PNG (Extras copies the input's info onto its output)."""
    key = id(image)

    def gone(ref, key=key):
        with _LOCK:
            if _CHECKED.get(key) is ref:
                del _CHECKED[key]

    with _LOCK:
        _CHECKED[key] = weakref.ref(image, gone)
    return image


def was_checked(image) -> bool:
    with _LOCK:
        ref = _CHECKED.get(id(image))
    return ref is not None and ref() is image


@dataclass
class Outcome:
    image: Image.Image
    verdict: str          # "safe", "censored", "blocked", "error: ..."
    cost: float | None
    labels: list[str]
    escalated: str | None = None   # "fill" / "placeholder": the censored image still tripped the re-check


#: The pack's drop-in folder of filter models (sidecar .json next to its .onnx).
FILTER_DIR = Path(__file__).resolve().parents[2] / "models" / "filters"
NO_COST_MODEL = "None"


def cost_model_choices() -> list[str]:
    """``None`` and the sidecars of learned cost models (``kind: "cost"``, made by ``safet2i
    train cost-model``) in :data:`FILTER_DIR`: the operator setting's choices."""
    out = [NO_COST_MODEL]
    for f in sorted(FILTER_DIR.glob("*.json")):
        try:
            kind = json.loads(f.read_text(encoding="utf-8")).get("kind")
        except (OSError, ValueError, AttributeError):   # not a sidecar: not offered
            continue
        if kind == "cost":
            out.append(f.name)
    return out


def cost_model_path(choice) -> str | None:
    """The sidecar path of the operator's cost-model setting (None: NudeNet alone). A name that
    is not a sidecar directly in :data:`FILTER_DIR` is an error (the filter fails closed)."""
    if choice in (None, "", NO_COST_MODEL):
        return None
    name = str(choice)
    path = FILTER_DIR / name
    if Path(name).name != name or not name.endswith(".json") or not path.is_file():
        raise ModelLoadError(f"the SafeT2I cost-model setting {name!r} is not a sidecar .json in {FILTER_DIR}")
    return str(path)


def _cost_model_setting():
    """The operator's ``safet2i_cost_model`` setting (``None`` outside the webui)."""
    try:
        from modules import shared  # noqa: PLC0415
    except ImportError:
        return None
    return getattr(getattr(shared, "opts", None), "safet2i_cost_model", None)


def get_filter(policy: str, action: str, cost_model: str | None = None) -> SafetyFilter:
    """The shared filter for (policy, action[, cost model sidecar]). Building it checks the
    policy against the models' labels (``SafetyFilter`` raises
    :class:`~safet2i.errors.PolicyError` for a label NudeNet cannot emit, or a policy that could
    flag nothing); the webui offers only the presets, so that error means a broken install, and
    :func:`filter_image` fails closed. NudeNet's packaged sidecar pins its file's sha256; a
    cost model's sidecar, written by ``safet2i train cost-model``, pins its own."""
    key = (policy, action, cost_model) if cost_model else (policy, action)
    with _LOCK:
        if key not in _FILTERS:
            models = ["nudenet"] + ([cost_model] if cost_model else [])
            _FILTERS[key] = SafetyFilter(models, policy=policy, action=action)
        return _FILTERS[key]


def _blocked(size, reason: str) -> Image.Image:
    w, h = size
    img = Image.fromarray((placeholder(h, w) * 255).astype(np.uint8))
    img.info[MARK] = reason
    return mark_checked(img)


def blocked_image(size, reason: str = "blocked") -> Image.Image:
    """The placeholder that replaces an image that may not be shown (a checked image)."""
    return _blocked(size, reason)


def filter_image(image: Image.Image, policy: str, action: str) -> Outcome:
    """Check one image; never raises, never returns the original when something went wrong."""
    size = getattr(image, "size", (64, 64))
    try:
        cost_model = cost_model_path(_cost_model_setting())
        flt = get_filter(policy, action, cost_model) if cost_model else get_filter(policy, action)
        rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        try:
            out = flt.run([rgb])
        except UnsafeContentError:
            return Outcome(_blocked(size, "blocked"), "blocked", None, [])
        verdict = out.verdicts[0]
        labels = sorted({f.detection.label for f in verdict.flagged})
        if not verdict.unsafe:
            result = image.copy()
            result.info = dict(image.info)
            result.info[MARK] = "safe"
            return Outcome(mark_checked(result), "safe", verdict.cost, labels)
        arr = float_to_uint8(out.images[0])     # the very quantisation the re-check judged
        result = Image.fromarray(arr)
        result.info = {k: v for k, v in image.info.items() if k != MARK}
        result.info[MARK] = "censored" if action != "pass" else "flagged"
        verdict_name = "censored" if action != "pass" else "flagged"
        return Outcome(mark_checked(result), verdict_name, verdict.cost, labels, verdict.escalated)
    except Exception as exc:  # noqa: BLE001 - fail closed on anything
        log.error("SafeT2I: output filter failed, image blocked: %s", exc, exc_info=True)
        return Outcome(_blocked(size, f"error: {exc}"), f"error: {type(exc).__name__}: {exc}", None, [])


def verdict_text(o: Outcome) -> str:
    if o.verdict in ("safe", "blocked") or o.verdict.startswith("error"):
        return o.verdict.split(":")[0]
    if o.cost is None:
        return o.verdict
    more = f"; escalated to {o.escalated}" if o.escalated else ""
    return f"{o.verdict} ({', '.join(o.labels)}; cost {o.cost:.2f}{more})"
