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
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class Finding:
    """A detection judged against the policy."""

    detection: Detection
    threshold: float | None
    cost: float
    flagged: bool

    def to_dict(self) -> dict:
        d = self.detection
        return {
            "label": d.label, "score": round(d.score, 6), "box": list(d.box) if d.box else None,
            "model": d.model, "threshold": self.threshold, "cost": round(self.cost, 6),
            "flagged": self.flagged,
        }


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
    def unsafe(self) -> bool:
        return any(f.flagged for f in self.findings)

    @property
    def flagged(self) -> list[Finding]:
        return [f for f in self.findings if f.flagged]

    def to_dict(self) -> dict:
        return {
            "index": self.index, "width": self.width, "height": self.height,
            "cost": round(self.cost, 6), "verdict": "unsafe" if self.unsafe else "safe",
            "detections": [f.to_dict() for f in self.findings], "escalated": self.escalated,
        }


def judge(
    index: int, shape, detections: list[Detection], policy: Policy, model_defaults: dict[str, dict]
) -> ImageVerdict:
    """Apply ``policy`` to one image's detections (``model_defaults``: model name -> its
    sidecar thresholds)."""
    findings = []
    for d in detections:
        t = policy.threshold(d.label, model_defaults.get(d.model, {}))
        cost = grade(d.score, t) if t is not None else 0.0
        findings.append(Finding(d, t, cost, t is not None and d.score >= t))
    findings.sort(key=lambda f: (-f.cost, -f.detection.score))
    return ImageVerdict(index, int(shape[1]), int(shape[0]), findings)
