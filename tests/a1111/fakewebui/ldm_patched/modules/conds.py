"""Stand-in for reForge's ``ldm_patched/modules/conds.py`` (ComfyUI's conds)."""

import math

import torch


class CONDRegular:
    def __init__(self, cond):
        self.cond = cond

    def _copy_with(self, cond):
        return self.__class__(cond)

    def process_cond(self, batch_size, device, **kwargs):
        c = self.cond
        if c.shape[0] != batch_size:
            c = c.repeat([math.ceil(batch_size / c.shape[0])] + [1] * (c.dim() - 1))[:batch_size]
        return self._copy_with(c.to(device))

    def can_concat(self, other):
        return self.cond.shape == other.cond.shape

    def concat(self, others):
        return torch.cat([self.cond] + [x.cond for x in others])


class CONDCrossAttn(CONDRegular):
    def can_concat(self, other):
        s1, s2 = self.cond.shape, other.cond.shape
        return s1 == s2 or (s1[0] == s2[0] and s1[2] == s2[2])

    def concat(self, others):
        conds = [self.cond] + [x.cond for x in others]
        n = max(c.shape[1] for c in conds)
        return torch.cat([c.repeat(1, n // c.shape[1], 1) if c.shape[1] < n else c for c in conds])
