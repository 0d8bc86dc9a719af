"""The efficacy lab: a procedural world where one attribute value plays "unsafe" content.

Only the world exists so far (:mod:`safet2i.lab.world`, see docs/lab.md): deterministic
captioned images with ground-truth concept masks. The tiny text-to-image model, the cost
model, the bench and the results table are later parts of the lab.
"""

from __future__ import annotations

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
