"""Sampler layer: safety guidance applied to each denoising step.

* ``sld``: Safe Latent Diffusion (Schramowski et al., CVPR 2023), exact.
* ``spguard``: SP-Guard-style prompt-adaptive, masked guidance (after Yu & Moon, 2025).
* ``dag``: Detect-and-Guide-style region guidance from cross-attention (after Li et al., CVPR 2025).

Every method is an object with ``reset(num_steps)`` and ``direction(ε_∅, ε_p, ε_concept, ...)``
returning the guided CFG direction d_p (the host forms ε̂ = ε_∅ + s_g · d_p). Hosts:
``nodes/guidance_nodes.py`` (ComfyUI) and :mod:`safet2i.diffusers_adapter`.
"""

from .dag import DAGConfig, DAGGuidance, aggregate_attention, region_scales, token_attention
from .sld import DEFAULT_CONCEPT, PRESETS as SLD_PRESETS, SEXUAL_CONCEPT, SLDConfig, SLDGuidance, SLDState, sld_direction
from .spaces import denoised_to_eps, eps_to_denoised
from .spguard import SPGuardConfig, SPGuardGuidance

__all__ = [
    "DAGConfig", "DAGGuidance", "DEFAULT_CONCEPT", "SEXUAL_CONCEPT", "SLD_PRESETS", "SLDConfig",
    "SLDGuidance", "SLDState", "SPGuardConfig", "SPGuardGuidance", "aggregate_attention",
    "denoised_to_eps", "eps_to_denoised", "region_scales", "sld_direction", "token_attention",
]
