"""Prompt layer: SAFREE-style steering of the text conditioning away from a toxic-concept
subspace (Yoon et al., ICLR 2025). Host-agnostic: hosts pass a small adapter per text encoder
(:class:`~safet2i.steering.plan.TextEncoder`) and keep only their step window."""

from .book import PlanBook
from .concepts import CONCEPT_PRESETS, load_concepts
from .plan import SteeringPlan, Steered, TextEncoder, end_rows, report_lines, steer_sequence
from .safree import (
    ORDERS, SVF_PRESETS, SteerResult, concept_projector, project_rows, projector, steer_chunk, svf_steps,
    trigger_tokens,
)

__all__ = [
    "CONCEPT_PRESETS", "ORDERS", "PlanBook", "SVF_PRESETS", "Steered", "SteerResult", "SteeringPlan", "TextEncoder",
    "concept_projector", "end_rows", "load_concepts", "project_rows", "projector", "report_lines", "steer_chunk",
    "steer_sequence", "svf_steps", "trigger_tokens",
]
