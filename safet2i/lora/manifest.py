"""``models/safety_models.toml``: known safety weights, recognised by exact file name or sha256.

Identification is strict: only the distinctive names listed in an entry's ``files`` (or its
sha256, when known) identify a release. The generic names some releases ship under
(``gun.safetensors``, ``pytorch_lora_weights.safetensors``) are listed in ``release_files``
only to tell the user which name to rename them to; a user's own LoRA that happens to be called
``gun.safetensors`` is treated as unknown (and still goes through every coverage check).
"""

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
    release_files: list[str] = field(default_factory=list)  # generic names as released: hints only


_ENTRIES: dict[str, list[Entry]] = {}

KINDS = {"lora": {"unet", "te1", "te2"}, "unet": {"unet"}, "text_encoder": {"te1", "te2"}}
ARCHS = ("sd1", "sd2", "sdxl", "flux-dev", "flux-schnell", "sd3-medium", "sd3.5-medium", "sd3.5-large", "qwen-image",
         "wan2.1-1.3b", "wan-14b", "wan2.1-i2v-14b", "wan2.2-5b")   # arch.ARCHITECTURES + dit_arch.DIT_ARCHITECTURES
REQUIRED = ("title", "method", "paper", "kind", "arch", "base_model", "format", "files", "source", "licence")
EXPECTED_KEYS = {"components", "targets", "module_regex", "rank", "min_coverage"}
# Names that many unrelated files carry: never identify a release by them.
GENERIC_NAMES = {"pytorch_lora_weights.safetensors", "adapter_model.safetensors", "model.safetensors",
                 "diffusion_pytorch_model.safetensors", "text_encoder.safetensors", "unet.safetensors"}


def validate(entry: Entry) -> None:
    """Raise :class:`ModelLoadError` naming what is wrong with a manifest entry."""
    bad = []
    for f in REQUIRED:
        v = getattr(entry, f)
        if not v or (isinstance(v, str) and not v.strip()):
            bad.append(f"{f} is empty")
    if entry.kind not in KINDS:
        bad.append(f"kind {entry.kind!r} is not one of {sorted(KINDS)}")
    if entry.arch not in ARCHS:
        bad.append(f"arch {entry.arch!r} is not one of {list(ARCHS)}")
    tag = entry.name.split("-")[0].lower()
    for f in entry.files:
        if not isinstance(f, str) or not f.lower().endswith(".safetensors"):
            bad.append(f"file name {f!r} is not a .safetensors name")
        elif f.lower() in GENERIC_NAMES or tag not in f.lower():
            bad.append(f"file name {f!r} is too generic to identify the release (must contain {tag!r})")
    if entry.sha256 and not re.fullmatch(r"[0-9a-fA-F]{64}", entry.sha256):
        bad.append(f"sha256 {entry.sha256!r} is not 64 hex digits")
    exp = entry.expected or {}
    if not isinstance(exp, dict) or set(exp) - EXPECTED_KEYS:
        bad.append(f"expected has unknown fields {sorted(set(exp) - EXPECTED_KEYS) if isinstance(exp, dict) else exp}")
        exp = {}
    if "components" in exp and (not exp["components"] or not set(exp["components"]) <= KINDS.get(entry.kind, set())):
        bad.append(f"expected components {exp['components']} do not fit kind {entry.kind!r}")
    for k in ("targets", "rank"):
        if k in exp and (not isinstance(exp[k], int) or isinstance(exp[k], bool) or exp[k] < 1):
            bad.append(f"expected {k} must be a positive integer")
    if "min_coverage" in exp and not (isinstance(exp["min_coverage"], (int, float)) and 0 < exp["min_coverage"] <= 1):
        bad.append("expected min_coverage must be in (0, 1]")
    if "module_regex" in exp:
        try:
            re.compile(exp["module_regex"])
        except (re.error, TypeError) as exc:
            bad.append(f"expected module_regex does not compile ({exc})")
    if entry.kind == "lora" and not {"components", "targets", "rank"} <= set(exp):
        bad.append("a LoRA entry needs expected components, targets and rank")
    if entry.kind != "lora" and "min_coverage" not in exp:
        bad.append("a full-weights entry needs expected min_coverage")
    if bad:
        raise ModelLoadError(f"safety_models.toml entry {entry.name!r}: " + "; ".join(bad) + ".")


def entries(path: str | Path | None = None) -> list[Entry]:
    path = Path(path) if path is not None else MANIFEST
    key = str(path)
    if key not in _ENTRIES:
        if not path.is_file():  # a wheel install without the repository's models/ folder
            return []
        data = _toml_load(path)
        out = []
        seen: dict[str, str] = {}
        for name, d in data.get("models", {}).items():
            unknown = set(d) - set(Entry.__dataclass_fields__)
            if unknown:
                raise ModelLoadError(f"safety_models.toml entry {name!r}: unknown fields {sorted(unknown)}.")
            e = Entry(name=name, **d)
            validate(e)
            for f in e.files:
                if f.lower() in seen:
                    raise ModelLoadError(f"safety_models.toml: {f!r} is listed by {seen[f.lower()]!r} and {name!r}.")
                seen[f.lower()] = name
            out.append(e)
        _ENTRIES[key] = out
    return _ENTRIES[key]


def find(file_name: str, sha256: str = "", path: str | Path | None = None) -> Entry | None:
    """The entry a file is, by sha256 (when the entry has one) or by one of its exact ``files`` names."""
    if sha256:
        for e in entries(path):
            if e.sha256 and e.sha256.lower() == sha256.lower():
                return e
    base = Path(file_name).name.lower()
    for e in entries(path):
        if base in (f.lower() for f in e.files):
            return e
    return None


def release_entry(file_name: str, path: str | Path | None = None) -> Entry | None:
    """The entry whose generic release name (``release_files``, e.g. ``gun.safetensors``) this is."""
    base = Path(file_name).name.lower()
    return next((e for e in entries(path) if base in (f.lower() for f in e.release_files)), None)


def rename_hint(file_name: str, path: str | Path | None = None) -> str | None:
    """For an unknown file carrying a release's generic name: which name identifies it."""
    e = release_entry(file_name, path)
    if e is None:
        return None
    return (f"{Path(file_name).name} is also the name under which '{e.title}' was released; if it is that "
            f"file, rename it to {e.files[0]} to have it checked against the manifest. It is treated as an "
            "unknown file now.")


def check_arch(entry: Entry | None, host_arch: str | None, what: str) -> None:
    """A known release applied to a model of another architecture is an error (even with allow_partial).

    ``host_arch``: ``sd1``, ``sd2``, ``sdxl``, a transformer architecture (``flux-dev``, ``sd3-medium``,
    ``wan-14b``, …) or another name when the host knows it, None when it cannot tell (then nothing is checked here; coverage still is).
    """
    if entry is None or not host_arch or host_arch == entry.arch:
        return
    raise ModelLoadError(
        f"{what} is '{entry.title}' ({entry.name} in safety_models.toml), made for {entry.base_model} "
        f"(architecture {entry.arch}), but the model it is applied to is {host_arch}. Its weights may fit by shape "
        "but were not trained for this model, so it would not protect it; use a model of that architecture.")


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
