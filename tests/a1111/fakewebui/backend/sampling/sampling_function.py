"""Stand-in for Forge's ``backend/sampling/sampling_function.py``.

``sampling_function`` (called by the CFG denoiser) compiles the A1111 conds, runs the UNet
patcher's ``conditioning_modifiers``, then ``sampling_function_inner``:
``calc_cond_uncond_batch`` (one UNet batch; each cond dict weighted by its ``strength``) →
``uncond + s·(cond − uncond)`` → post-cfg functions. All in x0 space. (Not modelled: pre-cfg
and custom cfg functions, the inpainting ``c_concat``, ControlNet.)
"""

import collections
import math

import torch

from backend.sampling.condition import compile_conditions, compile_weighted_conditions


def get_area_and_mult(conds, x_in, timestep_in):
    strength = conds.get('strength', 1.0)
    conditioning = {c: v.process_cond(batch_size=x_in.shape[0], device=x_in.device)
                    for c, v in conds["model_conds"].items()}
    mult = torch.ones_like(x_in) * strength
    cond_obj = collections.namedtuple('cond_obj', ['input_x', 'mult', 'conditioning', 'area', 'control', 'patches'])
    return cond_obj(x_in, mult, conditioning, None, conds.get('control', None), None)


def cond_cat(c_list):
    temp = {}
    for x in c_list:
        for k in x:
            temp.setdefault(k, []).append(x[k])
    return {k: conds[0].concat(conds[1:]) for k, conds in temp.items()}


def calc_cond_uncond_batch(model, cond, uncond, x_in, timestep, model_options):
    out_cond = torch.zeros_like(x_in)
    out_count = torch.ones_like(x_in) * 1e-37
    out_uncond = torch.zeros_like(x_in)
    out_uncond_count = torch.ones_like(x_in) * 1e-37
    to_run = [(get_area_and_mult(x, x_in, timestep), 0) for x in cond]
    if uncond is not None:
        to_run += [(get_area_and_mult(x, x_in, timestep), 1) for x in uncond]
    input_x = torch.cat([p.input_x for p, _ in to_run])
    c = cond_cat([p.conditioning for p, _ in to_run])
    c['transformer_options'] = {"cond_or_uncond": [k for _, k in to_run], "sigmas": timestep}
    timestep_ = torch.cat([timestep] * len(to_run))
    output = model.apply_model(input_x, timestep_, **c)
    for o, (p, kind) in zip(output.chunk(len(to_run)), to_run):
        if kind == 0:
            out_cond += o * p.mult
            out_count += p.mult
        else:
            out_uncond += o * p.mult
            out_uncond_count += p.mult
    return out_cond / out_count, out_uncond / out_uncond_count


def sampling_function_inner(model, x, timestep, uncond, cond, cond_scale, model_options={}, seed=None):
    """Returns ``(cfg_result, cond_pred, uncond_pred)`` (upstream: with ``return_full=True``)."""
    edit_strength = sum((item['strength'] if 'strength' in item else 1) for item in cond)
    if math.isclose(cond_scale, 1.0) and not model_options.get("disable_cfg1_optimization", False):
        uncond_ = None
    else:
        uncond_ = uncond
    cond_pred, uncond_pred = calc_cond_uncond_batch(model, cond, uncond_, x, timestep, model_options)
    if not math.isclose(edit_strength, 1.0):
        cfg_result = uncond_pred + (cond_pred - uncond_pred) * cond_scale * edit_strength
    else:
        cfg_result = uncond_pred + (cond_pred - uncond_pred) * cond_scale
    for fn in model_options.get("sampler_post_cfg_function", []):
        args = {"denoised": cfg_result, "cond": cond, "uncond": uncond, "model": model, "uncond_denoised": uncond_pred,
                "cond_denoised": cond_pred, "sigma": timestep, "model_options": model_options, "input": x}
        cfg_result = fn(args)
    return cfg_result, cond_pred, uncond_pred


def sampling_function(self, denoiser_params, cond_scale, cond_composition):
    unet_patcher = self.inner_model.inner_model.forge_objects.unet
    model = unet_patcher.model
    x = denoiser_params.x
    timestep = denoiser_params.sigma
    uncond = compile_conditions(denoiser_params.text_uncond)
    cond = compile_weighted_conditions(denoiser_params.text_cond, cond_composition)
    model_options = unet_patcher.model_options
    seed = self.p.seeds[0]
    for modifier in model_options.get('conditioning_modifiers', []):
        model, x, timestep, uncond, cond, cond_scale, model_options, seed = modifier(
            model, x, timestep, uncond, cond, cond_scale, model_options, seed)
    return sampling_function_inner(model, x, timestep, uncond, cond, cond_scale, model_options, seed)


def sampling_prepare(unet, x):
    """Upstream: loads the UNet patcher (and its extra patchers) through the memory manager
    before a sampling pass; a patcher loaded anew gets its LoRAs merged then."""
    from backend import memory_management
    memory_management.load_models_gpu(models=[unet] + list(unet.extra_model_patchers_during_sampling),
                                      memory_required=unet.memory_required(list(x.shape)))
