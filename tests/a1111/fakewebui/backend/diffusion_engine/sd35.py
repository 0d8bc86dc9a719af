"""Stand-in for Forge's ``backend/diffusion_engine/sd35.py``, written from its contract (not
copied): ``StableDiffusion3.get_learned_conditioning(prompts)`` loads the text encoders' patcher,
runs the CLIP-G and CLIP-L engines (each ``(rows, pooled)``) and, with the setting
``sd3_enable_t5`` on, the T5 engine (off: 256 zero rows at the T5 width); a negative
prompt made only of empty texts gets all of them zeroed. ``crossattn`` is the CLIP-L rows and
the CLIP-G rows side by side along channels, zero-padded on the right to the T5 width (4096 in
Forge, T5-XXL's; here the T5 encoder's own, the toy's 16), followed along the tokens by the T5 rows; ``vector`` is the
pooled CLIP-L and CLIP-G outputs side by side. ``set_clip_skip`` sets both CLIP engines'. The
model's construction (engines, UNet patcher with a ``const`` predictor) is the toy's
(``_toy._sd35_model``)."""

import torch

from backend import memory_management
from backend.diffusion_engine.base import ForgeDiffusionEngine
from modules.shared import opts


class StableDiffusion3(ForgeDiffusionEngine):
    def set_clip_skip(self, clip_skip):
        for engine in (self.text_processing_engine_l, self.text_processing_engine_g):
            engine.clip_skip = clip_skip

    @torch.inference_mode()
    def get_learned_conditioning(self, prompt: list[str]):
        memory_management.load_model_gpu(self.forge_objects.clip.patcher)
        width = self.text_processing_engine_t5.text_encoder.shared.embedding_dim    # T5-XXL: 4096
        rows_g, pooled_g = self.text_processing_engine_g(prompt)
        rows_l, pooled_l = self.text_processing_engine_l(prompt)
        if opts.sd3_enable_t5:
            rows_t5 = self.text_processing_engine_t5(prompt)
        else:
            rows_t5 = torch.zeros(len(prompt), 256, width, dtype=rows_l.dtype, device=rows_l.device)
        if getattr(prompt, "is_negative_prompt", False) and all(text == "" for text in prompt):
            rows_l, rows_g, rows_t5 = (torch.zeros_like(t) for t in (rows_l, rows_g, rows_t5))
            pooled_l, pooled_g = torch.zeros_like(pooled_l), torch.zeros_like(pooled_g)
        clip = torch.cat([rows_l, rows_g], dim=-1)
        clip = torch.nn.functional.pad(clip, (0, width - clip.shape[-1]))
        return {"crossattn": torch.cat([clip, rows_t5], dim=-2), "vector": torch.cat([pooled_l, pooled_g], dim=-1)}
