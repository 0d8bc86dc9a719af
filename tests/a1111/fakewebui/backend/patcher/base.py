"""Stand-in for Forge's ``backend/patcher/base.py``: ``ModelPatcher`` — ``clone()`` deep-copies
``model_options`` (the post-cfg functions live there); ``add_patches`` records LoRA patches per
file in ``lora_patches``; the model's one ``lora_loader`` (shared by the clones) merges them
when the memory manager loads the patcher (``refresh_loras``)."""

import copy

from backend.patcher.lora import LoraLoader


def set_model_options_post_cfg_function(model_options, post_cfg_function, disable_cfg1_optimization=False):
    model_options["sampler_post_cfg_function"] = model_options.get("sampler_post_cfg_function", []) + [post_cfg_function]
    if disable_cfg1_optimization:
        model_options["disable_cfg1_optimization"] = True
    return model_options


class ModelPatcher:
    def __init__(self, model, load_device, offload_device, **kwargs):
        self.model = model
        self.lora_patches = {}
        self.model_options = {"transformer_options": {}}
        self.load_device = load_device
        self.offload_device = offload_device
        if not hasattr(model, 'lora_loader'):
            model.lora_loader = LoraLoader(model)
        self.lora_loader = model.lora_loader

    def clone(self):
        n = self.__class__(self.model, self.load_device, self.offload_device)
        n.lora_patches = self.lora_patches.copy()
        n.model_options = copy.deepcopy(self.model_options)
        return n

    def add_patches(self, *, filename, patches, strength_patch=1.0, strength_model=1.0, online_mode=False):
        """Upstream: keeps the patches whose key is one of the model's parameters, recorded per
        LoRA identifier in ``lora_patches``; returns the keys it kept."""
        lora_identifier = (filename, strength_patch, strength_model, online_mode)
        this_patches = {}
        model_keys = set(k for k, _ in self.model.named_parameters())
        for key in patches:
            if key in model_keys:
                this_patches.setdefault(key, []).append([strength_patch, patches[key], strength_model, None, None])
        self.lora_patches[lora_identifier] = this_patches
        return set(this_patches)

    def is_clone(self, other):
        return hasattr(other, 'model') and self.model is other.model

    def refresh_loras(self):
        self.lora_loader.refresh(lora_patches=self.lora_patches, offload_device=self.offload_device)

    def memory_required(self, input_shape):
        return 0

    def set_model_sampler_post_cfg_function(self, post_cfg_function, disable_cfg1_optimization=False):
        self.model_options = set_model_options_post_cfg_function(self.model_options, post_cfg_function,
                                                                 disable_cfg1_optimization)
