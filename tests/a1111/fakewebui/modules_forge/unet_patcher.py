"""Stand-in for reForge's ``modules_forge/unet_patcher.py``."""

from ldm_patched.modules.model_patcher import ModelPatcher


class UnetPatcher(ModelPatcher):
    def append_model_option(self, k, v, ensure_uniqueness=False):
        self.model_options.setdefault(k, []).append(v)

    def add_conditioning_modifier(self, modifier, ensure_uniqueness=False):
        self.append_model_option('conditioning_modifiers', modifier, ensure_uniqueness)
