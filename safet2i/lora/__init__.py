"""Model layer: safety LoRAs and full safety weights, any key format, with proof of coverage.

* :func:`load_lora` reads a LoRA (safetensors only), recognises its key layout and base
  architecture, converts it to canonical :class:`~safet2i.lora.keys.Target` objects
  (scale = alpha/rank, 1.0 without alpha; ``adapter_config.json``'s ``lora_alpha`` when present)
  and looks it up in ``models/safety_models.toml``.
* :func:`load_full_weights` does the same for full UNet / text-encoder releases (ESD, SafeGen,
  AdvUnlearn).
* Hosts resolve each target to their own weight and call :func:`coverage.check` +
  :func:`coverage.require_full`: a file that patches nothing, only part of what it contains, or
  another architecture is an error naming the unmatched keys.
* Degenerate LoRAs (rank 0, zero-size or all-zero tensors, B·A = 0, a scale that is 0,
  negative or not finite) are refused by :func:`load_lora` itself (:func:`keys.check_effect`),
  so no host ever reports one as patched.
* :func:`convert_lora` (``safet2i lora convert``) runs the loaders' checks first
  (:func:`check_convertible`): a converter cannot launder what a loader refuses.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ModelLoadError, SafeT2IError
from . import manifest
from .coverage import Coverage, CoverageError, check, detect_architectures, merged, require_full, resolver_for
from .files import PICKLE_SUFFIXES, WeightsFile, convert_pickle, convert_pickle_report, read_safetensors
from .keys import (LoraFormatError, Target, apply_peft_config, check_effect, detect_format, parse, to_diffusers_naming,
                   to_kohya)

__all__ = [
    "Coverage", "CoverageError", "FullWeights", "LoraFile", "LoraFormatError", "PICKLE_SUFFIXES", "Target",
    "check", "check_convertible", "check_for_host", "check_made_for", "convert_lora", "convert_pickle",
    "convert_pickle_report", "coverage_fraction", "delta_mismatch", "detect_architectures", "detect_format",
    "identified_release",
    "inspect_lora", "load_full_weights", "load_lora", "merged", "read_safetensors", "release_by_contents",
    "require_full", "resolver_for", "to_kohya",
]


@dataclass
class LoraFile:
    path: Path
    sha256: str
    formats: list[str]
    targets: list[Target]
    architectures: list[str]             # known bases it fits completely
    entry: manifest.Entry | None = None
    metadata: dict = field(default_factory=dict)
    alpha_source: str = "file"
    adapter_config: str | None = None     # path of the PEFT config used (None: none)

    @property
    def components(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.targets:
            out[t.component] = out.get(t.component, 0) + 1
        return out

    @property
    def ranks(self) -> set[int]:
        return {t.rank for t in self.targets}

    def verify_manifest(self, arch: str | None = None) -> str:
        """The manifest's check ('verified' / 'unverified' / 'unknown'), or :class:`ModelLoadError`.

        With ``arch`` (``sd1``, ``sd2``, ``sdxl``) an entry's ``min_coverage`` is checked too: the
        fraction of that architecture's patchable weights of each part the file patches.
        """
        exp = (self.entry.expected or {}) if self.entry else {}
        frac = coverage_fraction(self.targets, arch) if "min_coverage" in exp and arch else None
        return manifest.verify(self.entry, self.sha256, self.components, [t.module for t in self.targets], self.ranks,
                               frac)


def coverage_fraction(targets: list[Target], arch: str) -> dict[str, float]:
    """Per part of ``targets``: the fraction of ``arch``'s patchable weights of that part they patch."""
    from .arch import inventory, titles  # noqa: PLC0415

    ARCHITECTURES = titles()

    if arch not in ARCHITECTURES:
        return {}
    inv = inventory(arch)
    cov = check(targets, resolver_for(arch), ARCHITECTURES[arch])
    out: dict[str, float] = {}
    for comp in sorted({t.component for t in targets}):
        hit = {s.host_key for s in cov.matched if s.target.split(":")[0] == comp}
        total = len(inv.get(comp, {}))
        out[comp] = len(hit) / total if total else 0.0
    return out


def identified_release(lf: LoraFile) -> tuple[manifest.Entry, str] | None:
    """(entry, how) for a file the manifest does not know by name or sha256 but that is taken for
    a release because its contents are exactly that release's *and* either its name is the
    release's generic name (``gun.safetensors``) or its metadata says ``safet2i lora convert``
    made it from that release (``safet2i_release``). Only ever used to hold the file to the
    release's architecture (a claim can only add a refusal), never to vouch for it."""
    if lf.entry is not None:
        return None
    candidates = []
    release = manifest.release_entry(lf.path.name)
    if release is not None:
        candidates.append((release, f"its release name {lf.path.name}"))
    meta = lf.metadata or {}
    claimed = meta.get("safet2i_release")
    if claimed and str(meta.get("converted_by", "")).startswith("safet2i"):
        entry = next((e for e in manifest.entries() if e.name == claimed), None)
        if entry is not None:
            candidates.append((entry, f"its metadata (converted by safet2i from {claimed})"))
    for entry, how in candidates:
        try:
            manifest.verify(entry, "", lf.components, [t.module for t in lf.targets], lf.ranks)
        except ModelLoadError:
            continue
        return entry, how
    return None


def release_by_contents(lf: LoraFile) -> manifest.Entry | None:
    """The release entry of :func:`identified_release` (None: none)."""
    found = identified_release(lf)
    return found[0] if found else None


def check_made_for(lf: LoraFile, host_arch: str | None, what: str) -> None:
    """A safety LoRA applied to a model it was not made for is an error, even with
    ``allow_partial``: by its manifest entry (:func:`manifest.check_arch`, a known release) and,
    for any file, by its shapes: a file that fits some known bases completely but not the host's
    (SD1, SD2 or SDXL) is refused (some shapes coincide across architectures, an SD1 attention
    LoRA shares 20 of its 64 with SDXL, so a partial load would be meaningless). ``host_arch``
    None or another model class: nothing is checked here (coverage still is)."""
    from .arch import titles  # noqa: PLC0415

    ARCHITECTURES = titles()

    manifest.check_arch(lf.entry, host_arch, what)
    # A generic release name (gun.safetensors), or the metadata of a copy `safet2i lora convert`
    # wrote, identifies nothing by itself; with contents that are exactly what that release
    # holds the file is taken for it here, for this check.
    found = identified_release(lf)
    if found is not None:
        try:
            manifest.check_arch(found[0], host_arch, what)
        except ModelLoadError as exc:
            raise ModelLoadError(f"{exc} (Identified by {found[1]} and its contents.)") from exc
    host_family = family_of_arch(host_arch)
    fams = file_families(lf.targets)
    if host_family and fams and host_family not in fams:
        from .dit_arch import FAMILIES  # noqa: PLC0415

        names = {"sd": "Stable Diffusion UNet (SD1/SD2/SDXL)", **FAMILIES}
        raise ModelLoadError(f"{what} has {' / '.join(names[f] for f in sorted(fams))} module names (its keys); the "
                             f"model is {names.get(host_family, host_family)} ({host_arch}). A LoRA for another model "
                             "family is refused, even with allow_partial.")
    if host_arch in ARCHITECTURES and lf.architectures and host_arch not in lf.architectures:
        made = ", ".join(ARCHITECTURES[a] for a in lf.architectures)
        hint = manifest.rename_hint(lf.path.name) if lf.entry is None else None
        raise ModelLoadError(f"{what} is made for {made} (its weights fit that completely); the model is "
                             f"{ARCHITECTURES[host_arch]}. Refused even with allow_partial: some shapes "
                             "coincide across architectures, so a partial load would be meaningless."
                             + (f" {hint}" if hint else ""))


def family_of_arch(host_arch: str | None) -> str | None:
    """``sd`` for SD1/SD2/SDXL hosts, the transformer family (``flux``, ``sd3``, ``qwen-image``,
    ``wan``) for a known transformer or a host string ``"<family> (…)"`` (another size), else None."""
    from .dit_arch import DIT_ARCHITECTURES, FAMILIES  # noqa: PLC0415

    if not host_arch:
        return None
    if host_arch in ("sd1", "sd2", "sdxl", "sdxl-refiner"):
        return "sd"
    if host_arch in DIT_ARCHITECTURES:
        return DIT_ARCHITECTURES[host_arch].family
    head = host_arch.split(" (")[0]
    return head if head in FAMILIES and host_arch != head else None


def file_families(targets: list[Target]) -> set[str]:
    """Model families whose module names (either naming) hold every denoiser target of a file:
    ``sd`` (SD UNet names: diffusers or LDM) and/or the transformer families (``dit_arch``).
    Empty when there is no denoiser target or the names fit no family."""
    from .dit_arch import family_of_names  # noqa: PLC0415

    unet = [t for t in targets if t.component == "unet"]
    if not unet:
        return set()
    if all(t.naming == "ldm" or (t.naming == "diffusers" and t.module.startswith(_SD_ROOTS)) for t in unet):
        return {"sd"}
    if all(t.naming in ("dit", "diffusers") for t in unet):
        return family_of_names([t.module for t in unet])
    return set()


def family_names(targets: list[Target]) -> list[str]:
    """Titles of the model families whose module names hold every denoiser target
    (:func:`file_families`): "Stable Diffusion UNet (SD1/SD2/SDXL)", "Flux.1", "SD3 / SD3.5 (MMDiT)",
    "Qwen-Image", "Wan 2.1 / 2.2"; several when names coincide (shapes decide the architecture)."""
    from .dit_arch import FAMILIES  # noqa: PLC0415

    names = {"sd": "Stable Diffusion UNet (SD1/SD2/SDXL)", **FAMILIES}
    return [names[f] for f in sorted(file_families(targets))]


_SD_ROOTS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in", "conv_out", "time_embedding.", "add_embedding.")


def check_for_host(lf: LoraFile, arch: str, what: str | None = None) -> Coverage:
    """Everything a loader checks before patching a model of architecture ``arch`` (``sd1``,
    ``sd2``, ``sdxl``) without ``allow_partial``, with the loaders' messages: the manifest
    (sha256, contents, ``min_coverage`` on ``arch``), :func:`check_made_for` (a known release on
    its own base; a file that fits other bases completely but not this one) and full coverage
    (:func:`require_full`: every target exists in ``arch`` with the same shape)."""
    from .arch import titles  # noqa: PLC0415

    ARCHITECTURES = titles()

    if arch not in ARCHITECTURES:
        raise ModelLoadError(f"unknown base {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    what = what or f"Safety LoRA {lf.path.name}"
    lf.verify_manifest()
    check_made_for(lf, arch, what)
    cov = check(lf.targets, resolver_for(arch), ARCHITECTURES[arch])
    require_full(cov, what)
    lf.verify_manifest(arch)        # min_coverage, measured on the architecture it was checked for
    return cov


def check_convertible(lf: LoraFile, base: str | None = None, allow_unknown: bool = False) -> dict:
    """The rule of ``safet2i lora convert``: a converter must not launder what a loader refuses.

    * the manifest check always runs (:meth:`LoraFile.verify_manifest`): a known release whose
      sha256 or contents differ from its entry is refused;
    * the base architecture checked is ``base`` when given, else the release's own (a file the
      manifest knows, or a generic release name with exactly that release's contents); against it
      every check of :func:`check_for_host` runs (made-for, full coverage, ``min_coverage``);
    * an unknown file without a base is converted when it fits at least one known architecture
      completely by shape; one that fits none is refused unless ``allow_unknown``, and is then
      marked ``UNVERIFIED``. ``allow_unknown`` never overrides a refusal above.

    Returns a report: ``check`` (``manifest`` / ``shape`` / ``UNVERIFIED``), ``manifest``,
    ``manifest_check``, ``base``, ``base_from``, ``architectures``, ``note`` (one sentence for
    the user and the output's metadata).
    """
    from .arch import titles  # noqa: PLC0415

    ARCHITECTURES = titles()

    what = f"Safety LoRA {lf.path.name}"
    if base is not None and base not in ARCHITECTURES:
        raise ModelLoadError(f"unknown base {base!r}; choose one of {sorted(ARCHITECTURES)}")
    found = identified_release(lf)
    release = lf.entry or (found[0] if found else None)
    state = lf.verify_manifest()
    arch, arch_from = base, "--base" if base else None
    if arch is None and release is not None:
        arch = release.arch
        arch_from = "its manifest entry" if lf.entry else f"{found[1]} and contents ({release.name}'s)"
    fits = ", ".join(ARCHITECTURES[a] for a in lf.architectures)
    hint = manifest.rename_hint(lf.path.name) if lf.entry is None and release is None else None
    rep = {"check": "shape", "manifest": lf.entry.name if lf.entry else None, "manifest_check": state,
           "release": release.name if release else None, "base": arch, "base_from": arch_from,
           "architectures": list(lf.architectures)}
    if arch is not None:
        cov = check_for_host(lf, arch, what)
        title = ARCHITECTURES[arch]
        if lf.entry is not None:
            rep["check"] = "manifest"
            rep["note"] = (f"'{lf.entry.title}' ({lf.entry.name} in the manifest, {state}); all {len(cov.matched)} "
                           f"targets fit {title} (base from {arch_from})")
        else:
            rep["note"] = (f"not in the manifest (contents not vouched for); all {len(cov.matched)} targets fit "
                           f"{title} by shape (base from {arch_from})")
    elif lf.architectures:
        rep["note"] = (f"not in the manifest (contents not vouched for); fits {fits} completely by shape "
                       "(no --base given: not checked against one model)")
    else:
        fit = detect_architectures(lf.targets).items()
        best = ", ".join(f"{a} {len(c.matched)}/{len(c.statuses)}" for a, c in fit)
        if not allow_unknown:
            raise ModelLoadError(
                f"{what}: nothing vouches for this file: it is not in the manifest (models/safety_models.toml) and no "
                f"known architecture fits every target (fit: {best}), so a loader would refuse it on any known "
                "model (SD1.x, SD2.x, SDXL, Flux, SD3, Qwen-Image, Wan) (without allow_partial; always where "
                "nothing fits). Converting it would hide "
                "that. Pass --allow-unknown (Python: allow_unknown=True) to convert it anyway; the output is then "
                "marked UNVERIFIED." + (f" {hint}" if hint else ""))
        rep["check"] = "UNVERIFIED"
        rep["note"] = (f"UNVERIFIED: not in the manifest and no known architecture fits every target (fit: {best}); "
                       "converted only because of --allow-unknown: nothing vouches for what it patches")
    if hint:
        rep["note"] += f". {hint}"
    return rep


def convert_lora(path: str | os.PathLike, out: str | os.PathLike | None = None, to: str = "kohya",
                 base: str | None = None, allow_unknown: bool = False, overwrite: bool = False) -> dict:
    """``safet2i lora convert``: the checks of :func:`check_convertible`, then a kohya-key copy
    (alpha written explicitly) whose every target is read back and compared. The output's
    metadata records what vouched for the file (``safet2i_check``, ``safet2i_note``, ...).
    Returns :func:`check_convertible`'s report with ``out`` and ``targets`` added."""
    from ..fileio import save_safetensors  # noqa: PLC0415

    if to != "kohya":
        raise ModelLoadError(f"unknown output format {to!r}; only 'kohya' is written")
    lf = load_lora(path)
    rep = check_convertible(lf, base, allow_unknown)
    dst = Path(out) if out else lf.path.with_name(lf.path.name.removesuffix(".safetensors") + ".kohya.safetensors")
    if dst.resolve() == lf.path.resolve():
        raise ModelLoadError("the output would replace the input; choose another --out.")
    if dst.exists() and not overwrite:
        raise ModelLoadError(f"{dst} exists; pass --overwrite to replace it.")
    single = not any(t.component == "te2" for t in lf.targets)
    dit_inv = _dit_inventory_for(lf, rep["base"])
    if dit_inv is not None:
        from .keys import normalise_dit, to_native_kohya  # noqa: PLC0415

        lf.targets = normalise_dit(lf.targets, dit_inv)
        state = to_native_kohya(lf.targets, dit_inv)
    else:
        state = to_kohya(lf.targets, single)
    meta = {"converted_from": lf.path.name, "converted_by": "safet2i lora convert", "source_sha256": lf.sha256,
            "safet2i_check": rep["check"], "safet2i_note": rep["note"],
            "safet2i_manifest": rep["manifest"] or "none", "safet2i_manifest_check": rep["manifest_check"],
            # Loaders hold a copy with the release's contents to the release's base (identified_release).
            "safet2i_release": rep["release"] or "none",
            "safet2i_base": rep["base"] or "none",
            "safet2i_architectures": ",".join(rep["architectures"]) or "unknown"}
    save_safetensors(dst, state, meta)
    try:
        if dit_inv is not None:
            _same_deltas(lf.targets, normalise_dit(load_lora(dst).targets, dit_inv))
        else:
            _same_targets(lf.targets, load_lora(dst).targets, single)
    except SafeT2IError as exc:
        dst.unlink()
        raise ModelLoadError(f"{dst}: conversion check failed, the file was removed: {exc}") from exc
    rep.update(out=str(dst), targets=len(lf.targets), source=str(lf.path), source_sha256=lf.sha256)
    return rep


def _dit_inventory_for(lf: LoraFile, base: str | None):
    """The transformer inventory a conversion writes native names for (None: not a transformer
    file). ``base`` when given, else the one family every fitting architecture belongs to."""
    from .arch import is_dit  # noqa: PLC0415
    from .dit_arch import DIT_ARCHITECTURES, arch_inventory  # noqa: PLC0415

    if base is not None:
        return arch_inventory(base) if is_dit(base) else None
    dits = [a for a in lf.architectures if is_dit(a)]
    if not dits:
        return None
    fams = {DIT_ARCHITECTURES[a].family for a in dits}
    if len(fams) > 1 or len(dits) != len(lf.architectures):
        raise ModelLoadError(f"{lf.path.name} fits {', '.join(lf.architectures)}: model families with different "
                             "native names; pass --base to choose the one to write names for.")
    return arch_inventory(dits[0])


def delta_mismatch(src: list[Target], back: list[Target], key=lambda t: t.name) -> str | None:
    """Why ``back`` (a conversion read back) does not have ``src``'s effect, or None: the same
    modules (by ``key``), each with scale·B·A equal in float64 (up to 1e-6 of its largest entry:
    fusing pieces of different ranks folds the scale into float32 factors). Compared module by
    module, so one ΔW pair is in memory at a time (a whole transformer's ΔW is tens of GB)."""
    by_key = {key(t): t for t in back}
    want_keys = [key(t) for t in src]
    if set(want_keys) != set(by_key) or len(by_key) != len(back):
        return (f"modules differ: missing {sorted(set(want_keys) - set(by_key))[:3]}, "
                f"extra {sorted(set(by_key) - set(want_keys))[:3]}")
    for k, t in zip(want_keys, src):
        d, g = t.delta(torch.float64), by_key[k].delta(torch.float64)
        if g.shape != d.shape:
            return f"{k}: ΔW shape {tuple(g.shape)} instead of {tuple(d.shape)} after conversion"
        err = float((g - d).abs().max())
        if not err <= 1e-6 * float(d.abs().max()) + 1e-12:
            return f"{k}: ΔW differs by {err:.3g} after conversion"
    return None


def _same_deltas(src: list[Target], back: list[Target]) -> None:
    """Transformer conversions fuse stacked native weights (factors change, not ΔW): every
    module's ΔW read back equals the source's (:func:`delta_mismatch`)."""
    why = delta_mismatch(src, back)
    if why:
        raise ModelLoadError(why)


def _same_targets(src: list[Target], back: list[Target], single: bool) -> None:
    """Every target read back with the same tensors and the same scale (alpha stored as float32)."""
    from .keys import kohya_name  # noqa: PLC0415

    by_name = {kohya_name(t, single): t for t in back}
    for t in src:
        b = by_name.pop(kohya_name(t, single), None)
        if b is None:
            raise ModelLoadError(f"{t.name} is missing")
        for n in ("down", "up", "mid", "dora_scale"):
            x, y = getattr(t, n), getattr(b, n)
            if (x is None) != (y is None) or (x is not None and not (x.shape == y.shape and torch.equal(x, y))):
                raise ModelLoadError(f"{t.name}: its {n} tensor differs")
        if abs(b.scale - t.scale) > 1e-6 * abs(t.scale):
            raise ModelLoadError(f"{t.name}: scale {b.scale} instead of {t.scale}")
    if by_name:
        raise ModelLoadError(f"{len(by_name)} targets more than in the source (e.g. {next(iter(by_name))})")


def load_lora(path: str | os.PathLike) -> LoraFile:
    wf: WeightsFile = read_safetensors(path)
    try:
        targets = parse(wf.tensors)
        from_config = False
        if wf.adapter_config is not None:
            from_config = apply_peft_config(targets, wf.adapter_config, wf.adapter_config_path.name)
        # Degenerate targets (scale 0 / negative / non-finite, all-zero tensors, B·A = 0) are refused
        # here, after the PEFT config set its alphas, so no host ever reports such a file as patched.
        check_effect(targets, wf.adapter_config_path.name if from_config else "")
    except LoraFormatError as exc:
        raise LoraFormatError(f"{wf.path.name}: {exc}") from exc
    if from_config:
        source = wf.adapter_config_path.name + (" (use_rslora: alpha/sqrt(r))" if any(t.rslora for t in targets) else "")
    elif any(t.alpha is not None for t in targets):
        source = "file"
    else:
        source = "none (scale 1.0)"
    archs = [a for a, c in detect_architectures(targets).items() if not c.unmatched]
    if archs and len({family_of_arch(a) for a in archs}) == 1:
        # One naming: LDM → diffusers (SD); native → diffusers, stacked native weights split
        # exactly (transformers). A file fitting several families keeps its names (hosts resolve).
        to_diffusers_naming(targets, archs[0])
    lf = LoraFile(wf.path, wf.sha256, detect_format(wf.tensors), targets, archs,
                  manifest.find(wf.path.name, wf.sha256), wf.metadata, source,
                  str(wf.adapter_config_path) if wf.adapter_config_path else None)
    return lf


def inspect_lora(path: str | os.PathLike, base: str | None = None) -> dict:
    """Everything ``safet2i lora inspect`` prints, as a dict."""
    lf = load_lora(path)
    archs = detect_architectures(lf.targets)
    info = {
        "file": str(lf.path), "sha256": lf.sha256, "formats": lf.formats,
        "components": lf.components, "targets": len(lf.targets), "ranks": sorted(lf.ranks),
        "scales": sorted({round(t.scale, 6) for t in lf.targets}), "alpha_from": lf.alpha_source,
        "adapter_config": lf.adapter_config,
        "dora": any(t.dora_scale is not None for t in lf.targets),
        "families": family_names(lf.targets),
        "architectures": lf.architectures or ["unknown (no known base fits every target)"],
        "fit": {a: f"{len(c.matched)}/{len(c.statuses)}" for a, c in archs.items()},
        "manifest": lf.entry.name if lf.entry else None,
        "manifest_check": lf.verify_manifest(),
        "modules": sorted({_pattern(t.module) for t in lf.targets}),
    }
    hint = manifest.rename_hint(lf.path.name) if lf.entry is None else None
    if hint:
        info["manifest_hint"] = hint
    found = identified_release(lf)
    if found is not None:
        info["identified_as"] = (f"{found[0].name} (by {found[1]} and its contents: held to its base "
                                 f"{found[0].arch}, not vouched for)")
    if base:
        if base not in archs:
            raise ModelLoadError(f"unknown base {base!r}; choose one of {sorted(archs)}")
        info["coverage"] = archs[base].as_dict()
        try:
            check_made_for(lf, base, lf.path.name)
            info["arch_check"] = "ok" if lf.entry else "not in the manifest"
        except ModelLoadError as exc:
            info["arch_check"] = f"REFUSED: {exc}"
        try:  # what a loader on a `base` model (allow_partial off) and `lora convert --base` decide
            check_for_host(lf, base)
            info["load_check"] = "ok"
        except (ModelLoadError, CoverageError) as exc:
            info["load_check"] = f"REFUSED: {exc}"
    return info


def _pattern(module: str) -> str:
    return re.sub(r"\.\d+(?=\.|$)", ".N", module)


# --------------------------------------------------------------------------- full weights

@dataclass
class FullWeights:
    path: Path
    sha256: str
    component: str                # unet | text_encoder
    naming: str                   # diffusers | ldm | hf
    tensors: dict[str, torch.Tensor]
    entry: manifest.Entry | None = None


_UNET_DIFFUSERS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in.", "conv_out.", "time_embedding.")
_HF5_TEXT = ("embeddings.", "encoder.layers.", "final_layer_norm.")
_UNET_LDM = ("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "out.")


def load_full_weights(path: str | os.PathLike) -> FullWeights:
    """A full safety UNet or text encoder (safetensors), its naming recognised."""
    wf = read_safetensors(path)
    keys = list(wf.tensors)
    for k, v in wf.tensors.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise ModelLoadError(f"{wf.path.name}: tensor {k} contains NaN or infinite values.")
    if any(".lora" in k or "lora_" in k for k in keys):
        raise ModelLoadError(f"{wf.path.name} is a LoRA, not full weights: use SafeT2I Load Safety LoRA.")
    tensors = dict(wf.tensors)
    for prefix in ("model.diffusion_model.", "diffusion_model.", "unet.", "text_encoder."):
        if all(k.startswith(prefix) for k in keys):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
            break
    ks = list(tensors)
    if all(k.startswith(_UNET_DIFFUSERS) or k.startswith(("add_embedding.", "conv_norm_out.")) for k in ks):
        comp, naming = "unet", "diffusers"
    elif all(k.startswith(_UNET_LDM) or k.startswith("label_emb.") for k in ks):
        comp, naming = "unet", "ldm"
    elif all(k.startswith("text_model.") or k.startswith("text_projection") or k == "logit_scale" for k in ks):
        comp, naming = "text_encoder", "hf"
    elif all(k.startswith(_HF5_TEXT) for k in ks):
        # transformers >= 5 saves CLIPTextModel without the text_model. level
        tensors = {"text_model." + k: v for k, v in tensors.items()}
        comp, naming = "text_encoder", "hf"
    else:
        odd = [k for k in ks if not k.startswith(_UNET_DIFFUSERS + _UNET_LDM + ("text_model.",))][:3]
        raise ModelLoadError(f"{wf.path.name}: not a UNet or CLIP text-encoder state dict (e.g. keys {odd}); "
                             "checkpoints combining several models are loaded with ComfyUI's checkpoint loader.")
    return FullWeights(wf.path, wf.sha256, comp, naming, tensors, manifest.find(wf.path.name, wf.sha256))
