"""Stand-in for reForge's ``ldm_patched/modules/samplers.py`` (ComfyUI's sampling function):
``calc_cond_batch`` → pre-cfg functions (``args['conds_out']`` = [cond, uncond] denoised; may
replace them) → ``cfg_function`` (uncond + s·(cond − uncond)) → post-cfg functions. x0 space.
(Not modelled: a patcher's own cfg or batch functions, the UNet function wrapper.)"""

import collections
import math

import torch


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


def calc_cond_batch(model, conds, x_in, timestep, model_options):
    out_conds = [torch.zeros_like(x_in) for _ in conds]
    out_counts = [torch.ones_like(x_in) * 1e-37 for _ in conds]
    to_run = []
    for i, cond in enumerate(conds):
        for x in cond or []:
            to_run.append((get_area_and_mult(x, x_in, timestep), i))
    input_x = torch.cat([p.input_x for p, _ in to_run])
    c = cond_cat([p.conditioning for p, _ in to_run])
    cond_or_uncond = [i for _, i in to_run]
    c['transformer_options'] = {**model_options.get('transformer_options', {}),
                                "cond_or_uncond": cond_or_uncond, "sigmas": timestep}
    timestep_ = torch.cat([timestep] * len(to_run))
    output = model.apply_model(input_x, timestep_, **c)
    for o, (p, i) in zip(output.chunk(len(to_run)), to_run):
        out_conds[i] += o * p.mult
        out_counts[i] += p.mult
    return [out_conds[i] / out_counts[i] for i in range(len(conds))]


def calc_cond_uncond_batch(model, cond, uncond, x_in, timestep, model_options):
    return tuple(calc_cond_batch(model, [cond, uncond], x_in, timestep, model_options))


def cfg_function(model, cond_pred, uncond_pred, cond_scale, x, timestep, model_options={}, cond=None, uncond=None):
    edit_strength = sum((item.get('strength', 1) for item in cond))
    if not math.isclose(edit_strength, 1.0):
        cfg_result = uncond_pred + (cond_pred - uncond_pred) * cond_scale * edit_strength
    else:
        cfg_result = uncond_pred + (cond_pred - uncond_pred) * cond_scale
    for fn in model_options.get("sampler_post_cfg_function", []):
        args = {"denoised": cfg_result, "cond": cond, "uncond": uncond, "cond_scale": cond_scale, "model": model,
                "uncond_denoised": uncond_pred, "cond_denoised": cond_pred, "sigma": timestep,
                "model_options": model_options, "input": x}
        cfg_result = fn(args)
    return cfg_result


def sampling_function(model, x, timestep, uncond, cond, cond_scale, model_options={}, seed=None):
    if math.isclose(cond_scale, 1.0) and not model_options.get("disable_cfg1_optimization", False):
        uncond_ = None
    else:
        uncond_ = uncond
    conds = [cond, uncond_]
    out = calc_cond_batch(model, conds, x, timestep, model_options)
    for fn in model_options.get("sampler_pre_cfg_function", []):
        args = {"conds": conds, "conds_out": out, "cond_scale": cond_scale, "timestep": timestep, "input": x,
                "sigma": timestep, "model": model, "model_options": model_options}
        out = fn(args)
        x = args["input"]
    return cfg_function(model, out[0], out[1], cond_scale, x, timestep, model_options=model_options, cond=cond,
                        uncond=uncond_)
