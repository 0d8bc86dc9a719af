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
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ModelLoadError
from . import manifest
from .coverage import Coverage, CoverageError, check, detect_architectures, merged, require_full, resolver_for
from .files import PICKLE_SUFFIXES, WeightsFile, convert_pickle, read_safetensors
from .keys import LoraFormatError, Target, apply_peft_config, detect_format, parse, to_diffusers_naming, to_kohya

__all__ = [
    "Coverage", "CoverageError", "FullWeights", "LoraFile", "LoraFormatError", "PICKLE_SUFFIXES", "Target",
    "check", "check_made_for", "convert_pickle", "detect_architectures", "detect_format", "inspect_lora", "load_full_weights",
    "load_lora", "merged", "read_safetensors", "require_full", "resolver_for", "to_kohya",
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

    def verify_manifest(self) -> str:
        return manifest.verify(self.entry, self.sha256, self.components, [t.module for t in self.targets], self.ranks)


def check_made_for(lf: LoraFile, host_arch: str | None, what: str) -> None:
    """A safety LoRA applied to a model it was not made for is an error, even with
    ``allow_partial``: by its manifest entry (:func:`manifest.check_arch`, a known release) and,
    for any file, by its shapes: a file that fits some known bases completely but not the host's
    (SD1, SD2 or SDXL) is refused (some shapes coincide across architectures, an SD1 attention
    LoRA shares 20 of its 64 with SDXL, so a partial load would be meaningless). ``host_arch``
    None or another model class: nothing is checked here (coverage still is)."""
    from .arch import ARCHITECTURES  # noqa: PLC0415

    manifest.check_arch(lf.entry, host_arch, what)
    release = manifest.release_entry(lf.path.name) if lf.entry is None else None
    if release is not None:
        # A generic release name (gun.safetensors) identifies nothing by itself; with contents
        # that are exactly what that release holds it is taken for it here, for this check.
        try:
            manifest.verify(release, "", lf.components, [t.module for t in lf.targets], lf.ranks)
        except ModelLoadError:
            release = None
    if release is not None:
        try:
            manifest.check_arch(release, host_arch, what)
        except ModelLoadError as exc:
            raise ModelLoadError(f"{exc} (Identified by its release name {lf.path.name} and its contents.)") from exc
    if host_arch in ARCHITECTURES and lf.architectures and host_arch not in lf.architectures:
        made = ", ".join(ARCHITECTURES[a].title for a in lf.architectures)
        hint = manifest.rename_hint(lf.path.name) if lf.entry is None else None
        raise ModelLoadError(f"{what} is made for {made} (its weights fit that completely); the model is "
                             f"{ARCHITECTURES[host_arch].title}. Refused even with allow_partial: some shapes "
                             "coincide across architectures, so a partial load would be meaningless."
                             + (f" {hint}" if hint else ""))


def load_lora(path: str | os.PathLike) -> LoraFile:
    wf: WeightsFile = read_safetensors(path)
    try:
        targets = parse(wf.tensors)
        from_config = False
        if wf.adapter_config is not None:
            from_config = apply_peft_config(targets, wf.adapter_config, wf.adapter_config_path.name)
    except LoraFormatError as exc:
        raise LoraFormatError(f"{wf.path.name}: {exc}") from exc
    if from_config:
        source = wf.adapter_config_path.name + (" (use_rslora: alpha/sqrt(r))" if any(t.rslora for t in targets) else "")
    elif any(t.alpha is not None for t in targets):
        source = "file"
    else:
        source = "none (scale 1.0)"
    archs = [a for a, c in detect_architectures(targets).items() if not c.unmatched]
    if archs:
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
        "architectures": lf.architectures or ["unknown (no known base fits every target)"],
        "fit": {a: f"{len(c.matched)}/{len(c.statuses)}" for a, c in archs.items()},
        "manifest": lf.entry.name if lf.entry else None,
        "manifest_check": lf.verify_manifest(),
        "modules": sorted({_pattern(t.module) for t in lf.targets}),
    }
    hint = manifest.rename_hint(lf.path.name) if lf.entry is None else None
    if hint:
        info["manifest_hint"] = hint
    if base:
        if base not in archs:
            raise ModelLoadError(f"unknown base {base!r}; choose one of {sorted(archs)}")
        info["coverage"] = archs[base].as_dict()
        try:
            manifest.check_arch(lf.entry, base, lf.path.name)
            info["arch_check"] = "ok" if lf.entry else "not in the manifest"
        except ModelLoadError as exc:
            info["arch_check"] = f"REFUSED: {exc}"
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
