"""Prompt layer: SAFREE-style steering of the text conditioning away from a toxic-concept
subspace (Yoon et al., ICLR 2025). Host-agnostic: hosts pass encoder callables."""

from .concepts import CONCEPT_PRESETS, load_concepts
from .safree import (
    ORDERS, SVF_PRESETS, SteerResult, concept_projector, project_rows, projector, steer_chunk, steer_sequence,
    svf_steps, trigger_tokens,
)

__all__ = [
    "CONCEPT_PRESETS", "ORDERS", "SVF_PRESETS", "SteerResult", "concept_projector", "load_concepts",
    "project_rows", "projector", "steer_chunk", "steer_sequence", "svf_steps", "trigger_tokens",
]
