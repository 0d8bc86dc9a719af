"""Filter policies: which labels count as unsafe, at what score, and how far boxes grow.

Presets (class sets and the papers they come from: ``docs/filter.md``, "Policies"):

``strict-5``  I2P / SLD nudity classes: anus, buttocks, female breast, female and male
              genitalia, all ``_EXPOSED``, at 0.6 (the I2P NudeNet ``min_prob``).
``broad-9``   UnlearnDiffAtk / RECE classes: ``strict-5`` plus male breast, belly, feet and
              armpits ``_EXPOSED``, at 0.6 (RECE's threshold; UnlearnDiffAtk's effective one
              is about 0.5).
``face-only`` ``FACE_FEMALE`` and ``FACE_MALE`` at 0.5. For tests and demonstrations on
              benign pictures: it exercises every censoring path without NSFW material.

Classifier labels (e.g. Open-NSFW's ``nsfw``) use the threshold in the model's sidecar
unless the policy names that label too. So do cost models (sidecar ``kind: "cost"``, label
``cost`` by default): their threshold is a probability ``sigmoid(C)`` in [0, 1) like every
other (0.5 is the sign threshold ``C = 0``), and a policy combines them with detectors by OR
of the verdicts and the maximum of the costs (``safet2i.filter.cost``). ``custom`` policies come from a string
``"LABEL=0.5,OTHER=0.7"``, a JSON object, or a JSON file with ``{"thresholds": {...}}``.

A policy is checked against the models it runs with (:func:`check_policy_labels`, called by
``SafetyFilter``): a label given by the user (override, ``custom``, policy file) that no
loaded model can emit is an error (a typo would otherwise switch that class off), and so
is a policy under which no label of any loaded model has a threshold. A preset's own
labels may be absent from the models (``strict-5`` with only ``opennsfw`` is legitimate:
the classifier's sidecar threshold applies).
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import PolicyError

STRICT_5 = (
    "ANUS_EXPOSED", "BUTTOCKS_EXPOSED", "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED", "MALE_GENITALIA_EXPOSED",
)
BROAD_9 = STRICT_5 + ("MALE_BREAST_EXPOSED", "BELLY_EXPOSED", "FEET_EXPOSED", "ARMPITS_EXPOSED")
FACES = ("FACE_FEMALE", "FACE_MALE")

MASK_SHAPES = ("rect", "ellipse")


@dataclass(frozen=True)
class Policy:
    """Per-label thresholds plus box handling.

    ``expand`` grows each flagged box by that fraction of its width and height on every
    side (NudeNet boxes are often tight or off-centre); ``shape`` is the mask shape.
    ``use_model_defaults`` lets a classifier's sidecar thresholds apply to labels the
    policy does not name.
    """

    name: str
    thresholds: dict[str, float] = field(default_factory=dict)
    expand: float = 0.1
    shape: str = "rect"
    use_model_defaults: bool = True
    #: Labels that come from a built-in preset (not typed by a user): they may be absent
    #: from the loaded models. Every other label must be one a loaded model can emit.
    preset_labels: frozenset = frozenset()

    def __post_init__(self):
        for label, t in self.thresholds.items():
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= float(t) < 1.0:
                raise PolicyError(
                    f"Threshold for {label} must be a number in [0, 1), got {t!r}"
                    + (": a threshold of 1 is never reached, which would switch the label off; leave the "
                       "label out of the policy instead." if not isinstance(t, bool) and t == 1 else ".")
                )
        if not 0.0 <= self.expand <= 2.0:
            raise PolicyError(f"Box expansion must be in [0, 2], got {self.expand}.")
        if self.shape not in MASK_SHAPES:
            raise PolicyError(f"Mask shape must be one of {MASK_SHAPES}, got {self.shape!r}.")

    def threshold(self, label: str, model_defaults: dict[str, float]) -> float | None:
        """The score at which ``label`` is unsafe, or ``None`` if it never is."""
        if label in self.thresholds:
            return float(self.thresholds[label])
        if self.use_model_defaults and label in model_defaults:
            return float(model_defaults[label])
        return None

    def with_overrides(self, overrides: dict[str, float] | None = None, **kw) -> Policy:
        th = dict(self.thresholds)
        th.update(overrides or {})
        kw.setdefault("preset_labels", frozenset(self.preset_labels) - set(overrides or {}))
        return replace(self, thresholds=th, **kw)

    def to_dict(self) -> dict:
        return {"name": self.name, "thresholds": dict(self.thresholds), "expand": self.expand,
                "shape": self.shape, "use_model_defaults": self.use_model_defaults}


PRESETS = {
    "strict-5": Policy("strict-5", dict.fromkeys(STRICT_5, 0.6), preset_labels=frozenset(STRICT_5)),
    "broad-9": Policy("broad-9", dict.fromkeys(BROAD_9, 0.6), preset_labels=frozenset(BROAD_9)),
    "face-only": Policy("face-only", dict.fromkeys(FACES, 0.5), preset_labels=frozenset(FACES)),
}
DEFAULT_POLICY = "strict-5"

_PAIR = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*[=:]\s*([0-9]*\.?[0-9]+)\s*$")


def parse_thresholds(text: str) -> dict[str, float]:
    """``"A=0.5, B=0.7"`` or a JSON object -> ``{"A": 0.5, "B": 0.7}``."""
    text = text.strip()
    if not text:
        return {}
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise PolicyError(f"Thresholds are not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise PolicyError("Thresholds JSON must be an object of label -> score.")
        return {str(k): _num(k, v) for k, v in data.items()}
    out = {}
    for part in re.split(r"[,;\n]", text):
        if not part.strip():
            continue
        m = _PAIR.match(part)
        if not m:
            raise PolicyError(f"Cannot read threshold {part.strip()!r}; write LABEL=0.5.")
        out[m.group(1)] = _num(m.group(1), m.group(2))
    return out


def _num(label, v) -> float:
    if isinstance(v, bool) or v is None:   # JSON true would read as 1.0: the label switched off
        raise PolicyError(f"Threshold for {label} is not a number: {v!r}")
    try:
        return float(v)
    except (TypeError, ValueError) as exc:
        raise PolicyError(f"Threshold for {label} is not a number: {v!r}") from exc


POLICY_FILE_KEYS = ("name", "thresholds", "expand", "shape", "use_model_defaults")


def _policy_file(path: str) -> Policy:
    """A JSON policy file; unknown keys and wrongly typed values are errors (a misspelt
    ``"treshold"`` would otherwise leave a policy that checks nothing)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise PolicyError(f"Policy file {path} must hold a JSON object with {', '.join(POLICY_FILE_KEYS)}.")
    unknown = sorted(set(data) - set(POLICY_FILE_KEYS))
    if unknown:
        raise PolicyError(f"Policy file {path}: unknown key(s) {', '.join(map(repr, unknown))}; the keys are "
                          f"{', '.join(POLICY_FILE_KEYS)}.")
    th = data.get("thresholds")
    if not isinstance(th, dict) or not th:
        raise PolicyError(f"Policy file {path}: 'thresholds' must be a non-empty object of label -> score.")
    if "expand" in data and (isinstance(data["expand"], bool) or not isinstance(data["expand"], (int, float))):
        raise PolicyError(f"Policy file {path}: 'expand' must be a number, got {data['expand']!r}.")
    if "use_model_defaults" in data and not isinstance(data["use_model_defaults"], bool):
        raise PolicyError(f"Policy file {path}: 'use_model_defaults' must be true or false.")
    if not isinstance(data.get("name", ""), str):
        raise PolicyError(f"Policy file {path}: 'name' must be a string.")
    return Policy(data.get("name", Path(path).stem), {str(k): _num(k, v) for k, v in th.items()},
                  **{k: data[k] for k in ("expand", "shape", "use_model_defaults") if k in data})


def get_policy(name: str = DEFAULT_POLICY, overrides: str | dict | None = None, **kw) -> Policy:
    """A preset by name, ``custom`` (only ``overrides``), or a JSON policy file's path."""
    extra = parse_thresholds(overrides) if isinstance(overrides, str) else dict(overrides or {})
    if name in PRESETS:
        base = PRESETS[name]
    elif name == "custom":
        if not extra:
            raise PolicyError("The custom policy needs thresholds, e.g. FEMALE_BREAST_EXPOSED=0.5.")
        base = Policy("custom")
    elif name.endswith(".json") and Path(name).is_file():
        try:
            base = _policy_file(name)
        except PolicyError:
            raise
        except (ValueError, TypeError, AttributeError) as exc:
            raise PolicyError(f"Policy file {name} is malformed: {exc}") from exc
    else:
        raise PolicyError(f"Unknown policy {name!r}; use {', '.join(PRESETS)}, custom, or a .json file.")
    return base.with_overrides(extra, **kw)


def _suggest(label: str, valid: list[str]) -> str:
    """`` Did you mean 'X'?`` for the closest valid label (case-insensitive), or ``""``."""
    upper = {v.upper(): v for v in valid}
    if label.upper() in upper:
        return f" Did you mean {upper[label.upper()]!r}? (labels are case-sensitive)"
    close = difflib.get_close_matches(label.upper(), list(upper), n=1, cutoff=0.6)
    return f" Did you mean {upper[close[0]]!r}?" if close else ""


def check_policy_labels(policy: Policy, models: dict[str, tuple[list[str], dict[str, float]]]) -> None:
    """Refuse a policy that would silently switch (part of) the filter off with ``models``
    (model name -> (labels it emits, its sidecar thresholds)).

    * every threshold label that is not a preset's own label must be emitted by some model
      (a typo or a wrong case would never match a detection): :class:`PolicyError` naming
      the label, the closest valid one and all valid labels;
    * some label of some model must have a threshold, else nothing could ever be flagged.
    """
    valid = sorted({lab for labels, _ in models.values() for lab in labels})
    known = set(valid)
    names = ", ".join(models) or "none"
    unknown = [lab for lab in policy.thresholds if lab not in known and lab not in policy.preset_labels]
    if unknown:
        lines = [f"{lab!r} is not a label of the loaded model(s) ({names}).{_suggest(lab, valid)}"
                 for lab in unknown]
        raise PolicyError(
            f"Policy {policy.name!r}: " + " ".join(lines) + f" Valid labels: {', '.join(valid) or 'none'}."
        )
    judged = (policy.threshold(lab, defaults) for labels, defaults in models.values() for lab in labels)
    if all(t is None for t in judged):
        example = valid[0] if valid else "LABEL"
        raise PolicyError(
            f"Policy {policy.name!r} gives none of the labels of the loaded model(s) ({names}) a threshold, "
            f"so nothing could ever be flagged. Give one a threshold (e.g. {example}=0.5) "
            f"or use other models. Valid labels: {', '.join(valid) or 'none'}."
        )
