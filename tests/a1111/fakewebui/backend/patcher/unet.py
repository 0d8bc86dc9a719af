"""Stand-in for Forge's ``backend/patcher/unet.py``."""

from backend.patcher.base import ModelPatcher


class UnetPatcher(ModelPatcher):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.extra_model_patchers_during_sampling = []

    def clone(self):
        n = super().clone()
        n.extra_model_patchers_during_sampling = self.extra_model_patchers_during_sampling.copy()
        return n

    def append_model_option(self, k, v, ensure_uniqueness=False):
        self.model_options.setdefault(k, []).append(v)

    def add_conditioning_modifier(self, modifier, ensure_uniqueness=False):
        self.append_model_option('conditioning_modifiers', modifier, ensure_uniqueness)
