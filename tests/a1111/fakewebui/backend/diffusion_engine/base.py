"""Stand-in for Forge's ``backend/diffusion_engine/base.py``."""


class ForgeObjects:
    def __init__(self, unet, clip, vae, clipvision):
        self.unet = unet
        self.clip = clip
        self.vae = vae
        self.clipvision = clipvision

    def shallow_copy(self):
        return ForgeObjects(self.unet, self.clip, self.vae, self.clipvision)


class ForgeDiffusionEngine:
    """Upstream's base of Forge's model classes (the stand-in's toy models set its attributes
    themselves)."""

    matched_guesses = []

    def set_clip_skip(self, clip_skip):
        pass
