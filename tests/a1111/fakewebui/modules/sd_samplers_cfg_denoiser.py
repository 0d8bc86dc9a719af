"""Stand-in for ``modules/sd_samplers_cfg_denoiser.py``: the classifier-free-guidance wrapper
around the UNet, called once per sampling step.

A1111 (1.7 and 1.10): the batched layout — for each image its cond row(s) (one per ``AND``
sub-prompt), then one uncond row per image — goes through ``on_cfg_denoiser`` (batched
``x``/``sigma``/``image_cond``, cond rows in ``text_cond``, uncond rows in ``text_uncond``),
one UNet call (or chunks), ``on_cfg_denoised`` (all rows), ``combine_denoised``
(uncond + Σ w·s·(cond − uncond)), the inpainting blend, the live preview and
``on_cfg_after_cfg``. NGMS / "skip early CFG" drop the uncond rows and substitute the cond
rows. The k-diffusion inner model returns x0 ("denoised"), the timesteps one ε.

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


def subscript_cond(cond, a, b):
    if not isinstance(cond, dict):
        return cond[a:b]
    return {key: vec[a:b] for key, vec in cond.items()}


def pad_cond(tensor, repeats, empty):
    if not isinstance(tensor, dict):
        return torch.cat([tensor, empty.repeat((tensor.shape[0], repeats, 1))], axis=1)
    tensor['crossattn'] = pad_cond(tensor['crossattn'], repeats, empty)
    return tensor


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
        self.image_cfg_scale = None
        self.padded_cond_uncond = False
        self.sampler = sampler
        self.p = None
        self.mask_before_denoising = False
        if not _V17:
            self.padded_cond_uncond_v0 = False
            self.need_last_noise_uncond = False
            self.last_noise_uncond = None
        if _variant.VARIANT != "forge" and not _V17:
            self.cond_scale_miltiplier = 1.0
        if _variant.forge_like():
            self.classic_ddim_eps_estimation = False

    @property
    def inner_model(self):
        raise NotImplementedError()

    def combine_denoised(self, x_out, conds_list, uncond, cond_scale):
        if _variant.VARIANT == "reforge":     # reForge: sampling_function already combined
            return torch.clone(x_out[-uncond.shape[0]:])
        denoised_uncond = x_out[-uncond.shape[0]:]
        denoised = torch.clone(denoised_uncond)
        for i, conds in enumerate(conds_list):
            for cond_index, weight in conds:
                denoised[i] += (x_out[cond_index] - denoised_uncond[i]) * (weight * cond_scale)
        return denoised

    def get_pred_x0(self, x_in, x_out, sigma):
        return x_out

    def _pad_cond_uncond(self, cond, uncond):
        empty = shared.sd_model.cond_stage_model_empty_prompt
        num_repeats = (cond.shape[1] - uncond.shape[1]) // empty.shape[1]
        if num_repeats < 0:
            cond = pad_cond(cond, -num_repeats, empty)
            self.padded_cond_uncond = True
        elif num_repeats > 0:
            uncond = pad_cond(uncond, num_repeats, empty)
            self.padded_cond_uncond = True
        return cond, uncond

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        if shared.state.interrupted or shared.state.skipped:
            raise sd_samplers_common.InterruptedException
        if _variant.VARIANT == "forge":
            return self._forward_forge(x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond)
        if _variant.VARIANT == "reforge":
            return self._forward_reforge(x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond)
        return self._forward_a1111(x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond)

    # ------------------------------------------------------------------ A1111
    def _apply_blend(self, current_latent, sigma):
        blended_latent = current_latent * self.nmask + self.init_latent * self.mask
        if not _V17 and self.p.scripts is not None:
            from modules import scripts
            mba = scripts.MaskBlendArgs(current_latent, self.nmask, self.init_latent, self.mask, blended_latent,
                                        denoiser=self, sigma=sigma)
            self.p.scripts.on_mask_blend(self.p, mba)
            blended_latent = mba.blended_latent
        return blended_latent

    def _forward_a1111(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        conds_list, tensor = prompt_parser.reconstruct_multicond_batch(cond, self.step)
        uncond = prompt_parser.reconstruct_cond_batch(uncond, self.step)
        if self.mask_before_denoising and self.mask is not None:
            x = self._apply_blend(x, sigma)

        batch_size = len(conds_list)
        repeats = [len(conds_list[i]) for i in range(batch_size)]
        image_uncond = image_cond
        if isinstance(uncond, dict):
            def make_condition_dict(c_crossattn, c_concat):
                return {**c_crossattn, "c_concat": [c_concat]}
        else:
            def make_condition_dict(c_crossattn, c_concat):
                return {"c_crossattn": [c_crossattn], "c_concat": [c_concat]}

        x_in = torch.cat([torch.stack([x[i] for _ in range(n)]) for i, n in enumerate(repeats)] + [x])
        sigma_in = torch.cat([torch.stack([sigma[i] for _ in range(n)]) for i, n in enumerate(repeats)] + [sigma])
        image_cond_in = torch.cat([torch.stack([image_cond[i] for _ in range(n)]) for i, n in enumerate(repeats)]
                                  + [image_uncond])

        if _V17:
            denoiser_params = _cb.CFGDenoiserParams(x_in, image_cond_in, sigma_in, shared.state.sampling_step,
                                                shared.state.sampling_steps, tensor, uncond)
        else:
            denoiser_params = _cb.CFGDenoiserParams(x_in, image_cond_in, sigma_in, shared.state.sampling_step,
                                                shared.state.sampling_steps, tensor, uncond, self)
        _cb.cfg_denoiser_callback(denoiser_params)
        x_in = denoiser_params.x
        image_cond_in = denoiser_params.image_cond
        sigma_in = denoiser_params.sigma
        tensor = denoiser_params.text_cond
        uncond = denoiser_params.text_uncond

        skip_uncond = False
        if not _V17 and opts.skip_early_cond != 0. and self.step / self.total_steps <= opts.skip_early_cond:
            skip_uncond = True
            self.p.extra_generation_params["Skip Early CFG"] = opts.skip_early_cond
        elif (self.step % 2 or (not _V17 and opts.s_min_uncond_all)) and s_min_uncond > 0 \
                and sigma[0] < s_min_uncond:
            skip_uncond = True
            self.p.extra_generation_params["NGMS"] = s_min_uncond
        if skip_uncond:
            x_in = x_in[:-batch_size]
            sigma_in = sigma_in[:-batch_size]

        self.padded_cond_uncond = False
        if opts.pad_cond_uncond and tensor.shape[1] != uncond.shape[1]:
            tensor, uncond = self._pad_cond_uncond(tensor, uncond)

        if tensor.shape[1] == uncond.shape[1] or skip_uncond:
            cond_in = tensor if skip_uncond else catenate_conds([tensor, uncond])
            if opts.batch_cond_uncond:
                x_out = self.inner_model(x_in, sigma_in, cond=make_condition_dict(cond_in, image_cond_in))
            else:
                x_out = torch.zeros_like(x_in)
                for a in range(0, x_out.shape[0], batch_size):
                    b = a + batch_size
                    x_out[a:b] = self.inner_model(x_in[a:b], sigma_in[a:b],
                                                  cond=make_condition_dict(subscript_cond(cond_in, a, b),
                                                                           image_cond_in[a:b]))
        else:
            x_out = torch.zeros_like(x_in)
            chunk = batch_size * 2 if opts.batch_cond_uncond else batch_size
            for a in range(0, tensor.shape[0], chunk):
                b = min(a + chunk, tensor.shape[0])
                x_out[a:b] = self.inner_model(x_in[a:b], sigma_in[a:b],
                                              cond=make_condition_dict(subscript_cond(tensor, a, b),
                                                                       image_cond_in[a:b]))
            if not skip_uncond:
                n = uncond.shape[0]
                x_out[-n:] = self.inner_model(x_in[-n:], sigma_in[-n:],
                                              cond=make_condition_dict(uncond, image_cond_in[-n:]))

        denoised_image_indexes = [x[0][0] for x in conds_list]
        if skip_uncond:
            fake_uncond = torch.cat([x_out[i:i + 1] for i in denoised_image_indexes])
            x_out = torch.cat([x_out, fake_uncond])

        denoised_params = _cb.CFGDenoisedParams(x_out, shared.state.sampling_step, shared.state.sampling_steps, self.inner_model)
        _cb.cfg_denoised_callback(denoised_params)

        scale = 1.0 if skip_uncond else cond_scale * (1.0 if _V17 else self.cond_scale_miltiplier)
        denoised = self.combine_denoised(x_out, conds_list, uncond, scale)
        if not self.mask_before_denoising and self.mask is not None:
            denoised = self._apply_blend(denoised, sigma)

        picked_x = torch.cat([x_in[i:i + 1] for i in denoised_image_indexes])
        self.sampler.last_latent = self.get_pred_x0(picked_x, torch.cat([x_out[i:i + 1] for i in denoised_image_indexes]),
                                                    sigma)
        if opts.live_preview_content == "Prompt":
            preview = self.sampler.last_latent
        elif opts.live_preview_content == "Negative prompt":
            preview = self.get_pred_x0(x_in[-uncond.shape[0]:], x_out[-uncond.shape[0]:], sigma)
        else:
            preview = self.get_pred_x0(picked_x, torch.cat([denoised[i:i + 1] for i in denoised_image_indexes]), sigma)
        sd_samplers_common.store_latent(preview)

        after = _cb.AfterCFGCallbackParams(denoised, shared.state.sampling_step, shared.state.sampling_steps)
        _cb.cfg_after_cfg_callback(after)
        denoised = after.x
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

    def _noisy_initial_latent(self, sigma):
        g = torch.Generator().manual_seed(4242 + self.step)
        noise = torch.randn(self.init_latent.shape, generator=g, dtype=self.init_latent.dtype)
        return self.init_latent + noise * sigma[:, None, None, None]

    def _finish_forge_like(self, x, sigma, denoised):
        preview = self.sampler.last_latent = denoised
        sd_samplers_common.store_latent(preview)
        after = _cb.AfterCFGCallbackParams(denoised, shared.state.sampling_step, shared.state.sampling_steps)
        _cb.cfg_after_cfg_callback(after)
        denoised = after.x
        self.step += 1
        if self.classic_ddim_eps_estimation:
            return (x - denoised) / sigma[:, None, None, None]
        return denoised

    def _forge_blend(self, denoised, sigma):
        if self.mask is None:
            return denoised
        blended = denoised * self.nmask + self.init_latent * self.mask
        if self.p.scripts is not None:
            from modules import scripts
            mba = scripts.MaskBlendArgs(denoised, self.nmask, self.init_latent, self.mask, blended, denoiser=self,
                                        sigma=sigma)
            self.p.scripts.on_mask_blend(self.p, mba)
            blended = mba.blended_latent
        return blended

    def _forward_forge(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        from backend.sampling.sampling_function import sampling_function
        x, sigma = self._to_k(x, sigma)
        cond_composition, cond = prompt_parser.reconstruct_multicond_batch(cond, self.step)
        uncond = prompt_parser.reconstruct_cond_batch(uncond, self.step) if uncond is not None else None
        if self.mask is not None:
            x = x * self.nmask + self._noisy_initial_latent(sigma) * self.mask
        denoiser_params = _cb.CFGDenoiserParams(x, image_cond, sigma, shared.state.sampling_step, shared.state.sampling_steps, cond,
                                            uncond, self)
        _cb.cfg_denoiser_callback(denoiser_params)
        if self.p.is_hr_pass:
            cond_scale = self.p.hr_cfg
        if opts.skip_early_cond > 0 and self.step / self.total_steps <= opts.skip_early_cond:
            cond_scale = 1.0
            self.p.extra_generation_params["Skip Early CFG"] = opts.skip_early_cond
        elif (self.step % 2 or opts.s_min_uncond_all) and s_min_uncond > 0 and sigma[0] < s_min_uncond:
            cond_scale = 1.0
            self.p.extra_generation_params["NGMS"] = s_min_uncond
        denoised, cond_pred, uncond_pred = sampling_function(self, denoiser_params=denoiser_params,
                                                             cond_scale=cond_scale,
                                                             cond_composition=cond_composition)
        denoised = self._forge_blend(denoised, sigma)
        return self._finish_forge_like(x, sigma, denoised)

    def _forward_reforge(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        from ldm_patched.modules.conds import CONDRegular
        from ldm_patched.modules.samplers import sampling_function
        from modules_forge import forge_sampler
        x, sigma = self._to_k(x, sigma)
        cond_composition, cond = prompt_parser.reconstruct_multicond_batch(cond, self.step)
        uncond = prompt_parser.reconstruct_cond_batch(uncond, self.step)
        if self.mask_before_denoising and self.mask is not None:
            x = x * self.nmask + self._noisy_initial_latent(sigma) * self.mask
        denoiser_params = _cb.CFGDenoiserParams(x, image_cond, sigma, shared.state.sampling_step, shared.state.sampling_steps, cond,
                                            uncond, self)
        _cb.cfg_denoiser_callback(denoiser_params)
        skip_uncond = False
        if self.p.is_hr_pass:
            cond_scale = self.p.hr_cfg
        s_min = getattr(opts, 's_min_uncond', 0.0)
        if s_min > 0 and sigma[0] < s_min and (self.step % 2 == 0 or opts.s_min_uncond_all):
            skip_uncond = True
            self.p.extra_generation_params["NGMS"] = s_min
        if not skip_uncond and opts.skip_early_cond != 0. and self.step / self.total_steps <= opts.skip_early_cond:
            skip_uncond = True
            self.p.extra_generation_params["Skip Early CFG"] = opts.skip_early_cond

        unet = self.inner_model.inner_model.forge_objects.unet
        model, control, model_options = unet.model, unet.controlnet_linked_list, unet.model_options
        seed = self.p.seeds[0]
        uncond_patched = forge_sampler.cond_from_a1111_to_patched_ldm(denoiser_params.text_uncond)
        cond_patched = forge_sampler.cond_from_a1111_to_patched_ldm_weighted(denoiser_params.text_cond,
                                                                            cond_composition)
        image_cond_in = unet.extra_concat_condition if unet.extra_concat_condition is not None \
            else denoiser_params.image_cond
        if isinstance(image_cond_in, torch.Tensor) and image_cond_in.shape[0] == x.shape[0] \
                and image_cond_in.shape[2:] == x.shape[2:]:
            for h in uncond_patched + cond_patched:
                h['model_conds']['c_concat'] = CONDRegular(image_cond_in)
        if control is not None:
            for h in cond_patched + uncond_patched:
                h['control'] = control
        for modifier in model_options.get('conditioning_modifiers', []):
            model, x, sigma, uncond_patched, cond_patched, cond_scale, model_options, seed = modifier(
                model, x, sigma, uncond_patched, cond_patched, cond_scale, model_options, seed)
        if skip_uncond:
            denoised = sampling_function(model, x, sigma, None, cond_patched, 1.0, model_options, seed)
        else:
            denoised = sampling_function(model, x, sigma, uncond_patched, cond_patched, cond_scale, model_options,
                                         seed)
            denoised = self.combine_denoised(denoised, cond_composition, uncond,
                                             cond_scale * self.cond_scale_miltiplier)
        if not self.mask_before_denoising and self.mask is not None:
            denoised = self._forge_blend(denoised, sigma)
        return self._finish_forge_like(x, sigma, denoised)
