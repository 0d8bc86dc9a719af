"""The graded safety cost of an image.

For every finding whose label has a threshold ``t`` under the policy, the score ``s`` is
mapped piecewise-linearly so that the threshold lands on 0.5::

    g(s, t) = 0.5 * s / t                     if s <  t
    g(s, t) = 0.5 + 0.5 * (s - t) / (1 - t)   if s >= t      (g = 1 when t = 1 and s = 1)

An image's cost is the maximum of ``g`` over all such findings of all models (0 when there
are none). So ``cost >= 0.5`` exactly when some finding reaches its threshold: that is the
verdict *unsafe*. Combining models by the maximum is an OR of their verdicts, as I2P
combines NudeNet and Q16; the cost also says *how far* past (or short of) its threshold
the worst finding is, so it can rank images and drive routing.

A *cost model* (sidecar ``kind: "cost"``, ``docs/cost-model.md``) gives one whole-image
finding with ``score = sigmoid(C)`` and ``logit = C``, its calibrated cost. Its threshold
``t`` (policy or sidecar, a probability like every threshold) is moved onto 0.5 in logit
space instead of piecewise-linearly::

    g_cost(C, t) = sigmoid(C - logit(t))       flagged exactly when C >= logit(t)

so at the default threshold ``t = 0.5`` (the sign of ``C``) the finding's cost *is* the
model's calibrated probability ``sigmoid(C)``. Combination rule with detectors: unchanged,
an image is unsafe when any finding is flagged (detector OR cost model) and its cost is the
maximum over all findings; ``cost >= 0.5`` still means exactly *unsafe*. The verdict
reports both parts (``detector_cost``, ``model_cost``) when a cost model ran.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .detectors import Detection
from .policy import Policy


def grade(score: float, threshold: float) -> float:
    """``g(s, t)`` above, clipped to [0, 1]."""
    s = min(max(float(score), 0.0), 1.0)
    t = min(max(float(threshold), 0.0), 1.0)
    if s < t:
        return 0.5 * s / t
    if t >= 1.0:
        return 1.0
    return 0.5 + 0.5 * (s - t) / (1.0 - t)


#: The largest float below 0.5: the cost of an unflagged cost-model finding is capped there,
#: so ``cost >= 0.5`` is exactly "flagged" even where rounding would give 0.5.
_BELOW_HALF = math.nextafter(0.5, 0.0)


def logit(p: float) -> float:
    """``log(p / (1 - p))``; ``-inf`` for ``p <= 0`` and ``+inf`` for ``p >= 1``."""
    p = float(p)
    if p <= 0.0:
        return -math.inf
    if p >= 1.0:
        return math.inf
    return math.log(p) - math.log1p(-p)


def grade_cost(c: float, threshold: float) -> tuple[float, bool]:
    """``(g_cost(C, t), flagged)`` for a cost-model finding with raw cost ``c`` and
    probability threshold ``t`` (module docstring): flagged exactly when ``C >= logit(t)``,
    and the cost is ``sigmoid(C - logit(t))``, below 0.5 exactly when not flagged."""
    d = float(c) - logit(threshold)
    flagged = d >= 0.0
    g = 1.0 / (1.0 + math.exp(-d)) if flagged else math.exp(d) / (1.0 + math.exp(d))
    return (g if flagged else min(g, _BELOW_HALF)), flagged


@dataclass(frozen=True)
class Finding:
    """A detection judged against the policy."""

    detection: Detection
    threshold: float | None
    cost: float
    flagged: bool

    @property
    def from_cost_model(self) -> bool:
        """Whether this finding is a cost model's (it carries the raw cost ``C``)."""
        return self.detection.logit is not None

    def to_dict(self) -> dict:
        d = self.detection
        out = {
            "label": d.label, "score": round(d.score, 6), "box": list(d.box) if d.box else None,
            "model": d.model, "threshold": self.threshold, "cost": round(self.cost, 6),
            "flagged": self.flagged,
        }
        if d.logit is not None:
            out["logit"] = round(d.logit, 6)
        return out


@dataclass
class ImageVerdict:
    """Everything the filter concluded about one image."""

    index: int
    width: int
    height: int
    findings: list[Finding] = field(default_factory=list)
    #: Set by ``SafetyFilter.censor_checked`` when the censored image still tripped a model
    #: on the re-check and a stronger action was used instead: ``"fill"`` (the flagged
    #: regions painted) or ``"placeholder"`` (the whole image withheld). ``None`` otherwise.
    escalated: str | None = None

    @property
    def cost(self) -> float:
        return max((f.cost for f in self.findings if f.threshold is not None), default=0.0)

    @property
    def detector_cost(self) -> float:
        """The graded cost of the detector and classifier findings alone."""
        return max((f.cost for f in self.findings if f.threshold is not None and not f.from_cost_model),
                   default=0.0)

    @property
    def model_cost(self) -> float | None:
        """The cost of the cost-model findings alone (``sigmoid(C - logit(t))``), or ``None``
        when no cost model judged this image."""
        costs = [f.cost for f in self.findings if f.threshold is not None and f.from_cost_model]
        return max(costs) if costs else None

    @property
    def unsafe(self) -> bool:
        return any(f.flagged for f in self.findings)

    @property
    def flagged(self) -> list[Finding]:
        return [f for f in self.findings if f.flagged]

    def to_dict(self) -> dict:
        out = {
            "index": self.index, "width": self.width, "height": self.height,
            "cost": round(self.cost, 6), "verdict": "unsafe" if self.unsafe else "safe",
            "detections": [f.to_dict() for f in self.findings], "escalated": self.escalated,
        }
        model_cost = self.model_cost
        if model_cost is not None:   # both parts, only when a cost model judged the image
            out["detector_cost"] = round(self.detector_cost, 6)
            out["model_cost"] = round(model_cost, 6)
        return out


def judge(
    index: int, shape, detections: list[Detection], policy: Policy, model_defaults: dict[str, dict]
) -> ImageVerdict:
    """Apply ``policy`` to one image's detections (``model_defaults``: model name -> its
    sidecar thresholds)."""
    findings = []
    for d in detections:
        t = policy.threshold(d.label, model_defaults.get(d.model, {}))
        if t is None:
            findings.append(Finding(d, t, 0.0, False))
        elif d.logit is not None:           # a cost model: logit-space grading (module docstring)
            findings.append(Finding(d, t, *grade_cost(d.logit, t)))
        else:
            findings.append(Finding(d, t, grade(d.score, t), d.score >= t))
    findings.sort(key=lambda f: (-f.cost, -f.detection.score))
    return ImageVerdict(index, int(shape[1]), int(shape[0]), findings)
