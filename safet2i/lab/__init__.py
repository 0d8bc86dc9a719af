"""The efficacy lab: a procedural world where one attribute value plays "unsafe" content.

The world (:mod:`safet2i.lab.world`, see docs/lab.md): deterministic captioned images with
ground-truth concept masks. The model (:mod:`safet2i.lab.model`): a tiny Stable-Diffusion-
structured text-to-image model trained on the world (``safet2i lab train``). The bench and
the results table are later parts of the lab.
"""

from __future__ import annotations

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
