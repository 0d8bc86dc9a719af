"""Sampler layer: safety guidance applied to each denoising step.

``sld``: Safe Latent Diffusion (CVPR 2023), exact. Hosts: ``nodes/guidance_nodes.py``
(ComfyUI) and :mod:`safet2i.diffusers_adapter`.
"""

from .sld import DEFAULT_CONCEPT, PRESETS as SLD_PRESETS, SEXUAL_CONCEPT, SLDConfig, SLDGuidance, SLDState, sld_direction
from .spaces import denoised_to_eps, eps_to_denoised

__all__ = [
    "DEFAULT_CONCEPT", "SEXUAL_CONCEPT", "SLD_PRESETS", "SLDConfig", "SLDGuidance", "SLDState",
    "denoised_to_eps", "eps_to_denoised", "sld_direction",
]
