"""Stand-in for ``modules/rng.py``: per-seed deterministic noise."""

import torch


class ImageRNG:
    def __init__(self, shape, seeds, subseeds=None, subseed_strength=0.0, seed_resize_from_h=0, seed_resize_from_w=0):
        self.shape = tuple(int(x) for x in shape)
        self.seeds = seeds
        self.subseeds = subseeds
        self.is_first = True

    def next(self):
        out = []
        for i, seed in enumerate(self.seeds):
            g = torch.Generator().manual_seed(int(seed) + (0 if self.is_first else 100003))
            out.append(torch.randn(self.shape, generator=g, dtype=torch.float64))
        self.is_first = False
        return torch.stack(out)
