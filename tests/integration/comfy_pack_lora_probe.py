"""Test-only ComfyUI node: the weights ComfyUI itself computes for a patched MODEL. Never part of
the SafeT2I pack.

conftest.py copies every ``comfy_pack_*.py`` into the test server's custom_nodes, so this file is
self-contained (it imports nothing from this repository).

``SafeT2ITestLoraProbe(model, name)`` loads the MODEL the way sampling does
(``comfy.model_management.load_models_gpu``: ``ModelPatcher.patch_weight_to_device`` runs
``comfy.lora.calculate_weight`` over every patch, offsets and row functions included), then writes
``output/<name>.safetensors`` with, for every weight that carries patches, ``base/<key>`` (the
ModelPatcher's backup of the original weight) and ``patched/<key>`` (the weight in the loaded
model), and unloads every model again (ComfyUI restores the backups), so nothing it did outlives
the node. Its UI text (JSON): the number of patch entries per weight (``patches``), the shape of
every ``diffusion_model.*`` weight of the model (``shapes``), and ComfyUI's own LoRA key map
entries for ``transformer.*`` names (``key_map``: ``[weight key, [dim, offset, size] or null,
row function name or null]``).
"""

from __future__ import annotations

import json


def _entry(v):
    if isinstance(v, str):
        return [v, None, None]
    off = list(v[1]) if len(v) > 1 and v[1] is not None else None
    fn = getattr(v[2], "__name__", str(v[2])) if len(v) > 2 and v[2] is not None else None
    return [v[0], off, fn]


class SafeT2ITestLoraProbe:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "name": ("STRING", {"default": "probe"})}}

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "_for_testing"

    @classmethod
    def IS_CHANGED(cls, **kw):
        return float("nan")

    def run(self, model, name):
        import os

        import comfy.lora
        import comfy.model_management as mm
        import comfy.utils
        import folder_paths
        from safetensors.torch import save_file

        keys = sorted(model.patches)
        out = {}
        try:
            mm.load_models_gpu([model], force_full_load=True)
            missing = [k for k in keys if k not in model.backup]
            if missing:
                raise RuntimeError(f"ComfyUI did not patch {missing[:5]} when loading the model")
            for k in keys:
                out[f"base/{k}"] = model.backup[k].weight.detach().float().cpu().clone().contiguous()
                out[f"patched/{k}"] = comfy.utils.get_attr(model.model, k).detach().float().cpu().clone().contiguous()
        finally:
            mm.unload_all_models()
        if out:
            save_file(out, os.path.join(folder_paths.get_output_directory(), name + ".safetensors"))
        sd = model.model.state_dict()
        km = comfy.lora.model_lora_keys_unet(model.model, {})
        info = {
            "patches": {k: len(model.patches[k]) for k in keys},
            "shapes": {k: list(v.shape) for k, v in sd.items() if k.startswith("diffusion_model.")},
            "key_map": {k: _entry(v) for k, v in km.items() if k.startswith("transformer.")},
        }
        return {"ui": {"text": [json.dumps(info)]}}


NODE_CLASS_MAPPINGS = {"SafeT2ITestLoraProbe": SafeT2ITestLoraProbe}
