"""Stand-in for Forge's ``backend/text_processing/emphasis.py``, written from the webui's
documented "emphasis" setting (not copied): after the encoder, ``Original`` multiplies each row
by its token's weight and rescales so the mean of the whole tensor is unchanged; ``No norm``
multiplies without rescaling; ``Ignore`` and ``None`` leave the rows alone."""

import torch


class Emphasis:
    name = "Base"
    tokens: list
    multipliers: torch.Tensor
    z: torch.Tensor

    def after_transformers(self):
        pass


class EmphasisNone(Emphasis):
    name = "None"


class EmphasisIgnore(Emphasis):
    name = "Ignore"


class EmphasisOriginal(Emphasis):
    name = "Original"

    def after_transformers(self):
        before = self.z.mean()
        self.z = self.z * self.multipliers[..., None]
        self.z = self.z * (before / self.z.mean())


class EmphasisOriginalNoNorm(EmphasisOriginal):
    name = "No norm"

    def after_transformers(self):
        self.z = self.z * self.multipliers[..., None]


options = [EmphasisNone, EmphasisIgnore, EmphasisOriginal, EmphasisOriginalNoNorm]


def get_current_option(emphasis_option_name):
    return {cls.name: cls for cls in options}.get(emphasis_option_name, EmphasisOriginal)
