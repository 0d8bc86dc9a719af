"""The guidance methods by name: one list for every host's choices (A1111 dropdown, settings)."""

from __future__ import annotations

from .contract import Guidance
from .dag import DAGGuidance
from .sld import SLDGuidance
from .spguard import SPGuardGuidance

#: Name → class, in the order hosts list them.
METHODS: dict[str, type[Guidance]] = {
    SLDGuidance.name: SLDGuidance, SPGuardGuidance.name: SPGuardGuidance, DAGGuidance.name: DAGGuidance,
}


def make_method(name: str, preset: str = "MEDIUM") -> Guidance:
    """A method with its default settings (SLD: the named preset)."""
    if name not in METHODS:
        raise ValueError(f"unknown guidance method {name!r}; use one of {tuple(METHODS)}")
    return SLDGuidance(preset) if name == SLDGuidance.name else METHODS[name]()
