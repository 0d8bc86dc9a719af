"""Full safety weights (ESD-u / SafeGen UNets, the AdvUnlearn text encoder) for one job.

The file replaces the weights of one part of the loaded model **in place** for the job and
the originals are written back when it ends (``postprocess``, or the job's clean-up when it
fails or is interrupted: ``Job.restore``), so the next job without the option runs on the
original model. Everything is checked before anything changes (core:
:mod:`safet2i.lora.full_weights`):

1. the choice is resolved inside the webui's ``models/safety_models`` and the pack's
   ``models/safety_models`` only (``lora.resolve_choice``: no ``..``, absolute paths or symlinks
   leaving the folder); the file is read by :func:`safet2i.lora.load_full_weights`
   (safetensors only, pickles refused, naming recognised, NaN/inf refused) and its manifest
   entry checked (sha256, base architecture);
2. the host part: the UNet (A1111 ``sd_model.model.diffusion_model``; Forge/reForge the UNet
   patcher's ``model.diffusion_model``) in LDM names, diffusers files renamed through the
   architecture inventory; the CLIP text encoder (A1111 SD1 ``cond_stage_model``, SDXL
   ``conditioner.embedders[0]``, Forge/reForge ``forge_objects.clip.cond_stage_model``) in
   transformers names under whatever prefix holds them;
3. coverage: every tensor of the file matched with the same shape, and the whole host part
   replaced (a text encoder's ``position_ids`` / ``text_projection`` excepted);
4. apply: LoRAs the webui merged into those weights are taken out first (A1111's network
   backups, Forge's ``lora_loader``, reForge's patcher backups), so a safety LoRA later
   applies on top of the new weights and never restores the old ones; CPU backups, copy
   (no_grad, host dtype/device), then every replaced tensor is compared bit for bit with the
   file's. Any failure raises: the job is marked failed and its images are blocked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from safet2i.errors import SafeT2IError
from safet2i.lora import load_full_weights
from safet2i.lora import full_weights as core
from safet2i.lora.arch import ARCHITECTURES
from safet2i.lora.manifest import check_arch

from . import lora as lora_layer

PARTS = ("auto", "unet", "text_encoder")
NONE = lora_layer.NONE


class WeightsLayerError(SafeT2IError):
    """The safety weights cannot be applied (wholly and exactly); the job's images are blocked."""


def roots() -> dict[str, Path]:
    """Folders a full-weights file may be chosen from: the webui's and the pack's safety_models."""
    out = {k: v for k, v in lora_layer.roots().items() if k != "Lora"}
    return out


def list_choices(folders: dict[str, Path] | None = None) -> list[str]:
    return lora_layer.list_choices(roots() if folders is None else folders)


def resolve_choice(choice: str, folders: dict[str, Path] | None = None) -> Path:
    try:
        return lora_layer.resolve_choice(choice, roots() if folders is None else folders)
    except lora_layer.LoraLayerError as exc:
        raise WeightsLayerError(str(exc).replace("safety LoRA", "safety weights", 1)) from exc


# --------------------------------------------------------------------------- the host parts

def host_module(sd_model, part: str):
    """(description, torch module) of the loaded model's UNet or CLIP text encoder."""
    fo = getattr(sd_model, "forge_objects", None)
    if part == "unet":
        if fo is not None:
            mod = getattr(getattr(getattr(fo, "unet", None), "model", None), "diffusion_model", None)
            where = "forge_objects.unet.model.diffusion_model"
        else:
            mod = getattr(getattr(sd_model, "model", None), "diffusion_model", None)
            where = "sd_model.model.diffusion_model"
    else:
        if fo is not None:
            mod = getattr(getattr(fo, "clip", None), "cond_stage_model", None)
            where = "forge_objects.clip.cond_stage_model"
        elif getattr(sd_model, "is_sdxl", False):
            embedders = getattr(getattr(sd_model, "conditioner", None), "embedders", None) or [None]
            mod, where = embedders[0], "sd_model.conditioner.embedders[0] (CLIP-L)"
        else:
            mod, where = getattr(sd_model, "cond_stage_model", None), "sd_model.cond_stage_model"
    if mod is None or not hasattr(mod, "state_dict"):
        raise WeightsLayerError(f"the loaded model has no {part.replace('_', ' ')} module at {where}")
    return where, mod


def _patchers(sd_model, part: str) -> list:
    fo = getattr(sd_model, "forge_objects", None)
    if fo is None:
        return []
    if part == "unet":
        return [fo.unet] if getattr(fo, "unet", None) is not None else []
    clip = getattr(fo, "clip", None)
    return [clip.patcher] if getattr(clip, "patcher", None) is not None else []


def unmerge_host_loras(sd_model, part: str, module) -> int:
    """Take the LoRAs the webui merged into this part out of its weights (and forget its
    backups of them), so our copy and our restore are not undone by the webui's own restore.
    Returns how many places were unmerged."""
    import torch  # noqa: PLC0415

    n = 0
    with torch.no_grad():
        for m in module.modules():        # A1111 extensions-builtin/Lora: per-module backups
            if not hasattr(m, "network_current_names") and not hasattr(m, "network_weights_backup"):
                continue
            wb = getattr(m, "network_weights_backup", None)
            bb = getattr(m, "network_bias_backup", None)
            if isinstance(wb, torch.Tensor):
                m.weight.copy_(wb)
                n += 1
            elif isinstance(wb, tuple) and len(wb) == 2:            # MultiheadAttention
                m.in_proj_weight.copy_(wb[0])
                m.out_proj.weight.copy_(wb[1])
                n += 1
            if isinstance(bb, torch.Tensor) and getattr(m, "bias", None) is not None:
                m.bias.copy_(bb)
            elif isinstance(bb, tuple) and len(bb) == 2 and getattr(m, "in_proj_bias", None) is not None:
                m.in_proj_bias.copy_(bb[0])
                m.out_proj.bias.copy_(bb[1])
            m.network_weights_backup = None
            m.network_bias_backup = None
            m.network_current_names = ()
    for patcher in _patchers(sd_model, part):
        loader = getattr(getattr(patcher, "model", None), "lora_loader", None)
        if loader is not None and (getattr(loader, "backup", None) or getattr(loader, "online_backup", None)):
            loader.refresh({}, offload_device=getattr(patcher, "offload_device", "cpu"), force_refresh=True)  # Forge
            n += 1
        backup = getattr(patcher, "backup", None)
        if isinstance(backup, dict) and backup and hasattr(patcher, "unpatch_model"):             # reForge
            patcher.unpatch_model(unpatch_weights=True)
            n += 1
    return n


def _host_dict(module) -> dict:
    return module.state_dict(keep_vars=True)


# --------------------------------------------------------------------------- one job's weights

@dataclass
class SafetyWeights:
    choice: str
    sha256: str
    part: str
    where: str
    rep: core.Replacement
    sd_model: object = None
    unmerged: int = 0
    restored: bool = False
    notes: list[str] = field(default_factory=list)

    def infotext(self) -> str:
        return (f"{self.choice} [sha256 {self.sha256[:12]} {self.part} {len(self.rep.pairs)}/{self.rep.total} "
                f"{'verified' if self.rep.applied else 'not applied'}]")

    def restore(self) -> None:
        """Write the originals back (idempotent); raises if they are not bit-identical afterwards."""
        if self.restored or not self.rep.applied:
            self.restored = True
            return
        self.restored = True
        _, module = host_module(self.sd_model, self.part)
        unmerge_host_loras(self.sd_model, self.part, module)
        wrong = core.restore(self.rep, _host_dict(module))
        if wrong:
            raise WeightsLayerError(f"the original {self.part} weights could not be restored exactly for "
                                    f"{len(wrong)} tensors (e.g. {wrong[:3]}); reload the checkpoint")


def prepare(choice: str, sd_model, part: str = "auto") -> SafetyWeights:
    """Load and check everything; nothing in the model changes yet."""
    if part not in PARTS:
        raise WeightsLayerError(f"unknown part {part!r}; use one of {PARTS}")
    path = resolve_choice(choice)
    fw = load_full_weights(path)
    core.check_file_part(fw, part)
    arch = lora_layer.model_architecture(sd_model)
    what = f"Safety weights {fw.path.name}"
    check_arch(fw.entry, arch, what)
    where, module = host_module(sd_model, fw.component)
    host = _host_dict(module)
    p = core.pair(fw, host, lambda: core.unet_key_map(ARCHITECTURES[arch].unet))
    if fw.component == "text_encoder" and p.prefix is None:
        raise WeightsLayerError(f"{what}: {where} is not a CLIP text encoder with transformers names "
                                "(SD2's OpenCLIP is not supported)")
    rep = core.plan(what, fw.component, p.tensors, host, p.pairs, p.required, where, p.ignored)
    state = core.check_manifest(fw, rep)
    core.require_whole(rep)
    sw = SafetyWeights(choice, fw.sha256, fw.component, where, rep, sd_model)
    sw.notes.append(f"manifest {fw.entry.name if fw.entry else 'none'} ({state})")
    return sw


def apply(sw: SafetyWeights) -> None:
    """Unmerge the webui's LoRAs from the part, back up, copy, prove bit for bit."""
    _, module = host_module(sw.sd_model, sw.part)
    sw.unmerged = unmerge_host_loras(sw.sd_model, sw.part, module)
    core.apply(sw.rep, _host_dict(module))


__all__ = ["NONE", "PARTS", "SafetyWeights", "WeightsLayerError", "apply", "host_module", "list_choices", "prepare",
           "resolve_choice", "roots", "unmerge_host_loras"]
