"""Stand-in for reForge's ``modules_forge/forge_sampler.py``: A1111 conds → ldm_patched conds."""

import torch

from ldm_patched.modules.conds import CONDCrossAttn, CONDRegular


def cond_from_a1111_to_patched_ldm(cond):
    if isinstance(cond, torch.Tensor):
        return [dict(cross_attn=cond, model_conds=dict(c_crossattn=CONDCrossAttn(cond)))]
    cross_attn = cond['crossattn']
    pooled_output = cond['vector']
    return [dict(cross_attn=cross_attn, pooled_output=pooled_output,
                 model_conds=dict(c_crossattn=CONDCrossAttn(cross_attn), y=CONDRegular(pooled_output)))]


def cond_from_a1111_to_patched_ldm_weighted(cond, weights):
    transposed = list(map(list, zip(*weights)))
    results = []
    for cond_pre in transposed:
        current_indices = []
        current_weight = 0
        for i, w in cond_pre:
            current_indices.append(i)
            current_weight = w
        feed = {k: v[current_indices] for k, v in cond.items()} if isinstance(cond, dict) else cond[current_indices]
        h = cond_from_a1111_to_patched_ldm(feed)
        h[0]['strength'] = current_weight
        results += h
    return results
