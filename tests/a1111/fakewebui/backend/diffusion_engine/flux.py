"""Stand-in for Forge's ``backend/diffusion_engine/flux.py``, written from its contract (not
copied): ``Flux.get_learned_conditioning(prompts)`` loads the text encoders' patcher and returns
``{"crossattn": <T5 engine rows>, "vector": <CLIP-L engine pooled output>}``, plus ``"guidance"``
(the distilled CFG scale per prompt, default 3.5) when the model uses distilled guidance. The
model's construction (engines, UNet patcher with a ``const`` predictor) is the toy's
(``_toy.ToyFluxModel``)."""

import torch

from backend import memory_management
from backend.diffusion_engine.base import ForgeDiffusionEngine


class Flux(ForgeDiffusionEngine):
    def set_clip_skip(self, clip_skip):
        self.text_processing_engine_l.clip_skip = clip_skip

    @torch.inference_mode()
    def get_learned_conditioning(self, prompt: list[str]):
        memory_management.load_model_gpu(self.forge_objects.clip.patcher)
        _, pooled = self.text_processing_engine_l(prompt)
        cond = {"crossattn": self.text_processing_engine_t5(prompt), "vector": pooled}
        if self.use_distilled_cfg_scale:
            scale = getattr(prompt, "distilled_cfg_scale", 3.5) or 3.5
            cond["guidance"] = torch.FloatTensor([scale] * len(prompt))
        return cond
