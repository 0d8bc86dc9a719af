"""Concept presets (data in ``safet2i/data/concepts``; user presets in ``models/concepts``)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import PolicyError

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "data" / "concepts"
USER_DIR = Path(__file__).resolve().parent.parent.parent / "models" / "concepts"


def _presets() -> dict[str, dict]:
    out = {}
    for folder in (PACKAGE_DIR, USER_DIR):
        if folder.is_dir():
            for f in sorted(folder.glob("*.json")):
                data = json.loads(f.read_text(encoding="utf-8"))
                out[data.get("name", f.stem)] = data
    return out


CONCEPT_PRESETS = _presets()


def load_concepts(preset: str = "nudity", custom: str = "") -> tuple[list[str], str]:
    """(concept strings, SVF preset name) for a preset name, or ``custom`` text (one concept
    per line or comma-separated) when preset is ``custom``."""
    if preset == "custom":
        items = [c.strip() for line in custom.splitlines() for c in line.split(",") if c.strip()]
        if not items:
            raise PolicyError("The custom concept list is empty.")
        return items, "nudity"
    data = CONCEPT_PRESETS.get(preset)
    if data is None:
        raise PolicyError(f"Unknown concept preset {preset!r}; use {', '.join(CONCEPT_PRESETS)} or custom.")
    return list(data["concepts"]), data.get("svf", "nudity")
