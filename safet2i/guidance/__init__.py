"""Sampler layer: safety guidance applied to each denoising step.

* ``sld``: Safe Latent Diffusion (Schramowski et al., CVPR 2023), exact.
* ``spguard``: SP-Guard-style prompt-adaptive, masked guidance (after Yu & Moon, 2025).
* ``dag``: Detect-and-Guide-style region guidance from cross-attention (after Li et al., CVPR 2025).

Every method follows the contract of :mod:`.contract`: ``needs`` (what the host evaluates),
``set_state(step, total, sigma, run)`` (the core decides when a run starts) and
``direction(ε_∅, ε_p, ε_concept[, attention])`` returning the guided CFG direction d_p (the
host forms ε̂ = ε_∅ + s_g · d_p, fed the correction of :meth:`.contract.Guidance.correction`;
on guidance-distilled models at cfg 1 the concept-branch form); each is a pure function on tensors plus a small state.
Conversions between host spaces and ε: :mod:`.spaces`. Hosts: ``nodes/guidance_nodes.py``
(ComfyUI), ``extension/safet2i_a1111`` (A1111/Forge/reForge), :mod:`safet2i.diffusers_adapter`.
"""

from .contract import Guidance, Needs, RunState
from .dag import DAGConfig, DAGGuidance, aggregate_attention, dag_direction, region_scales, token_attention
from .sld import DEFAULT_CONCEPT, PRESETS as SLD_PRESETS, SEXUAL_CONCEPT, SLDConfig, SLDGuidance, SLDState, \
    sld_direction, sld_gate
from .registry import METHODS, make_method
from .spaces import FLOW_SPACES, SPACES, correct_prediction, denoised_to_eps, eps_offset_free, eps_to_denoised, eps_to_v, from_eps, \
    shift_denoised, slope, to_eps, v_to_eps
from .spguard import SPGuardConfig, SPGuardGuidance, SPGuardState, spguard_direction

__all__ = [
    "DAGConfig", "DAGGuidance", "DEFAULT_CONCEPT", "FLOW_SPACES", "SPACES", "correct_prediction", "eps_offset_free", "slope", "Guidance", "METHODS", "Needs", "RunState", "SEXUAL_CONCEPT", "SLD_PRESETS",
    "SLDConfig", "SLDGuidance", "SLDState", "SPGuardConfig", "SPGuardGuidance", "SPGuardState", "aggregate_attention",
    "dag_direction", "denoised_to_eps", "eps_to_denoised", "eps_to_v", "from_eps", "make_method", "region_scales", "shift_denoised",
    "sld_direction", "sld_gate", "spguard_direction", "to_eps", "token_attention", "v_to_eps",
]
