"""Write a tiny random SD1.x-layout checkpoint that ComfyUI detects as SD15.

Run with ComfyUI's interpreter and ComfyUI on sys.path (cwd = COMFYUI_PATH):
    python make_tiny_sd15.py OUT.safetensors [seed]

UNet: model_channels 320 and context_dim 768 (what SD15 detection keys on), but a single
level with one ResBlock and one transformer block (~26M parameters). Text encoder: a full,
randomly initialised CLIP-L (ComfyUI always builds CLIP-L for SD15). VAE: TAESD (ComfyUI
picks it from the ``taesd_decoder`` keys). Everything is random: images are textures.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.getcwd())

from comfy.cli_args import args  # noqa: E402

args.cpu = True

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import comfy.ops  # noqa: E402
from comfy.clip_model import CLIPTextModel  # noqa: E402
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel  # noqa: E402
from comfy.taesd.taesd import TAESD  # noqa: E402


def init_(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) * (2.0 / fan_in) ** 0.5)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()


def main(out: str, seed: int = 0) -> None:
    unet = UNetModel(
        image_size=32, in_channels=4, model_channels=320, out_channels=4, num_res_blocks=[1],
        channel_mult=[1], num_heads=8, num_head_channels=-1, use_spatial_transformer=True,
        transformer_depth=[1], transformer_depth_output=[1, 1], transformer_depth_middle=1,
        context_dim=768, use_linear_in_transformer=False, legacy=False,
        operations=comfy.ops.manual_cast, dtype=torch.float32,
    )
    init_(unet, seed)
    with open(os.path.join(os.getcwd(), "comfy", "sd1_clip_config.json")) as fh:
        clip_cfg = json.load(fh)
    clip = CLIPTextModel(clip_cfg, torch.float32, "cpu", comfy.ops.manual_cast)
    init_(clip, seed + 1)
    with torch.no_grad():  # token embeddings small, like a trained CLIP's
        clip.text_model.embeddings.token_embedding.weight.mul_(0.02 / clip.text_model.embeddings.token_embedding.weight.std())
    vae = TAESD()
    init_(vae, seed + 2)
    with torch.no_grad():
        vae.vae_scale.fill_(1.0)
        vae.vae_shift.fill_(0.0)
    sd = {}
    sd.update({f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()})
    sd.update({f"cond_stage_model.transformer.{k}": v for k, v in clip.state_dict().items()})
    sd.update({f"first_stage_model.{k}": v for k, v in vae.state_dict().items()})
    save_file({k: v.to(torch.float16).contiguous() for k, v in sd.items()}, out)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0)
