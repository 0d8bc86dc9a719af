"""``models/safety_models.toml``: known safety weights, recognised by file name (or sha256)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ModelLoadError

MANIFEST = Path(__file__).resolve().parents[2] / "models" / "safety_models.toml"


def _toml_load(path: Path) -> dict:
    try:
        import tomllib  # noqa: PLC0415 - Python 3.11+
    except ModuleNotFoundError:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib  # noqa: PLC0415
        except ModuleNotFoundError as exc:
            raise ModelLoadError("Reading models/safety_models.toml on Python < 3.11 needs 'tomli' "
                                 "(python -m pip install tomli).") from exc
    with open(path, "rb") as f:
        return tomllib.load(f)


@dataclass
class Entry:
    name: str
    title: str
    kind: str
    arch: str
    files: list[str]
    sha256: str = ""
    expected: dict = field(default_factory=dict)
    source: str = ""
    licence: str = ""
    method: str = ""
    paper: str = ""
    base_model: str = ""
    format: str = ""


_ENTRIES: dict[str, list[Entry]] = {}


def entries(path: str | Path = MANIFEST) -> list[Entry]:
    key = str(path)
    if key not in _ENTRIES:
        if not Path(path).is_file():  # a wheel install without the repository's models/ folder
            return []
        data = _toml_load(Path(path))
        out = []
        for name, d in data.get("models", {}).items():
            known = {k: v for k, v in d.items() if k in Entry.__dataclass_fields__}
            out.append(Entry(name=name, **known))
        _ENTRIES[key] = out
    return _ENTRIES[key]


def find(file_name: str, sha256: str = "", path: str | Path = MANIFEST) -> Entry | None:
    base = Path(file_name).name.lower()
    for e in entries(path):
        if base in (f.lower() for f in e.files) or (sha256 and e.sha256 and e.sha256.lower() == sha256.lower()):
            return e
    return None


def verify(entry: Entry | None, sha256: str, components: dict[str, int], modules: list[str],
           ranks: set[int], coverage_fraction: dict[str, float] | None = None) -> str:
    """Check a recognised file against its entry; returns 'verified', 'unverified' or 'unknown'.

    Raises :class:`ModelLoadError` on a hash mismatch or when the file does not contain what the
    entry says (a wrong or damaged file under a known name).
    """
    if entry is None:
        return "unknown"
    if entry.sha256 and sha256 and entry.sha256.lower() != sha256.lower():
        raise ModelLoadError(f"{entry.name}: sha256 {sha256} does not match the manifest's {entry.sha256} "
                             "(damaged or different file under a known name).")
    exp = entry.expected or {}
    problems = []
    if "components" in exp and sorted(components) != sorted(exp["components"]):
        problems.append(f"parts {sorted(components)} instead of {sorted(exp['components'])}")
    if "targets" in exp and sum(components.values()) != exp["targets"]:
        problems.append(f"{sum(components.values())} target weights instead of {exp['targets']}")
    if "module_regex" in exp:
        rx = re.compile(exp["module_regex"])
        odd = [m for m in modules if not rx.search(m)]
        if odd:
            problems.append(f"{len(odd)} modules outside {exp['module_regex']!r} (e.g. {odd[0]})")
    if "rank" in exp and ranks and ranks != {exp["rank"]}:
        problems.append(f"rank {sorted(ranks)} instead of {exp['rank']}")
    if "min_coverage" in exp and coverage_fraction is not None:
        for comp, frac in coverage_fraction.items():
            if frac + 1e-9 < exp["min_coverage"]:
                problems.append(f"replaces {frac:.0%} of the {comp} weights, expected {exp['min_coverage']:.0%}")
    if problems:
        raise ModelLoadError(f"This file is named like '{entry.name}' ({entry.title}) but " + "; ".join(problems) + ".")
    return "verified" if entry.sha256 and sha256 else "unverified"
