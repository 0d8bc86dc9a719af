"""Model layer nodes: safety LoRAs and full safety weights, with proof that every weight was patched.

ComfyUI's stock LoraLoader silently skips keys it does not know (DUO's diffusers keys among
them: "lora key not loaded"). These nodes convert the file to names ComfyUI's own key map
knows, check every target against the model (name *and* shape) before loading, load through
``comfy.sd.load_lora_for_models``, then verify that each expected weight carries a patch.
"""

from __future__ import annotations

import json

import torch
from comfy_api.latest import io, ui

from ..safet2i.errors import SafeT2IError
from ..safet2i.lora import Target, check, check_made_for, load_full_weights, load_lora, merged, require_full
from ..safet2i.lora import full_weights as full
from ..safet2i.lora.coverage import check_strengths, patch_gain_problems, patch_counts
from ..safet2i.lora.dit_arch import match_config, native_candidates
from ..safet2i.lora.manifest import check_arch, rename_hint
from .paths import safety_weight_names, safety_weight_path

_CLIP_PREFIXES = {"te1": ("lora_te_", "lora_te1_"), "te2": ("lora_te2_",)}


def _candidates(t: Target) -> list[str]:
    if t.component == "unet":
        out = [f"lora_unet_{t.module.replace('.', '_')}", f"diffusion_model.{t.module}"]
        if t.naming in ("diffusers", "dit"):
            # Transformers: ComfyUI's own diffusers map (Flux, SD3, Qwen-Image: `transformer.<path>`,
            # stacked qkv / linear1 as (weight, offset) slices, swapped AdaLN rows with its function),
            # then the native 1:1 name (Wan's map has no diffusers names).
            out.append(f"transformer.{t.module}")
            out += [f"diffusion_model.{n}" for n in native_candidates(t.module)]
        return out
    flat = t.module.replace(".", "_")
    return [p + flat for p in _CLIP_PREFIXES[t.component]]


def _resolver(key_map: dict, unet_sd: dict, clip_sd: dict):
    chosen: dict[str, str] = {}

    def resolve(t: Target):
        for cand in _candidates(t):
            entry = key_map.get(cand)
            if entry is None:
                continue
            host, shape_of = _key_map_entry(entry)
            sd = unet_sd if t.component == "unet" else clip_sd
            w = sd.get(host) if host else None
            if w is None:
                continue
            chosen[t.name] = cand
            return host, shape_of(tuple(w.shape))
        return None, None

    return resolve, chosen


def _key_map_entry(entry):
    """(weight key, host shape → the shape the LoRA patches) of a ComfyUI key-map value: a key,
    ``(key, (dim, offset, size))`` (a slice of a stacked weight: Flux/SD3 qkv, Flux linear1) or
    ``(key, None, function)`` (rows transformed, e.g. swap_scale_shift: the whole weight)."""
    if isinstance(entry, str):
        return entry, lambda shape: shape
    key, offset = entry[0], entry[1] if len(entry) > 1 else None
    if offset is None:
        return key, lambda shape: shape
    dim, _, size = offset

    def sliced(shape):
        out = list(shape)
        out[dim] = size
        return tuple(out)

    return key, sliced


def comfy_transformer_arch(family: str, unet_config: dict) -> str:
    """A ComfyUI transformer's architecture (``safet2i.lora.dit_arch`` name) from its ``unet_config``:
    the released one whose every LoRA-targetable Linear equals it, else ``"<family> (…)"``."""
    c = dict(unet_config)
    if family == "flux":
        p, h, heads = int(c.get("patch_size", 2)), int(c["hidden_size"]), int(c["num_heads"])
        cfg = dict(num_layers=c["depth"], num_single_layers=c["depth_single_blocks"], num_attention_heads=heads,
                   attention_head_dim=h // heads, in_channels=int(c["in_channels"]) * p * p, patch_size=1,
                   out_channels=int(c.get("out_channels", 16)) * p * p, joint_attention_dim=c["context_in_dim"],
                   pooled_projection_dim=c.get("vec_in_dim", 768), guidance_embeds=bool(c.get("guidance_embed")))
    elif family == "sd3":
        ctx = c.get("context_embedder_config", {}).get("params", {})
        cfg = dict(num_layers=c["depth"], num_attention_heads=c["depth"], attention_head_dim=64,
                   caption_projection_dim=ctx.get("out_features", 64 * c["depth"]),
                   joint_attention_dim=ctx.get("in_features", 4096), pooled_projection_dim=c.get("adm_in_channels"),
                   in_channels=c["in_channels"], out_channels=c.get("out_channels") or c["in_channels"],
                   patch_size=c["patch_size"], dual_attention_layers=tuple(c.get("x_block_self_attn_layers") or ()))
    elif family == "qwen-image":   # ComfyUI's QwenImage defaults are the release's
        cfg = dict(num_layers=c.get("num_layers", 60), num_attention_heads=c.get("num_attention_heads", 24),
                   attention_head_dim=c.get("attention_head_dim", 128), in_channels=c.get("in_channels", 64),
                   out_channels=c.get("out_channels", 16), patch_size=c.get("patch_size", 2),
                   joint_attention_dim=c.get("joint_attention_dim", 3584))
    elif family == "wan":
        dim, heads = int(c["dim"]), int(c["num_heads"])
        i2v = c.get("model_type") in ("i2v", "flf2v", "camera")
        cfg = dict(num_layers=c["num_layers"], num_attention_heads=heads, attention_head_dim=dim // heads,
                   ffn_dim=c["ffn_dim"], text_dim=c.get("text_dim", 4096), freq_dim=c.get("freq_dim", 256),
                   out_channels=c.get("out_dim", 16), patch_size=tuple(c.get("patch_size", (1, 2, 2))),
                   image_dim=1280 if i2v else None, added_kv_proj_dim=dim if i2v else None)
    else:
        raise KeyError(family)
    return match_config(family, cfg) or f"{family} (ComfyUI {family} model of no released size)"


def _comfy_family(cfg) -> str | None:
    import comfy.supported_models as sm  # noqa: PLC0415

    if isinstance(cfg, getattr(sm, "SD3", ())):
        return "sd3"
    image_model = (getattr(cfg, "unet_config", None) or {}).get("image_model")
    return {"flux": "flux", "qwen_image": "qwen-image", "wan2.1": "wan"}.get(image_model)


def host_arch(model) -> str | None:
    """``sd1``, ``sd2``, ``sdxl`` (``sdxl-refiner``); for Flux, SD3, Qwen-Image and Wan a
    ``safet2i.lora.dit_arch`` name (:func:`comfy_transformer_arch`); another ComfyUI model class
    name, or None."""
    try:
        import comfy.supported_models as sm  # noqa: PLC0415

        cfg = model.model.model_config
    except Exception:  # noqa: BLE001 - not a ComfyUI ModelPatcher: unknown
        return None
    for cls, name in ((sm.SDXLRefiner, "sdxl-refiner"), (sm.SDXL, "sdxl"), (sm.SD20, "sd2"), (sm.SD15, "sd1")):
        if isinstance(cfg, cls):
            return name
    family = _comfy_family(cfg)
    if family is not None:
        try:
            return comfy_transformer_arch(family, cfg.unet_config)
        except (KeyError, TypeError, ValueError):
            return f"{family} (ComfyUI {type(cfg).__name__}, size not recognised)"
    return f"{type(cfg).__name__} (not SD1/SD2/SDXL or a known transformer)"


def apply_lora(model, clip, lora, strength_model: float, strength_clip: float, allow_partial: bool):
    """(model, clip, Coverage): LoRA targets checked, loaded through ComfyUI, patches verified."""
    import comfy.lora  # noqa: PLC0415
    import comfy.sd  # noqa: PLC0415

    check_strengths(lora.components, strength_model, strength_clip, f"Safety LoRA {lora.path.name}")
    check_made_for(lora, host_arch(model), f"Safety LoRA {lora.path.name}")
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    clip_sd = {}
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
        clip_sd = clip.cond_stage_model.state_dict()
    unet_sd = model.model.state_dict()
    resolve, chosen = _resolver(key_map, unet_sd, clip_sd)
    cov = check(lora.targets, resolve, host="this model" + ("" if clip is not None else " (no CLIP connected)"))
    require_full(cov, f"Safety LoRA {lora.path.name}", allow_partial)

    plain: dict[str, torch.Tensor] = {}
    dora_diffs: dict[str, tuple[str, torch.Tensor]] = {}  # PEFT DoRA: exact merged diff
    host_of = {s.target: s.host_key for s in cov.matched}
    for t in lora.targets:
        if t.name not in chosen:
            continue
        if t.dora_kind == "peft":
            if not isinstance(key_map.get(chosen[t.name]), str):
                raise SafeT2IError(f"{t.name}: a PEFT DoRA target on a slice of a stacked weight (or rows ComfyUI "
                                   "transforms) cannot be applied exactly; not supported.")
            host = host_of[t.name]
            base = (unet_sd if t.component == "unet" else clip_sd)[host]
            dora_diffs[t.name] = (host, merged(base.float(), t, 1.0) - base.float())
            continue
        name = chosen[t.name]
        plain[f"{name}.lora_down.weight"] = t.down
        plain[f"{name}.lora_up.weight"] = t.up
        if t.mid is not None:
            plain[f"{name}.lora_mid.weight"] = t.mid
        plain[f"{name}.alpha"] = torch.tensor(t.kohya_alpha)  # ComfyUI: scale = alpha / rank
        if t.dora_scale is not None:
            plain[f"{name}.dora_scale"] = t.dora_scale
    # Patches already on the inputs (an earlier LoRA on the same weights) are copied by clone():
    # count per weight before and after, so only patches added here count as proof.
    unet_before = patch_counts(model.patches)
    clip_before = patch_counts(clip.patcher.patches) if clip is not None else {}
    new_model, new_clip = comfy.sd.load_lora_for_models(model, clip, plain, strength_model, strength_clip)
    if dora_diffs:
        u = {h: ("diff", (d,)) for n, (h, d) in dora_diffs.items() if n.startswith("unet:")}
        c = {h: ("diff", (d,)) for n, (h, d) in dora_diffs.items() if not n.startswith("unet:")}
        if u:
            new_model.add_patches(u, strength_model)
        if c and new_clip is not None:
            new_clip.add_patches(c, strength_clip)
    # Proof: every matched target's host weight gained exactly one patch in the returned objects.
    unet_keys = [s.host_key for s in cov.matched if s.target.startswith("unet:")]
    clip_keys = [s.host_key for s in cov.matched if not s.target.startswith("unet:")]
    problems = patch_gain_problems(unet_before, patch_counts(new_model.patches), unet_keys)
    problems += patch_gain_problems(clip_before, patch_counts(new_clip.patcher.patches) if new_clip is not None else {},
                                    clip_keys)
    if problems:
        raise SafeT2IError(f"ComfyUI did not register exactly one new patch for {len(problems)} weights of "
                           f"{lora.path.name} (e.g. {problems[:3]}); the model is NOT protected, so nothing is returned.")
    cov.applied = unet_keys + clip_keys
    return new_model, new_clip, cov


def _report(path, sha, entry, check_state, extra: dict) -> dict:
    rep = {"file": path.name, "sha256": sha, "manifest": entry.name if entry else None, "manifest_check": check_state}
    if entry:
        rep.update({"title": entry.title, "paper": entry.paper, "licence": entry.licence, "arch": entry.arch})
    else:
        hint = rename_hint(path.name)
        if hint:
            rep["manifest_hint"] = hint
    rep.update(extra)
    return rep


class SafeT2ILoadSafetyLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SafeT2ILoadSafetyLoRA",
            display_name="SafeT2I Load Safety LoRA",
            category="SafeT2I/model",
            description=(
                "Loads a safety LoRA (DUO, SC-DPO-style, ...) in any key format (kohya, diffusers, PEFT, old "
                "attn-processor, LDM names, DoRA) through ComfyUI's own LoRA patching, and proves every target "
                "weight was patched: a file that would patch nothing or only part of itself is an error."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model to protect."),
                io.Clip.Input("clip", tooltip="Its text encoder (patched when the file has text-encoder keys)."),
                io.Combo.Input("lora_name", options=safety_weight_names(lora=True),
                               tooltip="From models/loras or models/safety_models (.safetensors)."),
                io.Float.Input("strength_model", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Multiplier of the UNet patch (1.0 = as trained). Negative values (they invert a "
                                       "safety LoRA) and 0 for a file with UNet weights are refused."),
                io.Float.Input("strength_clip", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Multiplier of the text-encoder patch. Negative values are refused, and 0 when "
                                       "the file has text-encoder weights."),
                io.Boolean.Input("allow_partial", default=False,
                                 tooltip="Load even if some target weights do not exist in this model (reported)."),
            ],
            outputs=[io.Model.Output(display_name="model"), io.Clip.Output(display_name="clip"),
                     io.String.Output(display_name="coverage_report")],
        )

    @classmethod
    def execute(cls, model, clip, lora_name, strength_model=1.0, strength_clip=1.0, allow_partial=False):
        path = safety_weight_path(lora_name, lora=True)
        lora = load_lora(path)
        state = lora.verify_manifest()
        new_model, new_clip, cov = apply_lora(model, clip, lora, strength_model, strength_clip, allow_partial)
        rep = _report(lora.path, lora.sha256, lora.entry, state, {
            "formats": lora.formats, "architectures": lora.architectures, "ranks": sorted(lora.ranks),
            "scales": sorted({round(t.scale, 6) for t in lora.targets}), "alpha_from": lora.alpha_source,
            "adapter_config": lora.adapter_config, "host_arch": host_arch(model),
            "strength_model": strength_model, "strength_clip": strength_clip, "allow_partial": allow_partial,
            **cov.as_dict(),
        })
        text = f"{lora.path.name}: {cov.summary()}; {len(cov.applied)} patched; scale from {lora.alpha_source}"
        if cov.unmatched:
            text += f"; PARTIAL: {len(cov.unmatched)} not loaded (allow_partial)"
        if rep.get("manifest_hint"):
            text += f"; {rep['manifest_hint']}"
        return io.NodeOutput(new_model, new_clip, json.dumps(rep), ui=ui.PreviewText(text))


def _unet_names(model):
    """ComfyUI's own diffusers → LDM map of the loaded model's UNet config (any ComfyUI UNet)."""
    import comfy.utils  # noqa: PLC0415

    return lambda: comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)


_PARTIAL_HINT = ". Enable allow_partial to load the rest anyway."


class SafeT2ILoadSafetyWeights(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SafeT2ILoadSafetyWeights",
            display_name="SafeT2I Load Safety Weights (full UNet / text encoder)",
            category="SafeT2I/model",
            description=(
                "Replaces the model's UNet (ESD-u, SafeGen) or text encoder (AdvUnlearn) weights with a released "
                "safety version (diffusers, LDM or transformers key names), checking that every tensor in the file "
                "matches a weight of the same shape and reporting how much of the model was replaced."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The base model (SD v1.4-compatible for the known releases)."),
                io.Clip.Input("clip", tooltip="Its text encoder (replaced by text-encoder files)."),
                io.Combo.Input("weights_name", options=safety_weight_names(lora=False),
                               tooltip="A .safetensors UNet or text encoder in models/safety_models."),
                io.Boolean.Input("allow_partial", default=False,
                                 tooltip="Off: the file must replace the whole UNet or text encoder, every tensor "
                                         "matched. On: load the matching tensors anyway (what is left is reported)."),
            ],
            outputs=[io.Model.Output(display_name="model"), io.Clip.Output(display_name="clip"),
                     io.String.Output(display_name="coverage_report")],
        )

    @classmethod
    def execute(cls, model, clip, weights_name, allow_partial=False):
        fw = load_full_weights(safety_weight_path(weights_name, lora=False))
        what = f"Safety weights {fw.path.name}"
        check_arch(fw.entry, host_arch(model), what)
        if fw.component == "unet":
            host_sd = model.model.state_dict()
            p = full.pair(fw, host_sd, _unet_names(model), unet_prefix="diffusion_model.")
        else:
            host_sd = clip.cond_stage_model.state_dict()
            p = full.pair(fw, host_sd)
        # Core rules (safet2i.lora.full_weights): every file tensor matched by name and shape,
        # the whole part replaced (text encoders: position_ids ignored, text_projection only
        # when the file has one); allow_partial lets either through, reported.
        rep = full.plan(what, fw.component, p.tensors, host_sd, p.pairs, p.required, "this model", p.ignored,
                        allow_partial, _PARTIAL_HINT)
        state = full.check_manifest(fw, rep)
        full.require_whole(rep, allow_partial, _PARTIAL_HINT)
        cov, fraction = rep.cov, rep.fraction
        patches = {h: ("set", (rep.tensors[k],)) for k, h in rep.pairs.items()}
        if fw.component == "unet":
            before = patch_counts(model.patches)
            new_model, new_clip = model.clone(), clip
            new_model.add_patches(patches, 1.0)
            after = patch_counts(new_model.patches)
        else:
            before = patch_counts(clip.patcher.patches)
            new_model, new_clip = model, clip.clone()
            new_clip.add_patches(patches, 1.0)
            after = patch_counts(new_clip.patcher.patches)
        problems = patch_gain_problems(before, after, list(patches))
        if problems:
            raise SafeT2IError(f"ComfyUI did not register exactly one new weight replacement for {len(problems)} weights "
                               f"of {fw.path.name} (e.g. {problems[:3]}); the model is NOT protected.")
        cov.applied = list(patches)
        report = _report(fw.path, fw.sha256, fw.entry, state, {
            "component": fw.component, "naming": fw.naming, "replaced_fraction": round(fraction, 4),
            "host_weights": rep.total, "ignored": rep.ignored, "missing": rep.missing, "host_arch": host_arch(model),
            "allow_partial": allow_partial, **cov.as_dict(),
        })
        text = f"{fw.path.name}: {cov.summary()}; replaced {fraction:.1%} of the {fw.component} weights"
        if rep.partial:
            text += (f"; PARTIAL (allow_partial): {len(cov.unmatched)} file tensors not loaded, "
                     f"{len(rep.missing)} model weights left as they were")
        if report.get("manifest_hint"):
            text += f"; {report['manifest_hint']}"
        return io.NodeOutput(new_model, new_clip, json.dumps(report), ui=ui.PreviewText(text))


NODES = [SafeT2ILoadSafetyLoRA, SafeT2ILoadSafetyWeights]
