"""Stand-in for Forge's ``backend/sampling/condition.py``: A1111 conds → cond dicts."""

import torch


class Condition:
    def __init__(self, cond):
        self.cond = cond

    def _copy_with(self, cond):
        return self.__class__(cond)

    def process_cond(self, batch_size, device, **kwargs):
        return self._copy_with(self.cond.to(device))      # upstream repeats it to the batch size

    def concat(self, others):
        return torch.cat([self.cond] + [x.cond for x in others])


class ConditionCrossAttn(Condition):
    def concat(self, others):
        conds = [self.cond] + [x.cond for x in others]
        n = max(c.shape[1] for c in conds)
        return torch.cat([c.repeat(1, n // c.shape[1], 1) if c.shape[1] < n else c for c in conds])


def compile_conditions(cond):
    if isinstance(cond, torch.Tensor):
        return [dict(cross_attn=cond, model_conds=dict(c_crossattn=ConditionCrossAttn(cond)))]
    cross_attn = cond['crossattn']
    pooled_output = cond['vector']
    result = dict(cross_attn=cross_attn, pooled_output=pooled_output,
                  model_conds=dict(c_crossattn=ConditionCrossAttn(cross_attn), y=Condition(pooled_output)))
    if 'guidance' in cond:
        result['model_conds']['guidance'] = Condition(cond['guidance'])
    return [result]


def compile_weighted_conditions(cond, weights):
    transposed = list(map(list, zip(*weights)))
    results = []
    for cond_pre in transposed:
        current_indices = []
        current_weight = 0
        for i, w in cond_pre:
            current_indices.append(i)
            current_weight = w
        feed = {k: v[current_indices] for k, v in cond.items()} if isinstance(cond, dict) else cond[current_indices]
        h = compile_conditions(feed)
        h[0]['strength'] = current_weight
        results += h
    return results
