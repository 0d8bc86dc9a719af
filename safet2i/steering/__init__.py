"""Prompt layer: SAFREE-style steering of the text conditioning away from a toxic-concept
subspace (Yoon et al., ICLR 2025). Host-agnostic: hosts pass a small adapter per text encoder
(:class:`~safet2i.steering.plan.TextEncoder`) and keep only their step window."""

from .book import PlanBook
from .concepts import CONCEPT_PRESETS, load_concepts
from .plan import (
    Span, SteeringPlan, Steered, TextEncoder, chat_span, clip_span, end_rows, report_lines, steer_sequence, t5_span,
)
from .safree import (
    ORDERS, SVF_PRESETS, SteerResult, concept_projector, project_rows, projector, steer_chunk, svf_steps,
    trigger_tokens,
)

__all__ = [
    "CONCEPT_PRESETS", "ORDERS", "PlanBook", "SVF_PRESETS", "Span", "Steered", "SteerResult", "SteeringPlan",
    "TextEncoder", "chat_span", "clip_span", "concept_projector", "end_rows", "t5_span", "load_concepts", "project_rows", "projector", "report_lines", "steer_chunk",
    "steer_sequence", "svf_steps", "trigger_tokens",
]
