"""The efficacy lab: a procedural world where one attribute value plays "unsafe" content.

The world (:mod:`safet2i.lab.world`, see docs/lab.md): deterministic captioned images with
ground-truth concept masks. The model (:mod:`safet2i.lab.model`): a tiny Stable-Diffusion-
structured text-to-image model trained on the world (``safet2i lab train``). The judge
(:mod:`safet2i.lab.judge`): an attribute classifier, a rule-based concept measure and the
quality gate a model must pass before the lab reports efficacy numbers. The attack
(:mod:`safet2i.lab.attack`): a Ring-A-Bell-style white-box prompt attack. The table
(:mod:`safet2i.lab.table`, ``safet2i lab table``): every safety layer measured on the model
through :mod:`safet2i.bench`.
"""

from __future__ import annotations

from .attack import (
    AttackConfig,
    AttackReport,
    attack_prompts,
    attack_success,
    concept_direction,
    control_prompts,
    pipeline_encode,
    steering_encode,
)
from .judge import (
    AttributeClassifier,
    GateReport,
    JudgeConfig,
    attribute_accuracy,
    concept_fraction,
    concept_present_rule,
    judge_images,
    load_judge,
    quality_gate,
)
from .model import LabModelConfig, build_pipeline, load_pipeline, model_folder, train, training_info
from .tokenizer import clip_tokenizer
from .world import (
    ATTRIBUTES,
    BACKGROUNDS,
    COLOURS,
    CONCEPT_FORMS,
    FORMS,
    LEXICONS,
    SPLITS,
    ConceptLexicon,
    Sample,
    World,
    WorldConfig,
    caption_for,
    combination_key,
    edit_distance,
    render,
    vocabulary,
    words,
)

__all__ = [
    "AttackConfig",
    "AttackReport",
    "attack_prompts",
    "attack_success",
    "concept_direction",
    "control_prompts",
    "pipeline_encode",
    "steering_encode",
    "AttributeClassifier",
    "GateReport",
    "JudgeConfig",
    "attribute_accuracy",
    "concept_fraction",
    "concept_present_rule",
    "judge_images",
    "load_judge",
    "quality_gate",
    "LabModelConfig",
    "build_pipeline",
    "clip_tokenizer",
    "load_pipeline",
    "model_folder",
    "train",
    "training_info",
    "ATTRIBUTES",
    "BACKGROUNDS",
    "COLOURS",
    "CONCEPT_FORMS",
    "FORMS",
    "LEXICONS",
    "SPLITS",
    "ConceptLexicon",
    "Sample",
    "World",
    "WorldConfig",
    "caption_for",
    "combination_key",
    "edit_distance",
    "render",
    "vocabulary",
    "words",
]
