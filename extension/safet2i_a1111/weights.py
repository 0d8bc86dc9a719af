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
   file's. Any failure raises: the job is marked failed and its images are blocked. On Forge
   the LoRA patchers sharing the model are then evicted from its memory manager, so the next
   load merges the job's LoRAs again on top of the new weights (a loaded patcher is never
   re-merged by Forge itself).
5. while the job runs (``check_applied``, before and after every sampling pass): the model is
   still the one the file went into and its weights, as the webui would restore them (a
   merged LoRA's backups), are still the file's bit for bit; a model switched or reloaded
   mid-job blocks the images. Hires-fix checkpoints and refiners are refused up front.
6. restore: the originals are written back only into a model that still holds the file's
   tensors (one reloaded meanwhile is left as it is); a restore that fails marks the model
   as modified (:func:`modified`) and every later job on it is blocked until the checkpoint
   changes.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from safet2i.errors import SafeT2IError
from safet2i.lora import load_full_weights
from safet2i.lora import full_weights as core
from safet2i.lora.arch import ARCHITECTURES
from safet2i.lora.manifest import check_arch

from . import lora as lora_layer
from .config import WEIGHTS_PARTS as PARTS

NONE = lora_layer.NONE
log = logging.getLogger("safet2i")


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
        loader = _forge_loader(patcher)
        if loader is not None and (getattr(loader, "backup", None) or getattr(loader, "online_backup", None)):
            loader.refresh({}, offload_device=getattr(patcher, "offload_device", "cpu"), force_refresh=True)  # Forge
            n += 1
        backup = getattr(patcher, "backup", None)
        if isinstance(backup, dict) and backup and hasattr(patcher, "unpatch_model"):             # reForge
            patcher.unpatch_model(unpatch_weights=True)
            n += 1
    return n


def _forge_loader(patcher):
    """Forge's ``LoraLoader`` (one per model, shared by its patcher clones), or None."""
    return getattr(getattr(patcher, "model", None), "lora_loader", None)


def evict_forge_patchers(sd_model, part: str) -> int:
    """Forge merges a patcher's LoRAs (``refresh_loras``) only when its memory manager loads
    the patcher; one already loaded is used as it is. After its weights changed under it (our
    unmerge, copy or restore), every loaded clone of the part's model is taken out of the
    manager (``unload_model_clones``; the weights stay where they are), so the next load merges
    the LoRAs of the job again on top of the weights now in place. Returns how many patchers
    were looked at (0 outside Forge)."""
    patchers = [pt for pt in _patchers(sd_model, part) if _forge_loader(pt) is not None]
    if not patchers:
        return 0
    try:
        from backend import memory_management  # noqa: PLC0415  (Forge)
    except ImportError as exc:
        raise WeightsLayerError("Forge's backend.memory_management cannot be imported; its LoRAs could not be "
                                f"merged again after the weights changed ({exc})") from exc
    for patcher in patchers:
        memory_management.unload_model_clones(patcher)
    return len(patchers)


_COND_CACHES = ("cached_c", "cached_uc", "cached_hr_c", "cached_hr_uc")


def clear_cond_caches(p) -> int:
    """Empty the webui's prompt-conditioning caches (``cached_c``/``cached_uc`` and the hires
    ones: lists shared by every ``p`` through the class, keyed on prompts, steps, checkpoint and
    extra networks but not on the text encoder's weights). After the text encoder changed (our
    weights in, or the originals back) a cached cond would be the other encoder's. Emptied in
    place, so every holder of the same lists sees it. Returns how many caches were emptied."""
    n = 0
    seen = set()
    owners = [vars(p) if hasattr(p, "__dict__") else {}] + [vars(c) for c in type(p).__mro__]
    for owner in owners:
        for name in _COND_CACHES:
            cache = owner.get(name)
            if isinstance(cache, list) and id(cache) not in seen:
                seen.add(id(cache))
                cache[:] = [None] * len(cache)
                n += 1
    return n


def _host_dict(module) -> dict:
    return module.state_dict(keep_vars=True)


#: Where the part's module sits in its Forge/reForge patcher's model (the keys of the patchers'
#: backups): the UNet patcher holds the KModel (``diffusion_model.…``), the CLIP patcher the text
#: encoder itself.
_PATCHER_PREFIX = {"unet": "diffusion_model.", "text_encoder": ""}


def base_tensors(sd_model, part: str, module) -> dict:
    """The part's tensors as the webui would put them back when it takes its LoRAs out: a
    merged weight's backup (A1111 per-module ``network_weights_backup``, Forge's
    ``lora_loader.backup``, reForge's patcher ``backup``) in place of the merged value."""
    import torch  # noqa: PLC0415

    out = dict(_host_dict(module))
    for name, m in module.named_modules():
        dot = f"{name}." if name else ""
        wb, bb = getattr(m, "network_weights_backup", None), getattr(m, "network_bias_backup", None)
        if isinstance(wb, torch.Tensor) and f"{dot}weight" in out:
            out[f"{dot}weight"] = wb
        if isinstance(bb, torch.Tensor) and f"{dot}bias" in out:
            out[f"{dot}bias"] = bb
    prefix = _PATCHER_PREFIX[part]
    for patcher in _patchers(sd_model, part):
        backups = [getattr(_forge_loader(patcher), "backup", None), getattr(patcher, "backup", None)]
        for backup in backups:
            if not isinstance(backup, dict):
                continue
            for key, value in backup.items():
                value = getattr(value, "weight", value)          # reForge: (weight, inplace_update)
                if isinstance(key, str) and key.startswith(prefix) and key[len(prefix):] in out \
                        and isinstance(value, torch.Tensor):
                    out[key[len(prefix):]] = value
    return out


# --------------------------------------------------------------------------- models left modified

#: Models whose originals could not be written back: (weak model, checkpoint at the time, why).
_MODIFIED: list[tuple[weakref.ref, object, str]] = []


def _checkpoint_of(sd_model) -> object:
    info = getattr(sd_model, "sd_checkpoint_info", None)
    return (getattr(info, "filename", None) or getattr(info, "title", None), getattr(sd_model, "sd_model_hash", None))


def _mark_modified(sd_model, why: str) -> None:
    try:
        ref = weakref.ref(sd_model)
    except TypeError:
        ref = (lambda m: (lambda: m))(sd_model)
    _MODIFIED.append((ref, _checkpoint_of(sd_model), why))


def modified(sd_model) -> str | None:
    """Why this model may still hold safety weights a job could not take out (None: it does
    not): every later job on it is blocked until another checkpoint is loaded (a new model
    object, or the webui loading other weights into this one)."""
    for entry in list(_MODIFIED):
        ref, checkpoint, why = entry
        model = ref()
        if model is None or _checkpoint_of(model) != checkpoint:
            _MODIFIED.remove(entry)            # gone, or other weights loaded into it
        elif model is sd_model:
            return why
    return None


# --------------------------------------------------------------------------- one job's weights

@dataclass
class SafetyWeights:
    choice: str
    sha256: str
    part: str
    where: str
    rep: core.Replacement
    sd_model: object = None
    module: object = None          # the host module the file went into
    proven: dict = field(default_factory=dict)   # host key → marks of the tensor last proven equal
    unmerged: int = 0
    restored: bool = False
    notes: list[str] = field(default_factory=list)

    def infotext(self) -> str:
        return (f"{self.choice} [sha256 {self.sha256[:12]} {self.part} {len(self.rep.pairs)}/{self.rep.total} "
                f"{'verified' if self.rep.applied else 'not applied'}]")

    def differing(self, sd_model=None, full: bool = True, every: bool = False) -> list[str]:
        """Host keys whose weights (as the webui would restore them) are not the file's, in
        ``sd_model`` (default: the model the file went into); ``["<model>"]`` / ``["<module>"]``
        when that is another model or its part another module. ``full=False``: only those two
        identities (no tensor is read). A tensor proven equal before and not written since
        (the same tensor object and storage, the same in-place version counter) is not read
        again unless ``every``: a checkpoint loaded into the model (``load_state_dict``'s
        ``param.copy_``), a device move or a LoRA merge all change one of those."""
        sd_model = self.sd_model if sd_model is None else sd_model
        if sd_model is not self.sd_model:
            return ["<model>"]
        try:
            _, module = host_module(sd_model, self.part)
        except WeightsLayerError:
            return ["<module>"]
        if module is not self.module:
            return ["<module>"]
        if not full:
            return []
        base = base_tensors(sd_model, self.part, module)
        wrong = []
        # a second name of a replaced tensor (Forge's token embedding) is checked like the first
        of = {h: k for k, h in self.rep.pairs.items()}
        checks = list(self.rep.pairs.items()) + [(of[h], a) for a, h in self.rep.aliases.items()]
        for k, h in checks:
            t = base.get(h)
            if t is None:
                wrong.append(h)
                continue
            mark = _mark(t)
            if not every and mark is not None and self.proven.get(h) == mark:
                continue
            if core.same_bits(t, self.rep.tensors[k].to(t.dtype)):
                self.proven[h] = mark
            else:
                self.proven.pop(h, None)
                wrong.append(h)
        return wrong

    def restore(self) -> None:
        """Write the originals back (idempotent), only into a model that still holds the file's
        tensors. Raises if that fails; the model is then marked modified (:func:`modified`)."""
        if self.restored or not self.rep.applied:
            self.restored = True
            return
        try:
            wrong = self.differing(every=True)
            if wrong and wrong[0] not in ("<model>", "<module>") and \
                    len(wrong) < len(self.rep.pairs) + len(self.rep.aliases):
                raise WeightsLayerError(f"the model was partly changed during the job: {len(wrong)} of the "
                                        f"{len(self.rep.pairs)} replaced tensors are no longer the file's "
                                        f"(e.g. {wrong[:3]}), the others still are")
            if wrong:
                # Reloaded or replaced meanwhile: nothing of the file is left in it to take out,
                # and the originals must not be written over the weights now there.
                self.rep.applied = False
                self.rep.backup.clear()
                self.notes.append(f"not restored: the model no longer holds the file's weights ({wrong[:3]})")
                log.warning("SafeT2I: %s: the model was changed during the job; its weights were left as they are",
                            self.choice)
                self.restored = True
                return
            _, module = host_module(self.sd_model, self.part)
            unmerge_host_loras(self.sd_model, self.part, module)
            wrong = core.restore(self.rep, _host_dict(module))
            if wrong:
                raise WeightsLayerError(f"the original {self.part} weights could not be restored exactly for "
                                        f"{len(wrong)} tensors (e.g. {wrong[:3]})")
            evict_forge_patchers(self.sd_model, self.part)
        except Exception as exc:
            why = (f"the safety weights {self.choice} could not be taken out of the loaded model ({exc}); load "
                   "another checkpoint (or restart the webui) before generating again")
            _mark_modified(self.sd_model, why)
            raise WeightsLayerError(why) from exc
        self.restored = True


def _mark(t) -> tuple | None:
    """What :meth:`SafetyWeights.differing` remembers of a tensor proven equal; None for an
    inference tensor (Forge loads and runs models under ``torch.inference_mode``): it has no
    version counter, so it is compared again at every check."""
    try:
        version = t._version
    except RuntimeError:
        return None
    return (id(t), t.data_ptr(), version, t.device, t.dtype)


def check_applied(sw: SafetyWeights, sd_model, where: str, full: bool = True) -> None:
    """The job's model still holds the file's weights (see the module doc, step 5); ``full=False``
    checks only that it is the same model and module (before a pass: no tensor is read)."""
    if not sw.rep.applied:
        raise WeightsLayerError(f"the safety weights {sw.choice} are no longer applied ({where})")
    wrong = sw.differing(sd_model, full)
    if wrong and wrong[0] in ("<model>", "<module>"):
        raise WeightsLayerError(f"the model was switched or reloaded during the job ({where}: hires checkpoint, "
                                f"refiner or a reload); the safety weights {sw.choice} are not in it")
    if wrong:
        raise WeightsLayerError(f"{len(wrong)} weights of {sw.where} are no longer the safety weights' ({where}; "
                                f"e.g. {wrong[:3]}): the model was reloaded or changed during the job")


def prepare(choice: str, sd_model, part: str = "auto") -> SafetyWeights:
    """Load and check everything; nothing in the model changes yet."""
    if part not in PARTS:
        raise WeightsLayerError(f"unknown part {part!r}; use one of {PARTS}")
    why = modified(sd_model)
    if why:
        raise WeightsLayerError(why)
    path = resolve_choice(choice)
    fw = load_full_weights(path)
    core.check_file_part(fw, part)
    arch = lora_layer.model_architecture(sd_model)
    what = f"Safety weights {fw.path.name}"
    check_arch(fw.entry, arch, what)
    where, module = host_module(sd_model, fw.component)
    cached = [n for n, m in module.named_modules()
              if getattr(m, "fp16_weight", None) is not None or getattr(m, "fp16_bias", None) is not None]
    if cached:
        raise WeightsLayerError(f"{what}: {where} keeps FP16 copies of its original weights (fp8 storage with "
                                f"'Cache FP16 weight for LoRA', e.g. {cached[0]}); the webui's LoRA merge would "
                                "write them back over the safety weights. Turn that option off.")
    host = _host_dict(module)
    p = core.pair(fw, host, lambda: core.unet_key_map(ARCHITECTURES[arch].unet))
    if fw.component == "text_encoder" and p.prefix is None:
        raise WeightsLayerError(f"{what}: {where} is not a CLIP text encoder with transformers names "
                                "(SD2's OpenCLIP is not supported)")
    rep = core.plan(what, fw.component, p.tensors, host, p.pairs, p.required, where, p.ignored, aliases=p.aliases)
    state = core.check_manifest(fw, rep)
    core.require_whole(rep)
    sw = SafetyWeights(choice, fw.sha256, fw.component, where, rep, sd_model, module)
    sw.notes.append(f"manifest {fw.entry.name if fw.entry else 'none'} ({state})")
    return sw


def apply(sw: SafetyWeights) -> None:
    """Unmerge the webui's LoRAs from the part, back up, copy, prove bit for bit; then make
    Forge merge its LoRAs again on top at its next load."""
    _, module = host_module(sw.sd_model, sw.part)
    if module is not sw.module:
        raise WeightsLayerError(f"{sw.where} changed between checking and applying the safety weights")
    try:
        sw.unmerged = unmerge_host_loras(sw.sd_model, sw.part, module)
        core.apply(sw.rep, _host_dict(module))
    finally:
        # also when applying failed: the LoRAs were taken out, Forge must merge them again
        evict_forge_patchers(sw.sd_model, sw.part)


__all__ = ["NONE", "PARTS", "SafetyWeights", "WeightsLayerError", "apply", "base_tensors", "check_applied",
           "clear_cond_caches",
           "evict_forge_patchers", "host_module", "list_choices", "modified", "prepare", "resolve_choice", "roots",
           "unmerge_host_loras"]
