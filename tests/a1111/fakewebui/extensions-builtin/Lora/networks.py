"""Stand-in for the built-in Lora extension's ``networks.py``, one file for the three readings:

* A1111 (``extensions-builtin/Lora/networks.py``): ``load_networks`` resolves each name
  (``available_network_aliases``), ``load_network`` reads the file and matches every kohya key
  against ``sd_model.network_layer_mapping`` (``assign_network_names_to_compvis_modules``: the
  UNet's and text encoder's module names with ``.`` → ``_``) after
  ``convert_diffusers_name_to_compvis`` (and the ``lora_unet`` → ``diffusion_model``
  fallback); a matched layer becomes one entry of ``net.modules``,
  unmatched keys are only logged ("Network … didn't match keys") and skipped. The network is
  appended to ``loaded_networks`` with its ``te_multiplier``/``unet_multiplier``.
* Forge (``sd_forge_lora/networks.py``) and reForge (``Lora/networks.py``): the same
  ``loaded_networks`` bookkeeping, then the applied set ``current_lora_hash =
  str([[filename, unet_m, te_m(, online)], ...])``; when it changed, ``forge_objects`` is reset
  to ``forge_objects_original`` and ``load_lora_for_models`` (Forge: this module; reForge:
  ``ldm_patched.modules.sd``) maps the file's keys through ``model_lora_keys_unet`` /
  ``model_lora_keys_clip`` to the model's weight keys and adds the patches to clones of the
  UNet and CLIP patchers (``add_patches`` keeps only keys the model has); unmatched keys are
  logged (Forge: more than 12 unmatched keys and the file is not applied at all, "LoRA version
  mismatch"). ``forge_objects_after_applying_lora`` is the result. Forge's Flux (``'flux' in
  config.huggingface_repo``) also maps diffusers ``transformer.…`` keys onto slices of the
  stacked weights (``flux_to_diffusers``); not modelled: SafeT2I writes native kohya names only.

The toy model's LoRA-targetable layers are ``_toy.LORA_UNET_LAYERS`` / ``LORA_TE_LAYERS``.
Names starting with ``_`` are the stand-in's own (upstream they are variant-specific helpers).
"""

from __future__ import annotations

import logging
import os
import re

import network
from _variant import VARIANT as _VARIANT
from modules import shared

_FORGE_LIKE = _VARIANT in ("forge", "reforge")
log = logging.getLogger("lora")


# ----------------------------------------------------------------------------- key names

def _convert_diffusers_name_to_compvis(key):
    """A1111 ``convert_diffusers_name_to_compvis`` for the layers the toy model has (SD1's
    down-block attentions and the text encoder's layers); other keys are left as they are."""
    m = re.match(r"lora_unet_down_blocks_(\d+)_attentions_(\d+)_(.+)", key)
    if m:
        return f"diffusion_model_input_blocks_{1 + int(m[1]) * 3 + int(m[2])}_1_{m[3]}"
    m = re.match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", key)
    return f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}" if m else key


def _assign_network_names_to_compvis_modules(sd_model):
    """A1111: ``network_layer_mapping`` over ``cond_stage_model.wrapped`` and ``model``
    (the toy keeps those layers in ``sd_model.lora_layers``)."""
    mapping = {}
    layers = sd_model.lora_layers
    for name, module in layers.te.named_modules():
        mapping[name.replace(".", "_")] = module
    for name, module in layers.unet.named_modules(prefix="diffusion_model"):
        mapping[name.replace(".", "_")] = module
    sd_model.network_layer_mapping = mapping


def _ldm_to_diffusers(ldm):
    """The diffusers name of an SD1 down-block attention layer (``unet_to_diffusers``)."""
    m = re.match(r"input_blocks\.(\d+)\.1\.(.+)$", ldm)
    if m and int(m.group(1)) > 0:
        n = int(m.group(1)) - 1
        return f"down_blocks.{n // 3}.attentions.{n % 3}.{m.group(2)}"
    return None


def _model_lora_keys_unet(model, key_map):
    """ComfyUI/Forge ``model_lora_keys_unet``: ``lora_unet_<ldm>`` and ``lora_unet_<diffusers>``
    (kohya), ``diffusion_model.<ldm>`` → the weight key."""
    for k, _ in model.named_parameters():
        if k.startswith("diffusion_model.") and k.endswith(".weight"):
            ldm = k[len("diffusion_model."):-len(".weight")]
            key_map["lora_unet_{}".format(ldm.replace(".", "_"))] = k
            key_map[k[:-len(".weight")]] = k
            diffusers = _ldm_to_diffusers(ldm)
            if diffusers:
                key_map["lora_unet_{}".format(diffusers.replace(".", "_"))] = k
    return key_map


def _model_lora_keys_clip(model, key_map):
    """ComfyUI/Forge ``model_lora_keys_clip`` for CLIP-L alone: ``lora_te_text_model_…``."""
    lora_clip_map = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
                     "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
                     "self_attn.out_proj": "self_attn_out_proj"}
    sdk = set(k for k, _ in model.named_parameters())
    for b in range(32):
        for c in lora_clip_map:
            k = "clip_l.transformer.text_model.encoder.layers.{}.{}.weight".format(b, c)
            if k in sdk:
                key_map["lora_te_text_model_encoder_layers_{}_{}".format(b, lora_clip_map[c])] = k
                key_map["text_encoder.text_model.encoder.layers.{}.{}".format(b, c)] = k
    return key_map


def _load_lora(lora, to_load):
    """ComfyUI/Forge ``load_lora``: (patch_dict, keys left unmatched)."""
    patch_dict = {}
    loaded_keys = set()
    for x in to_load:
        up, down, alpha = f"{x}.lora_up.weight", f"{x}.lora_down.weight", f"{x}.alpha"
        if up in lora and down in lora:
            a = lora[alpha].item() if alpha in lora else None
            patch_dict[to_load[x]] = ("lora", (lora[up], lora[down], a, lora.get(f"{x}.lora_mid.weight"),
                                               lora.get(f"{x}.dora_scale")))
            loaded_keys.update(k for k in (up, down, alpha, f"{x}.lora_mid.weight", f"{x}.dora_scale") if k in lora)
    return patch_dict, {k: v for k, v in lora.items() if k not in loaded_keys}


def _load_lora_for_models(model, clip, lora, strength_model, strength_clip, filename='default'):
    """Forge ``networks.load_lora_for_models`` / reForge ``ldm_patched.modules.sd``'s: the
    patches go to clones of the UNet and CLIP patchers (keys the file has and the model lacks
    are logged and skipped)."""
    unet_keys = _model_lora_keys_unet(model.model, {})
    clip_keys = _model_lora_keys_clip(clip.cond_stage_model, {})
    if _VARIANT == "forge":
        lora_unet, lora_unmatch = _load_lora(lora, unet_keys)
        lora_clip, lora_unmatch = _load_lora(lora_unmatch, clip_keys)
        if len(lora_unmatch) > 12:
            print(f'[LORA] LoRA version mismatch for {type(model.model).__name__}: {filename}')
            return model, clip
        if len(lora_unmatch) > 0:
            print(f'[LORA] Loading {filename} with unmatched keys {list(lora_unmatch.keys())}')
        model = model.clone()
        model.add_patches(filename=filename, patches=lora_unet, strength_patch=strength_model)
        clip = clip.clone()
        clip.add_patches(filename=filename, patches=lora_clip, strength_patch=strength_clip)
        return model, clip
    # reForge (ComfyUI): one key map, both clones get the patches their model has
    loaded, unmatched = _load_lora(lora, {**unet_keys, **clip_keys})
    for x in unmatched:
        log.warning("lora key not loaded: %s", x)
    new_model = model.clone()
    new_model.add_patches(loaded, strength_model)
    new_clip = clip.clone()
    new_clip.add_patches(loaded, strength_clip)
    return new_model, new_clip


def _load_lora_state_dict(filename):
    from safetensors.torch import load_file
    return load_file(filename)


# ----------------------------------------------------------------------------- loading

def load_network(name, network_on_disk):
    net = network.Network(name, network_on_disk)
    if _FORGE_LIKE:
        return net
    sd = _load_lora_state_dict(network_on_disk.filename)
    sd_model = shared.sd_model
    if not hasattr(sd_model, 'network_layer_mapping'):
        _assign_network_names_to_compvis_modules(sd_model)
    keys_failed_to_match = {}
    matched_networks = {}
    for key_network, weight in sd.items():
        key_network_without_network_parts, _, network_part = key_network.partition(".")
        key = _convert_diffusers_name_to_compvis(key_network_without_network_parts)
        sd_module = sd_model.network_layer_mapping.get(key, None)
        if sd_module is None and "lora_unet" in key_network_without_network_parts:
            key = key_network_without_network_parts.replace("lora_unet", "diffusion_model")
            sd_module = sd_model.network_layer_mapping.get(key, None)
        if sd_module is None:
            keys_failed_to_match[key_network] = key
            continue
        matched_networks.setdefault(key, {})[network_part] = weight
    for key, weights in matched_networks.items():     # network_lora.ModuleTypeLora: up and down weights
        net.modules[key] = weights
    if keys_failed_to_match:
        logging.debug(f"Network {network_on_disk.filename} didn't match keys: {keys_failed_to_match}")
    return net


def load_networks(names, te_multipliers=None, unet_multipliers=None):
    """Each name resolved through ``available_network_aliases`` (a name it lacks is skipped:
    "Lora not found"), loaded and appended to ``loaded_networks``; Forge/reForge then apply the
    set to the model's patchers (see the module docstring)."""
    current_sd = shared.sd_model
    loaded_networks.clear()
    networks_on_disk = [available_network_aliases.get(name, None) for name in names]
    for i, (network_on_disk, name) in enumerate(zip(networks_on_disk, names)):
        if network_on_disk is None:
            continue
        net = load_network(name, network_on_disk)
        net.mentioned_name = name
        network_on_disk.read_hash()
        net.te_multiplier = te_multipliers[i]
        net.unet_multiplier = unet_multipliers[i]
        loaded_networks.append(net)
    if not _FORGE_LIKE:
        return
    compiled_lora_targets = []
    for a, b, c in zip(networks_on_disk, unet_multipliers, te_multipliers):
        if a is None:
            continue
        compiled_lora_targets.append([a.filename, b, c, False] if _VARIANT == "forge" else [a.filename, b, c])
    compiled_lora_targets_hash = str(compiled_lora_targets)
    if current_sd.current_lora_hash == compiled_lora_targets_hash:
        return
    current_sd.current_lora_hash = compiled_lora_targets_hash
    current_sd.forge_objects.unet = current_sd.forge_objects_original.unet
    current_sd.forge_objects.clip = current_sd.forge_objects_original.clip
    for filename, strength_model, strength_clip, *_ in compiled_lora_targets:
        lora_sd = _load_lora_state_dict(filename)
        current_sd.forge_objects.unet, current_sd.forge_objects.clip = _load_lora_for_models(
            current_sd.forge_objects.unet, current_sd.forge_objects.clip, lora_sd, strength_model, strength_clip,
            filename=filename)
    current_sd.forge_objects_after_applying_lora = current_sd.forge_objects.shallow_copy()


def list_available_networks():
    """Upstream scans the Lora folder (``--lora-dir``) into the two dicts below; the stand-in's
    folder starts empty, and files are made known by ``available_networks[name] = …`` (as
    extensions do)."""
    available_networks.clear()
    available_network_aliases.clear()
    os.makedirs(shared.cmd_opts.lora_dir, exist_ok=True)


extra_network_lora = None

available_networks = {}
available_network_aliases = {}
loaded_networks = []

list_available_networks()
