"""Stand-in for ``modules/sd_samplers_common.py``: latent → preview image, ``store_latent``
(live previews), the ``Sampler`` base with its step bookkeeping (``state.sampling_step``)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from modules import _variant, shared


def samples_to_images_tensor(sample, approximation=None, model=None):
    model = model or shared.sd_model
    return model.decode_first_stage(sample)


def single_sample_to_image(sample, approximation=None):
    x = samples_to_images_tensor(sample.unsqueeze(0), approximation)[0] * 0.5 + 0.5
    x = torch.clamp(x, 0.0, 1.0)
    x = (255. * np.moveaxis(x.cpu().numpy(), 0, 2)).astype(np.uint8)
    return Image.fromarray(x)


def decode_first_stage(model, x):
    return samples_to_images_tensor(x, 0, model)


def sample_to_image(samples, index=0, approximation=None):
    return single_sample_to_image(samples[index], approximation)


def images_tensor_to_samples(image, approximation=None, model=None):
    model = model or shared.sd_model
    return model.get_first_stage_encoding(model.encode_first_stage(image * 2 - 1))


def store_latent(decoded):
    """Upstream keeps the latent for the progress API; without parallel processing (the API's
    one-job-at-a-time mode) the preview image is made right here (every step: the stand-in has
    no "Live preview display period")."""
    if not shared.parallel_processing_allowed:
        shared.state.assign_current_image(sample_to_image(decoded))


def setup_img2img_steps(p, steps=None):
    if steps is not None:
        requested_steps = steps or p.steps
        steps = int(requested_steps / min(p.denoising_strength, 0.999)) if p.denoising_strength > 0 else 0
        t_enc = requested_steps - 1
    else:
        steps = p.steps
        t_enc = int(min(p.denoising_strength, 0.999) * steps)
    return steps, t_enc


def _forge_sampling_prepare(x):
    """Forge's samplers call ``backend.sampling.sampling_function.sampling_prepare`` on
    ``forge_objects.unet`` at the start of every pass (the stand-in's own helper)."""
    if _variant.VARIANT == "forge":
        from backend.sampling.sampling_function import sampling_prepare
        sampling_prepare(shared.sd_model.forge_objects.unet, x=x)


class Sampler:
    def __init__(self, funcname):
        self.funcname = funcname
        self.last_latent = None
        self.model_wrap_cfg = None
        self.sampler_extra_args = None

    def callback_state(self, d):
        shared.state.sampling_step = d['i']

    def launch_sampling(self, steps, func):
        self.model_wrap_cfg.steps = steps
        self.model_wrap_cfg.total_steps = steps * 2 - 1 if self.funcname == "sample_heun" else steps
        shared.state.sampling_steps = steps
        shared.state.sampling_step = 0
        return func()

    def initialize(self, p) -> dict:
        self.model_wrap_cfg.p = p
        self.model_wrap_cfg.mask = p.mask if hasattr(p, 'mask') else None
        self.model_wrap_cfg.nmask = p.nmask if hasattr(p, 'nmask') else None
        self.model_wrap_cfg.step = 0
        return {}

    def _extra_args(self, p, conditioning, unconditional_conditioning, image_conditioning):
        return {'cond': conditioning, 'image_cond': image_conditioning, 'uncond': unconditional_conditioning,
                'cond_scale': p.cfg_scale, 's_min_uncond': 0.0}      # NGMS is not modelled
