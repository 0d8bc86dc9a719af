"""Stand-in for reForge's ``ldm_patched/modules/conds.py`` (ComfyUI's conds)."""

import torch


class CONDRegular:
    def __init__(self, cond):
        self.cond = cond

    def _copy_with(self, cond):
        return self.__class__(cond)

    def process_cond(self, batch_size, device, **kwargs):
        return self._copy_with(self.cond.to(device))      # upstream repeats it to the batch size

    def concat(self, others):
        return torch.cat([self.cond] + [x.cond for x in others])


class CONDCrossAttn(CONDRegular):
    def concat(self, others):
        conds = [self.cond] + [x.cond for x in others]
        n = max(c.shape[1] for c in conds)
        return torch.cat([c.repeat(1, n // c.shape[1], 1) if c.shape[1] < n else c for c in conds])
