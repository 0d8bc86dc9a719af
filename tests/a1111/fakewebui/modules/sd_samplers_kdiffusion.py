"""Stand-in for ``modules/sd_samplers_kdiffusion.py``: k-diffusion samplers (Euler here).
The inner model returns x0 ("denoised"); ``sigma`` is σ."""

from __future__ import annotations

import torch

import modules.shared as shared
from modules import _variant, sd_samplers_cfg_denoiser, sd_samplers_common


class _CompVisDenoiser(torch.nn.Module):
    """k-diffusion's wrapper (``k_diffusion.external.CompVisDenoiser``): x0 from an ε model."""

    def __init__(self, model):
        super().__init__()
        self.inner_model = model

    def get_sigmas(self, n):
        from _toy import sigma_of_t
        t = torch.linspace(999, 0, n, dtype=torch.float64)
        return torch.cat([sigma_of_t(t), torch.zeros(1, dtype=torch.float64)])

    def forward(self, x, sigma, cond):
        from _toy import t_of_sigma
        c_in = 1.0 / torch.sqrt(sigma ** 2 + 1.0)
        eps = self.inner_model.apply_model(x * c_in[:, None, None, None], t_of_sigma(sigma), cond=cond)
        return x - eps * sigma[:, None, None, None]


class _ForgeScheduleLinker(torch.nn.Module):
    """Forge/reForge: the k-diffusion wrapper whose ``inner_model`` is the webui model."""

    def __init__(self, predictor):
        super().__init__()
        self.predictor = predictor
        self.sigmas = predictor.sigmas
        self.inner_model = None

    def get_sigmas(self, n):
        t = torch.linspace(len(self.sigmas) - 1, 0, n, dtype=torch.float64)
        from _toy import sigma_of_t
        return torch.cat([sigma_of_t(t), torch.zeros(1, dtype=torch.float64)])


class CFGDenoiserKDiffusion(sd_samplers_cfg_denoiser.CFGDenoiser):
    @property
    def inner_model(self):
        if self.model_wrap is None:
            if _variant.forge_like():
                self.model_wrap = _ForgeScheduleLinker(shared.sd_model.forge_objects.unet.model.predictor)
                self.model_wrap.inner_model = shared.sd_model
            else:
                self.model_wrap = _CompVisDenoiser(shared.sd_model)
        return self.model_wrap


def _sample_euler(model, x, sigmas, extra_args, callback):
    for i in range(len(sigmas) - 1):
        s_in = x.new_ones([x.shape[0]])
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        callback({'x': x, 'i': i, 'sigma': sigmas[i], 'denoised': denoised})
        d = (x - denoised) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


def _sample_heun(model, x, sigmas, extra_args, callback):
    for i in range(len(sigmas) - 1):
        s_in = x.new_ones([x.shape[0]])
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        d = (x - denoised) / sigmas[i]
        callback({'x': x, 'i': i, 'sigma': sigmas[i], 'denoised': denoised})
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            denoised_2 = model(x_2, sigmas[i + 1] * s_in, **extra_args)
            d_2 = (x_2 - denoised_2) / sigmas[i + 1]
            x = x + (d + d_2) / 2 * dt
    return x


_FUNCS = {"sample_euler": _sample_euler, "sample_heun": _sample_heun}


class KDiffusionSampler(sd_samplers_common.Sampler):
    def __init__(self, funcname, sd_model, options=None):
        super().__init__(funcname)
        self.model_wrap_cfg = CFGDenoiserKDiffusion(self)
        self.model_wrap = self.model_wrap_cfg.inner_model

    def get_sigmas(self, p, steps):
        return self.model_wrap.get_sigmas(steps)

    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        steps = steps or p.steps
        sigmas = self.get_sigmas(p, steps)
        x = x * sigmas[0]
        sd_samplers_common._forge_sampling_prepare(x)
        self.initialize(p)
        self.last_latent = x
        self.sampler_extra_args = self._extra_args(p, conditioning, unconditional_conditioning, image_conditioning)
        return self.launch_sampling(steps, lambda: _FUNCS[self.funcname](self.model_wrap_cfg, x, sigmas,
                                                                          self.sampler_extra_args, self.callback_state))

    def sample_img2img(self, p, x, noise, conditioning, unconditional_conditioning, steps=None,
                       image_conditioning=None):
        steps, t_enc = sd_samplers_common.setup_img2img_steps(p, steps)
        sigmas = self.get_sigmas(p, steps)
        sigma_sched = sigmas[steps - t_enc - 1:]
        xi = x + noise * sigma_sched[0]
        sd_samplers_common._forge_sampling_prepare(x)
        self.initialize(p)
        self.model_wrap_cfg.init_latent = x
        self.last_latent = x
        self.sampler_extra_args = self._extra_args(p, conditioning, unconditional_conditioning, image_conditioning)
        return self.launch_sampling(t_enc + 1, lambda: _FUNCS[self.funcname](
            self.model_wrap_cfg, xi, sigma_sched, self.sampler_extra_args, self.callback_state))
