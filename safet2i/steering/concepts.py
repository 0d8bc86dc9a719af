"""Concept presets (data in ``safet2i/data/concepts``; user presets in ``models/concepts``).

Presets are read once at import. A user file that cannot be read or does not have the
preset fields does not break importing the pack: it is left out, and asking for it by name
(its ``name`` field or file stem) raises a :class:`PolicyError` naming the file.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..errors import PolicyError

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "data" / "concepts"
USER_DIR = Path(__file__).resolve().parent.parent.parent / "models" / "concepts"
SVF_NAMES = ("nudity", "artist")

log = logging.getLogger("safet2i")


def _read(f: Path) -> dict:
    """One preset file, checked: ``{"name"?, "svf"?, "concepts": [non-empty strings]}``."""
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError("must be a JSON object with a 'concepts' list")
    items = data.get("concepts")
    if not isinstance(items, list) or not items or not all(isinstance(c, str) and c.strip() for c in items):
        raise ValueError("'concepts' must be a non-empty list of non-empty strings")
    if data.get("svf", "nudity") not in SVF_NAMES:
        raise ValueError(f"'svf' must be one of {', '.join(SVF_NAMES)}, not {data.get('svf')!r}")
    if not isinstance(data.get("name", f.stem), str):
        raise ValueError("'name' must be a string")
    return data


def read_presets(folders=None) -> tuple[dict[str, dict], dict[str, str]]:
    """(name -> preset, name -> error message) for every ``*.json`` in ``folders``."""
    presets: dict[str, dict] = {}
    errors: dict[str, str] = {}
    for folder in folders if folders is not None else (PACKAGE_DIR, USER_DIR):
        folder = Path(folder)
        if not folder.is_dir():
            continue
        for f in sorted(folder.glob("*.json")):
            try:
                data = _read(f)
            except ValueError as exc:
                errors[f.stem] = f"Concept preset file {f} is invalid: {exc}."
                log.warning("SafeT2I concept preset ignored: %s", errors[f.stem])
                # A broken file meant to replace a preset of the same name (a user's own
                # nudity.json) must not leave the built-in one silently in its place.
                presets.pop(f.stem, None)
                continue
            name = data.get("name", f.stem)
            presets[name] = data
            errors.pop(name, None)
    return presets, errors


def preset_choices() -> list[str]:
    """Every preset name a user may choose, each once: the valid ones, the broken ones (choosing
    one raises its error), then ``custom``."""
    return list(dict.fromkeys([*CONCEPT_PRESETS, *PRESET_ERRORS, "custom"]))


CONCEPT_PRESETS, PRESET_ERRORS = read_presets()


def refresh(folders=None) -> None:
    """Read the preset folders again (in place: imported references stay valid)."""
    presets, errors = read_presets(folders)
    CONCEPT_PRESETS.clear()
    CONCEPT_PRESETS.update(presets)
    PRESET_ERRORS.clear()
    PRESET_ERRORS.update(errors)


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
        if preset in PRESET_ERRORS:
            raise PolicyError(PRESET_ERRORS[preset])
        raise PolicyError(f"Unknown concept preset {preset!r}; use {', '.join(CONCEPT_PRESETS)} or custom.")
    return [c.strip() for c in data["concepts"]], data.get("svf", "nudity")
