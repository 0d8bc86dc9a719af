"""How the lab samples its model: one sampler setting for the gate, the bench and the table.

The lab model is sampled with its saved ``DDIMScheduler`` at :data:`SAMPLE_STEPS` steps and
classifier-free guidance :data:`GUIDANCE_SCALE` (the negative prompt is "", the caption the
model was trained to drop 10 % of the time). These were chosen on the quality gate before any
safety layer was measured (docs/lab.md, "Sampling"), and every efficacy number of the lab uses
them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

#: DDIM steps of every lab sample.
SAMPLE_STEPS = 25
#: Classifier-free guidance scale of every lab sample.
GUIDANCE_SCALE = 3.0


def pipeline_generator(pipe: Any, steps: int = SAMPLE_STEPS, guidance_scale: float = GUIDANCE_SCALE,
                       **pipe_kwargs: Any) -> Callable[[Sequence[str], int], np.ndarray]:
    """``generate(captions, seed) -> uint8 images [N, H, W, 3]`` for :func:`quality_gate`:
    one batched ``pipe(...)`` call whose initial latents come from ``torch.Generator`` seeded
    ``seed`` (on the pipeline's device)."""
    import torch  # noqa: PLC0415

    from ..images import float_to_uint8  # noqa: PLC0415

    device = getattr(pipe, "device", torch.device("cpu"))

    def generate(captions: Sequence[str], seed: int) -> np.ndarray:
        gen = torch.Generator(device=device).manual_seed(int(seed))
        with torch.no_grad():
            out = pipe(list(captions), num_inference_steps=steps, guidance_scale=guidance_scale,
                       output_type="np", generator=gen, **pipe_kwargs).images
        return float_to_uint8(np.asarray(out, np.float64))

    return generate
