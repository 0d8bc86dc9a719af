"""Stand-in for Forge's ``backend/sampling/condition.py``: A1111 conds → cond dicts."""

import math

import torch


def repeat_to_batch_size(tensor, batch_size):
    if tensor.shape[0] > batch_size:
        return tensor[:batch_size]
    if tensor.shape[0] < batch_size:
        return tensor.repeat([math.ceil(batch_size / tensor.shape[0])] + [1] * (len(tensor.shape) - 1))[:batch_size]
    return tensor


class Condition:
    def __init__(self, cond):
        self.cond = cond

    def _copy_with(self, cond):
        return self.__class__(cond)

    def process_cond(self, batch_size, device, **kwargs):
        return self._copy_with(repeat_to_batch_size(self.cond, batch_size).to(device))

    def can_concat(self, other):
        return self.cond.shape == other.cond.shape

    def concat(self, others):
        return torch.cat([self.cond] + [x.cond for x in others])


class ConditionCrossAttn(Condition):
    def can_concat(self, other):
        s1, s2 = self.cond.shape, other.cond.shape
        return s1 == s2 or (s1[0] == s2[0] and s1[2] == s2[2])

    def concat(self, others):
        conds = [self.cond] + [x.cond for x in others]
        n = max(c.shape[1] for c in conds)
        return torch.cat([c.repeat(1, n // c.shape[1], 1) if c.shape[1] < n else c for c in conds])


def compile_conditions(cond):
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        return [dict(cross_attn=cond, model_conds=dict(c_crossattn=ConditionCrossAttn(cond)))]
    cross_attn = cond['crossattn']
    pooled_output = cond['vector']
    result = dict(cross_attn=cross_attn, pooled_output=pooled_output,
                  model_conds=dict(c_crossattn=ConditionCrossAttn(cross_attn), y=Condition(pooled_output)))
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
