"""Write a diffusers SD1.x pipeline as ONE original-LDM ("CompVis") ``.safetensors`` checkpoint.

The inverse of what ``StableDiffusionPipeline.from_single_file`` reads: the UNet under
``model.diffusion_model.`` (openaimodel ``UNetModel`` names), the CLIP text encoder under
``cond_stage_model.transformer.text_model.`` (HF ``CLIPTextModel`` names) and the VAE under
``first_stage_model.`` (LDM ``AutoencoderKL`` names). The names are derived here from the LDM
architecture, not from diffusers' converter, so that the converter can serve as an independent
check of them (tests/unit/test_train_single_file.py).

UNet (openaimodel): ``input_blocks.0.0`` = conv_in; ``time_embed.0/2``; each encoder level ``i``
holds ``layers_per_block`` slots ``input_blocks[1 + i*(lpb+1) + j]`` = (ResBlock, SpatialTransformer)
and, but for the last level, a downsampler ``input_blocks[(i+1)*(lpb+1)].0.op``; ``middle_block.0/1/2``
= (ResBlock, SpatialTransformer, ResBlock); ``output_blocks[i*(lpb+1) + j]`` = (ResBlock,
SpatialTransformer, Upsample ``.conv``); ``out.0`` (GroupNorm) and ``out.2`` (conv). A ResBlock is
``in_layers.0`` (GroupNorm), ``in_layers.2`` (conv), ``emb_layers.1`` (linear), ``out_layers.0``
(GroupNorm), ``out_layers.3`` (conv) and ``skip_connection``; a SpatialTransformer's inner names
(``norm``, ``proj_in``, ``transformer_blocks.k.{attn1,attn2,norm1..3,ff.net.0.proj,ff.net.2}``,
``proj_out``) are diffusers' own. The Linear/Conv slots come from the package's LoRA inventory
(:func:`safet2i.lora.arch.unet_modules`, which covers patchable layers only); the GroupNorms it
leaves out (``in_layers.0``, ``out_layers.0``, the transformer's ``norm``, ``out.0``) are added here.

VAE (LDM ``Encoder``/``Decoder``): ``encoder.down.{i}.block.{j}`` (``norm1, conv1, norm2, conv2,
nin_shortcut``), ``encoder.down.{i}.downsample.conv``, ``{encoder,decoder}.mid.block_1 / attn_1 /
block_2`` with attention ``norm, q, k, v, proj_out`` as 1x1 convolutions, ``norm_out``, ``conv_in``,
``conv_out``; the decoder's ``up.{i}`` is resolution level ``i`` (0 = full resolution), run from
the last level to the first, while diffusers numbers its ``up_blocks`` in the order they run, so
``up_blocks.{i}`` is ``up.{n-1-i}`` (``block.{j}``, ``upsample.conv``); ``quant_conv`` and
``post_quant_conv`` at the top.
"""

from __future__ import annotations

import os
import re

import torch

UNET_PREFIX = "model.diffusion_model."
TEXT_PREFIX = "cond_stage_model.transformer.text_model."
VAE_PREFIX = "first_stage_model."
LDM_PREFIXES = (UNET_PREFIX, TEXT_PREFIX, VAE_PREFIX)


def _module_and_param(key: str) -> tuple[str, str]:
    module, _, param = key.rpartition(".")
    return module, param


def unet_ldm_names(unet) -> dict[str, str]:
    """``{diffusers state-dict key: LDM key (without model.diffusion_model.)}`` for every key of
    ``unet.state_dict()``; a key it cannot place raises KeyError (nothing silently dropped)."""
    from safet2i.lora.arch import UNetConfig, unet_modules

    exact: dict[str, str] = {}    # a diffusers module -> its LDM module
    inside: dict[str, str] = {}   # a SpatialTransformer: diffusers prefix -> LDM prefix (inner names equal)
    for m in unet_modules(UNetConfig.from_diffusers(unet.config)):
        exact[m.diffusers] = m.ldm
        if m.diffusers.endswith(".conv1"):            # a ResBlock: in_layers.2 is its first conv
            assert m.ldm.endswith(".in_layers.2"), m
            d, l = m.diffusers[: -len(".conv1")], m.ldm[: -len(".in_layers.2")]
            exact[f"{d}.norm1"] = f"{l}.in_layers.0"
            exact[f"{d}.norm2"] = f"{l}.out_layers.0"
        elif m.diffusers.endswith(".proj_in"):        # a SpatialTransformer
            assert m.ldm.endswith(".proj_in"), m
            inside[m.diffusers[: -len(".proj_in")] + "."] = m.ldm[: -len(".proj_in")] + "."
    exact["conv_norm_out"] = "out.0"
    names = {}
    for key in unet.state_dict():
        module, param = _module_and_param(key)
        if module in exact:
            names[key] = f"{exact[module]}.{param}"
            continue
        hits = [p for p in inside if key.startswith(p)]
        if len(hits) != 1:
            raise KeyError(f"UNet key {key!r} has no LDM name")
        names[key] = inside[hits[0]] + key[len(hits[0]):]
    if len(set(names.values())) != len(names):
        raise AssertionError("two UNet keys got the same LDM name")
    return names


_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_ldm_name(key: str, n_up: int) -> tuple[str, bool]:
    """``(LDM key without first_stage_model., whether the tensor is a Linear weight that LDM
    stores as a 1x1 convolution)`` of a diffusers ``AutoencoderKL`` key."""
    if key.startswith(("quant_conv.", "post_quant_conv.")):
        return key, False
    m = re.fullmatch(r"(encoder|decoder)\.(.+)", key)
    if m is None:
        raise KeyError(f"VAE key {key!r} has no LDM name")
    side, rest = m.groups()
    if rest.startswith(("conv_in.", "conv_out.")):
        return key, False
    if rest.startswith("conv_norm_out."):
        return f"{side}.norm_out.{rest[len('conv_norm_out.'):]}", False

    def resnet(inner: str) -> str:
        mod, param = _module_and_param(inner)
        mod = {"conv_shortcut": "nin_shortcut"}.get(mod, mod)
        if mod not in ("norm1", "conv1", "norm2", "conv2", "nin_shortcut"):
            raise KeyError(f"VAE key {key!r}: unknown ResnetBlock part {mod!r}")
        return f"{mod}.{param}"

    if side == "encoder" and (r := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest)):
        return f"encoder.down.{r[1]}.block.{r[2]}.{resnet(r[3])}", False
    if side == "encoder" and (r := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", rest)):
        return f"encoder.down.{r[1]}.downsample.conv.{r[2]}", False
    if side == "decoder" and (r := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest)):
        return f"decoder.up.{n_up - 1 - int(r[1])}.block.{r[2]}.{resnet(r[3])}", False
    if side == "decoder" and (r := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", rest)):
        return f"decoder.up.{n_up - 1 - int(r[1])}.upsample.conv.{r[2]}", False
    if r := re.fullmatch(r"mid_block\.resnets\.([01])\.(.+)", rest):
        return f"{side}.mid.block_{int(r[1]) + 1}.{resnet(r[2])}", False
    if r := re.fullmatch(r"mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(\w+)", rest):
        return f"{side}.mid.attn_1.{_VAE_ATTN[r[1]]}.{r[2]}", r[1] != "group_norm" and r[2] == "weight"
    raise KeyError(f"VAE key {key!r} has no LDM name")


def ldm_state_dict(pipe, *, position_ids: bool = True) -> dict[str, torch.Tensor]:
    """The pipeline's UNet, text encoder and VAE weights under their original LDM names.
    ``position_ids``: also write the text encoder's ``embeddings.position_ids`` as released SD1.x
    checkpoints do."""
    out: dict[str, torch.Tensor] = {}

    def put(key: str, value: torch.Tensor) -> None:
        if key in out:
            raise AssertionError(f"{key} written twice")
        out[key] = value.detach().to("cpu").contiguous().clone()

    unet_sd = pipe.unet.state_dict()
    for key, ldm in unet_ldm_names(pipe.unet).items():
        put(UNET_PREFIX + ldm, unet_sd[key])

    # HF CLIPTextModel: the same names; transformers >= 5.6 flattened away the ``text_model.`` level
    for key, value in pipe.text_encoder.state_dict().items():
        put(TEXT_PREFIX + key.removeprefix("text_model."), value)
    if position_ids:
        n = pipe.text_encoder.config.max_position_embeddings
        put(TEXT_PREFIX + "embeddings.position_ids", torch.arange(n, dtype=torch.int64)[None])

    n_up = len(pipe.vae.config.up_block_types)
    for key, value in pipe.vae.state_dict().items():
        ldm, to_conv = vae_ldm_name(key, n_up)
        put(VAE_PREFIX + ldm, value[:, :, None, None] if to_conv and value.ndim == 2 else value)
    return out


def write_ldm_checkpoint(pipe, path: str | os.PathLike, *,
                         position_ids: bool = True) -> dict[str, torch.Tensor]:
    """Write ``pipe`` (a diffusers SD1.x ``StableDiffusionPipeline``) as one LDM-layout
    ``.safetensors`` file at ``path``; returns the tensors written."""
    from safetensors.torch import save_file

    sd = ldm_state_dict(pipe, position_ids=position_ids)
    save_file(sd, str(path), metadata={"format": "pt"})
    return sd
