"""The random SD1.5 checkpoint the webui tier writes has the real LDM layout (no webui needed)."""

from __future__ import annotations

import math

from safet2i.lora.arch import inventory

from .sd15_checkpoint import checkpoint_shapes


def test_parameter_counts_are_those_of_sd15():
    shapes = checkpoint_shapes()
    count = {p: sum(math.prod(s) for k, s in shapes.items() if k.startswith(p))
             for p in ("model.diffusion_model.", "cond_stage_model.transformer.", "first_stage_model.")}
    # SD1.5: UNet 859,520,964; CLIP ViT-L/14 text tower 123,060,480; KL-f8 VAE 83,653,863
    assert count == {"model.diffusion_model.": 859_520_964, "cond_stage_model.transformer.": 123_060_480,
                     "first_stage_model.": 83_653_863}
    assert len(shapes) == 686 + 196 + 248


def test_layout_agrees_with_the_lora_inventory():
    """Two independent derivations of the SD1 layout: this file's and the core's LoRA inventory."""
    shapes = checkpoint_shapes()
    inv = inventory("sd1")
    for m in inv["unet"].values():
        assert shapes[f"model.diffusion_model.{m.ldm}.weight"] == m.shape, m
    for m in inv["te1"].values():
        assert shapes[f"cond_stage_model.transformer.{m.ldm}.weight"] == m.shape, m
