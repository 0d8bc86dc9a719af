"""Stand-in for ``modules/sd_samplers_cfg_denoiser.py``: the classifier-free-guidance wrapper
around the UNet, called once per sampling step.

A1111 (1.7 and 1.10): the batched layout — for each image its cond row(s) (one per ``AND``
sub-prompt), then one uncond row per image — goes through ``on_cfg_denoiser`` (batched
``x``/``sigma``/``image_cond``, cond rows in ``text_cond``, uncond rows in ``text_uncond``),
one UNet call, ``on_cfg_denoised`` (all rows), ``combine_denoised``
(uncond + Σ w·s·(cond − uncond)), the inpainting blend and the live preview. "Skip early CFG"
drops the uncond rows and substitutes the cond rows. The k-diffusion inner model returns x0
("denoised"), the timesteps one ε. (Not modelled: NGMS, prompts of different lengths.)

Forge: ``on_cfg_denoiser`` gets the *un-batched* x (one row per image); the rest goes
through ``backend.sampling.sampling_function.sampling_function`` (cfg functions of the
UNet patcher); ``on_cfg_denoised`` is never called. reForge: the same through
``ldm_patched.modules.samplers.sampling_function``. Both work in k-diffusion (x0) space; DDIM
is converted (``classic_ddim_eps_estimation``).
"""

from __future__ import annotations

import torch

import modules.shared as shared
from modules import _variant, prompt_parser, sd_samplers_common
from modules import script_callbacks as _cb
from modules.shared import opts

_V17 = _variant.is_17()


def catenate_conds(conds):
    if not isinstance(conds[0], dict):
        return torch.cat(conds)
    return {key: torch.cat([x[key] for x in conds]) for key in conds[0].keys()}


class CFGDenoiser(torch.nn.Module):
    def __init__(self, sampler):
        super().__init__()
        self.model_wrap = None
        self.mask = None
        self.nmask = None
        self.init_latent = None
        self.steps = None
        self.total_steps = None
        self.step = 0
        self.sampler = sampler
        self.p = None
        if _variant.forge_like():
            self.classic_ddim_eps_estimation = False

    def combine_denoised(self, x_out, conds_list, uncond, cond_scale):
        denoised_uncond = x_out[-uncond.shape[0]:]
        denoised = torch.clone(denoised_uncond)
        for i, conds in enumerate(conds_list):
            for cond_index, weight in conds:
                denoised[i] += (x_out[cond_index] - denoised_uncond[i]) * (weight * cond_scale)
        return denoised

    def get_pred_x0(self, x_in, x_out, sigma):
        return x_out

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        if _variant.VARIANT == "forge":
            return self._forward_forge(x, sigma, uncond, cond, cond_scale, image_cond)
        if _variant.VARIANT == "reforge":
            return self._forward_reforge(x, sigma, uncond, cond, cond_scale, image_cond)
        return self._forward_a1111(x, sigma, uncond, cond, cond_scale, image_cond)

    def _blend(self, denoised):
        if self.mask is None:
            return denoised
        return denoised * self.nmask + self.init_latent * self.mask

    # ------------------------------------------------------------------ A1111
    def _forward_a1111(self, x, sigma, uncond, cond, cond_scale, image_cond):
        conds_list, tensor = prompt_parser.reconstruct_multicond_batch(cond, self.step)
        uncond = prompt_parser.reconstruct_cond_batch(uncond, self.step)
        batch_size = len(conds_list)
        repeats = [len(conds_list[i]) for i in range(batch_size)]
        if isinstance(uncond, dict):
            def make_condition_dict(c_crossattn, c_concat):
                return {**c_crossattn, "c_concat": [c_concat]}
        else:
            def make_condition_dict(c_crossattn, c_concat):
                return {"c_crossattn": [c_crossattn], "c_concat": [c_concat]}

        x_in = torch.cat([torch.stack([x[i] for _ in range(n)]) for i, n in enumerate(repeats)] + [x])
        sigma_in = torch.cat([torch.stack([sigma[i] for _ in range(n)]) for i, n in enumerate(repeats)] + [sigma])
        image_cond_in = torch.cat([torch.stack([image_cond[i] for _ in range(n)]) for i, n in enumerate(repeats)]
                                  + [image_cond])

        extra = () if _V17 else (self,)
        denoiser_params = _cb.CFGDenoiserParams(x_in, image_cond_in, sigma_in, shared.state.sampling_step,
                                                shared.state.sampling_steps, tensor, uncond, *extra)
        _cb.cfg_denoiser_callback(denoiser_params)
        x_in = denoiser_params.x
        image_cond_in = denoiser_params.image_cond
        sigma_in = denoiser_params.sigma
        tensor = denoiser_params.text_cond
        uncond = denoiser_params.text_uncond

        skip_uncond = not _V17 and opts.skip_early_cond != 0. and self.step / self.total_steps <= opts.skip_early_cond
        if skip_uncond:
            self.p.extra_generation_params["Skip Early CFG"] = opts.skip_early_cond
            x_in = x_in[:-batch_size]
            sigma_in = sigma_in[:-batch_size]
        cond_in = tensor if skip_uncond else catenate_conds([tensor, uncond])
        x_out = self.inner_model(x_in, sigma_in, cond=make_condition_dict(cond_in, image_cond_in))

        denoised_image_indexes = [x[0][0] for x in conds_list]
        if skip_uncond:
            fake_uncond = torch.cat([x_out[i:i + 1] for i in denoised_image_indexes])
            x_out = torch.cat([x_out, fake_uncond])

        _cb.cfg_denoised_callback(_cb.CFGDenoisedParams(x_out, shared.state.sampling_step, shared.state.sampling_steps,
                                                        self.inner_model))
        denoised = self.combine_denoised(x_out, conds_list, uncond, 1.0 if skip_uncond else cond_scale)
        denoised = self._blend(denoised)

        picked_x = torch.cat([x_in[i:i + 1] for i in denoised_image_indexes])
        self.sampler.last_latent = self.get_pred_x0(picked_x, torch.cat([x_out[i:i + 1] for i in denoised_image_indexes]),
                                                    sigma)
        sd_samplers_common.store_latent(self.sampler.last_latent)     # live preview of the "Prompt"
        self.step += 1
        return denoised

    # ------------------------------------------------------------------ Forge / reForge
    def _to_k(self, x, sigma):
        if not self.classic_ddim_eps_estimation:
            return x, sigma
        acd = self.inner_model.inner_model.alphas_cumprod
        fake_sigmas = ((1 - acd) / acd) ** 0.5
        real_sigma = fake_sigmas[sigma.round().long().clip(0, int(fake_sigmas.shape[0]) - 1)]
        x = x * (((real_sigma ** 2.0 + 1.0) ** 0.5)[:, None, None, None])
        return x, real_sigma

    def _finish_forge_like(self, x, sigma, denoised):
        self.sampler.last_latent = denoised
        sd_samplers_common.store_latent(denoised)
        self.step += 1
        if self.classic_ddim_eps_estimation:
            return (x - denoised) / sigma[:, None, None, None]
        return denoised

    def _params(self, x, image_cond, sigma, cond, uncond):
        params = _cb.CFGDenoiserParams(x, image_cond, sigma, shared.state.sampling_step, shared.state.sampling_steps,
                                       cond, uncond, self)
        _cb.cfg_denoiser_callback(params)
        return params

    def _skip_early_cfg(self):
        if opts.skip_early_cond > 0 and self.step / self.total_steps <= opts.skip_early_cond:
            self.p.extra_generation_params["Skip Early CFG"] = opts.skip_early_cond
            return True
        return False

    def _forward_forge(self, x, sigma, uncond, cond, cond_scale, image_cond):
        from backend.sampling.sampling_function import sampling_function
        x, sigma = self._to_k(x, sigma)
        cond_composition, cond = prompt_parser.reconstruct_multicond_batch(cond, self.step)
        uncond = prompt_parser.reconstruct_cond_batch(uncond, self.step)
        if self.mask is not None:      # Forge: the masked area starts from the noised initial latent
            g = torch.Generator().manual_seed(4242 + self.step)
            noise = torch.randn(self.init_latent.shape, generator=g, dtype=self.init_latent.dtype)
            x = x * self.nmask + (self.init_latent + noise * sigma[:, None, None, None]) * self.mask
        denoiser_params = self._params(x, image_cond, sigma, cond, uncond)
        if self.p.is_hr_pass:
            cond_scale = self.p.hr_cfg
        if self._skip_early_cfg():
            cond_scale = 1.0
        denoised, cond_pred, uncond_pred = sampling_function(self, denoiser_params=denoiser_params,
                                                             cond_scale=cond_scale, cond_composition=cond_composition)
        return self._finish_forge_like(x, sigma, self._blend(denoised))

    def _forward_reforge(self, x, sigma, uncond, cond, cond_scale, image_cond):
        from ldm_patched.modules.samplers import sampling_function
        from modules_forge import forge_sampler
        x, sigma = self._to_k(x, sigma)
        cond_composition, cond = prompt_parser.reconstruct_multicond_batch(cond, self.step)
        uncond = prompt_parser.reconstruct_cond_batch(uncond, self.step)
        denoiser_params = self._params(x, image_cond, sigma, cond, uncond)
        if self.p.is_hr_pass:
            cond_scale = self.p.hr_cfg
        skip_uncond = self._skip_early_cfg()
        unet = self.inner_model.inner_model.forge_objects.unet
        model, model_options = unet.model, unet.model_options
        seed = self.p.seeds[0]
        uncond_patched = forge_sampler.cond_from_a1111_to_patched_ldm(denoiser_params.text_uncond)
        cond_patched = forge_sampler.cond_from_a1111_to_patched_ldm_weighted(denoiser_params.text_cond,
                                                                            cond_composition)
        for modifier in model_options.get('conditioning_modifiers', []):
            model, x, sigma, uncond_patched, cond_patched, cond_scale, model_options, seed = modifier(
                model, x, sigma, uncond_patched, cond_patched, cond_scale, model_options, seed)
        if skip_uncond:
            denoised = sampling_function(model, x, sigma, None, cond_patched, 1.0, model_options, seed)
        else:
            denoised = sampling_function(model, x, sigma, uncond_patched, cond_patched, cond_scale, model_options,
                                         seed)
        return self._finish_forge_like(x, sigma, self._blend(denoised))
