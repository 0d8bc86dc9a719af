"""One job's SafeT2I state (:class:`Job`) and the job being generated.

A failed job (:meth:`Job.fail`) has its images blocked: every later hook checks ``failed``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from . import lora as lora_layer
from . import weights as weights_layer
from .config import JobConfig
from .guidance import GuidanceHook
from .settings import enforcement
from .steering import SteeringHook

log = logging.getLogger("safet2i")

@dataclass
class Job:
    cfg: JobConfig
    p: object = None
    hook: GuidanceHook | None = None
    error: str | None = None
    verdicts: dict[int, str] = field(default_factory=dict)
    restore: list = field(default_factory=list)
    steering: SteeringHook | None = None          # prompt layer (steering.py)
    lora: lora_layer.SafetyLora | None = None     # model layer (lora.py)
    weights: weights_layer.SafetyWeights | None = None   # model layer (weights.py): full safety weights
    steering_texts: list = field(default_factory=list)   # the texts of the current batch (report)
    steering_settings: object = None              # the job's effective SteeringSettings (set in process)
    concept: object = None                        # Forge/reForge: the concept embedding of the batch
    runs: list = field(default_factory=list)      # guidance hooks / UNet-patch runs (steps_guided each)
    guided_mark: int = 0                          # guided steps counted at the last check
    steer_mark: int = 0                           # steering callback calls counted at the last check

    def fail(self, where: str, exc: object = None) -> None:
        """Mark the job failed (its images are blocked) and log why: ``where: exc``, or ``where``."""
        self.error = where if exc is None else f"{where}: {exc}"
        log.error("SafeT2I: %s; images of this job will be blocked", self.error)

    @property
    def failed(self) -> str | None:
        return self.error or (self.hook.error if self.hook else None)

    def guided_steps(self) -> int:
        return sum(getattr(r, "steps_guided", 0) for r in self.runs)

    def check_guided(self, where: str) -> None:
        """Guidance must have guided at least one step since the last check; else (callbacks
        removed, a sampler or extension that bypasses them, an interrupted pass) the images
        are blocked rather than passed unguided."""
        if not self.cfg.guidance_active or self.failed:
            return
        now = self.guided_steps()
        if now <= self.guided_mark:
            self.fail(f"safety guidance did not run in the {where} (no guided step: another extension or the "
                      "sampler bypassed it)")
        self.guided_mark = now

    def check_steered(self, where: str) -> None:
        """Steering must have seen the conditioning at least once since the last check; else
        (callback removed, a sampler that bypasses ``on_cfg_denoiser``) the images are
        blocked rather than passed with an unsteered prompt."""
        if not self.cfg.steering_enabled or self.failed:
            return
        now = self.steering.calls if self.steering is not None else 0
        if now <= self.steer_mark:
            self.fail(f"concept steering did not run in the {where} (its conditioning callback never fired: "
                      "another extension or the sampler bypassed it)")
        self.steer_mark = now

    def check_weights(self, p, where: str, full: bool = True) -> None:
        """The full safety weights are still in the model the job samples with (a model
        switched or reloaded mid-job would otherwise run with infotext saying "verified").
        After each sampling pass every tensor is compared (``full``); before one, only that
        the model and its part are the same objects (so nothing is sampled in vain)."""
        sw = self.weights
        if sw is None or sw.restored or self.failed:
            return
        try:
            weights_layer.check_applied(sw, getattr(p if p is not None else self.p, "sd_model", None), where, full)
        except Exception as exc:  # noqa: BLE001 - fail closed: any error in the layer blocks the job
            self.fail("safety weights", exc)

    def check_layers(self, where: str, p=None) -> None:
        self.check_guided(where)
        self.check_steered(where)
        self.check_weights(p, where)


_ACTIVE: list[Job] = []   # the job being generated (the webui runs one at a time)


def current_job() -> Job | None:
    return _ACTIVE[-1] if _ACTIVE else None


def _job(p) -> Job | None:
    return getattr(p, "_safet2i_job", None)


def _fallback_config() -> JobConfig:
    """Defaults (filter on) for a job whose own arguments could not be used; built without
    ``from_args`` in case that is what failed."""
    cfg = JobConfig()
    try:
        enforce = enforcement()
    except Exception:  # noqa: BLE001 - fail closed: whatever broke, enforce the strictest handling
        enforce = {"policy": "strict-5", "action": "placeholder"}
    if enforce:
        cfg.enforced, cfg.filter_enabled = True, True
        cfg.filter_policy, cfg.filter_action = enforce["policy"], enforce["action"]
    return cfg
