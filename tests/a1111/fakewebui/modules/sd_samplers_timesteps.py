"""Stand-in for ``modules/sd_samplers_timesteps.py``: DDIM over integer timesteps. A1111: the
inner model returns ε and ``sigma`` is the timestep; Forge/reForge convert to k-diffusion
space inside the CFG denoiser (``classic_ddim_eps_estimation``)."""

from __future__ import annotations

import torch

import modules.shared as shared
from modules import _variant, sd_samplers_common
from modules.sd_samplers_cfg_denoiser import CFGDenoiser


class CompVisTimestepsDenoiser(torch.nn.Module):
    def __init__(self, model, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.inner_model = model

    def forward(self, input, timesteps, **kwargs):
        return self.inner_model.apply_model(input, timesteps, **kwargs)


class CFGDenoiserTimesteps(CFGDenoiser):
    def __init__(self, sampler):
        super().__init__(sampler)
        if _variant.forge_like():
            self.classic_ddim_eps_estimation = True

    def get_pred_x0(self, x_in, x_out, sigma):
        ts = sigma.to(dtype=int)
        a_t = shared.sd_model.alphas_cumprod[ts][:, None, None, None]
        sqrt_one_minus_at = (1 - a_t).sqrt()
        return (x_in - sqrt_one_minus_at * x_out) / a_t.sqrt()

    @property
    def inner_model(self):
        if self.model_wrap is None:
            self.model_wrap = CompVisTimestepsDenoiser(shared.sd_model)
        return self.model_wrap


def _ddim(model, x, timesteps, extra_args, callback):
    alphas = shared.sd_model.alphas_cumprod
    ts = list(reversed(timesteps.tolist()))
    for i, t in enumerate(ts):
        a_t = alphas[t]
        a_prev = alphas[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0, dtype=alphas.dtype)
        t_in = torch.full((x.shape[0],), t, dtype=torch.float64)
        eps = model(x, t_in, **extra_args)
        pred_x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        callback({'x': x, 'i': i, 'sigma': t, 'denoised': pred_x0})
        x = a_prev.sqrt() * pred_x0 + (1 - a_prev).sqrt() * eps
    return x


class CompVisSampler(sd_samplers_common.Sampler):
    def __init__(self, funcname, sd_model):
        super().__init__(funcname)
        self.model_wrap_cfg = CFGDenoiserTimesteps(self)
        self.model_wrap = self.model_wrap_cfg.inner_model

    def get_timesteps(self, p, steps):
        return torch.clip(torch.asarray(list(range(0, 1000, 1000 // steps))) + 1, 0, 999)

    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        steps = steps or p.steps
        timesteps = self.get_timesteps(p, steps)
        sd_samplers_common._forge_sampling_prepare(x)
        self.initialize(p)
        self.last_latent = x
        self.sampler_extra_args = self._extra_args(p, conditioning, unconditional_conditioning, image_conditioning)
        return self.launch_sampling(steps, lambda: _ddim(self.model_wrap_cfg, x, timesteps, self.sampler_extra_args,
                                                         self.callback_state))
