"""Safe Latent Diffusion (SLD): Schramowski, Brack, Deiseroth, Kersting, "Safe Latent
Diffusion: Mitigating Inappropriate Degeneration in Diffusion Models", CVPR 2023
(arXiv 2211.05105), exactly as the reference pipeline computes it.

Per step i, on noise predictions ε_∅ (unconditional / negative), ε_p (prompt) and ε_S
(safety concept), elementwise over the latent::

    d_p = ε_p − ε_∅
    Δ   = ε_p − ε_S
    μ   = min(1, s_S · |Δ|)  where Δ < λ, else 0            (Eq. 5, 6)
    γ   = μ ⊙ (ε_S − ε_∅) + s_m · ν                          (Eq. 4, 7)
    ν  ← β_m · ν + (1 − β_m) · γ        (every step, warm-up included; Eq. 8)
    d_p ← d_p − γ                        (only when i ≥ δ; Eq. 3)
    ε̂   = ε_∅ + s_g · d_p

SLD is off when s_S ≤ 1 (and, in hosts, when CFG ≤ 1), as in the reference pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .contract import Guidance, RunState

#: Warm-up is defined in steps of a 50-step schedule (the paper's setting).
REFERENCE_STEPS = 50

#: The default safety concept of the reference pipeline (diffusers' ``safety_concept``).
DEFAULT_CONCEPT = (
    "an image showing hate, harassment, violence, suffering, humiliation, harm, suicide, sexual, "
    "nudity, bodily fluids, blood, obscene gestures, illegal activity, drug use, theft, vandalism, "
    "weapons, child abuse, brutality, cruelty"
)
#: A sexual-content-only concept for nudity-focused use.
SEXUAL_CONCEPT = "sexual, nudity, naked, nude, porn, explicit, genitalia, exposed breasts"


@dataclass(frozen=True)
class SLDConfig:
    """SLD hyper-parameters: s_S, δ (in 50-step units), λ, s_m, β_m."""

    guidance_scale: float = 1000.0
    warmup_steps: int = 10
    threshold: float = 0.01
    momentum_scale: float = 0.3
    mom_beta: float = 0.4

    @property
    def enabled(self) -> bool:
        return self.guidance_scale > 1.0

    def warmup_for(self, num_steps: int) -> int:
        """δ scaled from the 50-step schedule to ``num_steps`` (our convention, documented;
        the paper defines presets for 50 steps only)."""
        return int(round(self.warmup_steps * num_steps / REFERENCE_STEPS))

    def with_(self, **kw) -> SLDConfig:
        return replace(self, **kw)


#: Presets from the model card AIML-TUDA/stable-diffusion-safe (the paper's Hyp-* configs).
#: diffusers' ``SafetyConfig.WEAK`` uses s_S = 20 instead of the card's 200 (and β_m 0.0):
#: available as ``WEAK-DIFFUSERS`` for parity.
PRESETS: dict[str, SLDConfig] = {
    "WEAK": SLDConfig(200.0, 15, 0.0, 0.0, 0.0),
    "MEDIUM": SLDConfig(1000.0, 10, 0.01, 0.3, 0.4),
    "STRONG": SLDConfig(2000.0, 7, 0.025, 0.5, 0.7),
    "MAX": SLDConfig(5000.0, 0, 1.0, 0.5, 0.7),
    "WEAK-DIFFUSERS": SLDConfig(20.0, 15, 0.0, 0.0, 0.0),
}

#: The model card's presets (without diffusers' variant): the choices for an SLD gate.
CARD_PRESETS = ("WEAK", "MEDIUM", "STRONG", "MAX")


class SLDState(RunState):
    """Per-run state: the momentum ν besides the common step count and history; ``warmup``
    is δ in this run's model evaluations."""

    def __init__(self, warmup: int):
        self.warmup = int(warmup)
        super().__init__()

    def reset(self, warmup: int | None = None) -> None:
        if warmup is not None:
            self.warmup = int(warmup)
        super().reset()
        self.momentum: torch.Tensor | None = None


def sld_gate(eps_cond: torch.Tensor, eps_safety: torch.Tensor, config: SLDConfig) -> torch.Tensor:
    """μ = min(1, s_S · |Δ|) where Δ = ε_p − ε_S < λ, else 0 (Eq. 5, 6); also Detect-and-Guide's gate."""
    delta = eps_cond - eps_safety
    scale = torch.clamp(delta.abs() * config.guidance_scale, max=1.0)
    return torch.where(delta >= config.threshold, torch.zeros_like(scale), scale)


def sld_direction(
    eps_uncond: torch.Tensor,
    eps_cond: torch.Tensor,
    eps_safety: torch.Tensor,
    config: SLDConfig,
    state: SLDState,
) -> torch.Tensor:
    """The safety-guided CFG direction d_p for the current step (advances ``state``).

    The caller forms ε̂ = ε_∅ + s_g · d_p. Inputs are not modified.
    """
    d_p = eps_cond - eps_uncond
    if not config.enabled:
        state.advance({"applied": False, "gate": 0.0}, state.last_mask)
        return d_p
    if state.momentum is None or state.momentum.shape != d_p.shape:
        state.momentum = torch.zeros_like(d_p)
    mu = sld_gate(eps_cond, eps_safety, config)
    gamma = mu * (eps_safety - eps_uncond) + config.momentum_scale * state.momentum
    state.momentum = config.mom_beta * state.momentum + (1.0 - config.mom_beta) * gamma
    applied = state.step >= state.warmup
    mask = (mu > 0).to(d_p.dtype).mean(1) if applied else torch.zeros_like(d_p[:, 0])
    state.advance({"applied": applied, "gate": float((mu > 0).float().mean())}, mask)
    return d_p - gamma if applied else d_p


class SLDGuidance(Guidance):
    """SLD under the guidance contract (:mod:`.contract`): ``set_state`` (or ``reset``) at the
    start of a run, then ``direction(ε_∅, ε_p, ε_S)`` once per model evaluation.

    ``warmup``: ``"scaled"`` (δ scaled from 50 steps to the run's ``total``, default),
    ``"raw"`` (δ as given, like the reference pipeline), or an explicit step count.
    """

    name = "SLD"
    elementwise = True

    def __init__(self, config: SLDConfig | str = "MEDIUM", warmup: str | int = "scaled", **window):
        self.config = PRESETS[config.upper()] if isinstance(config, str) else config
        self.warmup = warmup
        super().__init__(**window)

    def _warmup(self, num_steps: int | None) -> int:
        if isinstance(self.warmup, int):
            return self.warmup
        if self.warmup == "scaled" and num_steps:
            return self.config.warmup_for(num_steps)
        return self.config.warmup_steps

    def new_state(self, total: int | None) -> SLDState:
        return SLDState(self._warmup(total))

    @property
    def inert(self) -> bool:
        return not self.config.enabled

    def compute(self, eps_uncond, eps_cond, eps_safety, attention=None) -> torch.Tensor:
        return sld_direction(eps_uncond, eps_cond, eps_safety, self.config, self.state)
