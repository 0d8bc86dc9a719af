"""A random-weight SD1.x checkpoint in the original LDM layout (what a webui loads).

Every key and shape of a full-size SD1.5 ``.safetensors`` (UNet ``model.diffusion_model.*``,
CLIP-L ``cond_stage_model.transformer.*``, VAE ``first_stage_model.*``), written from the
architectures' published structure (CompVis ``openaimodel.UNetModel`` with
``model_channels=320, channel_mult=(1, 2, 4, 4), attention_resolutions=(4, 2, 1),
num_res_blocks=2, context_dim=768``; HF ``CLIPTextModel`` ViT-L/14 text tower; LDM
``AutoencoderKL`` with ``ch=128, ch_mult=(1, 2, 4, 4), z_channels=4``). Nothing of a webui
or of this package is imported. Weights are random and small (matrices N(0, 0.5²/fan_in),
norms 1/0, token embeddings N(0, 0.02²)): generated images are noise.
"""

from __future__ import annotations

from collections.abc import Iterator

Shape = tuple[int, ...]

UNET_CH, UNET_MULT, UNET_ATTN_LEVELS, UNET_RES, CTX = 320, (1, 2, 4, 4), (True, True, True, False), 2, 768
CLIP_D, CLIP_LAYERS, CLIP_FF, CLIP_VOCAB, CLIP_POS = 768, 12, 3072, 49408, 77
VAE_CH, VAE_MULT, VAE_RES, VAE_Z = 128, (1, 2, 4, 4), 2, 4


def _norm(p: str, c: int) -> Iterator[tuple[str, Shape]]:
    yield f"{p}.weight", (c,)
    yield f"{p}.bias", (c,)


def _lin(p: str, out: int, inp: int, bias: bool = True) -> Iterator[tuple[str, Shape]]:
    yield f"{p}.weight", (out, inp)
    if bias:
        yield f"{p}.bias", (out,)


def _conv(p: str, out: int, inp: int, k: int) -> Iterator[tuple[str, Shape]]:
    yield f"{p}.weight", (out, inp, k, k)
    yield f"{p}.bias", (out,)


# --------------------------------------------------------------------------- UNet


def _res(p: str, cin: int, cout: int, temb: int) -> Iterator[tuple[str, Shape]]:
    yield from _norm(f"{p}.in_layers.0", cin)
    yield from _conv(f"{p}.in_layers.2", cout, cin, 3)
    yield from _lin(f"{p}.emb_layers.1", cout, temb)
    yield from _norm(f"{p}.out_layers.0", cout)
    yield from _conv(f"{p}.out_layers.3", cout, cout, 3)
    if cin != cout:
        yield from _conv(f"{p}.skip_connection", cout, cin, 1)


def _st(p: str, c: int) -> Iterator[tuple[str, Shape]]:
    yield from _norm(f"{p}.norm", c)
    yield from _conv(f"{p}.proj_in", c, c, 1)
    b = f"{p}.transformer_blocks.0"
    for attn, kv in (("attn1", c), ("attn2", CTX)):
        yield from _lin(f"{b}.{attn}.to_q", c, c, bias=False)
        yield from _lin(f"{b}.{attn}.to_k", c, kv, bias=False)
        yield from _lin(f"{b}.{attn}.to_v", c, kv, bias=False)
        yield from _lin(f"{b}.{attn}.to_out.0", c, c)
    yield from _lin(f"{b}.ff.net.0.proj", 8 * c, c)      # GEGLU: 2 × (4c)
    yield from _lin(f"{b}.ff.net.2", c, 4 * c)
    for n in ("norm1", "norm2", "norm3"):
        yield from _norm(f"{b}.{n}", c)
    yield from _conv(f"{p}.proj_out", c, c, 1)


def unet_shapes() -> Iterator[tuple[str, Shape]]:
    temb = 4 * UNET_CH
    yield from _lin("time_embed.0", temb, UNET_CH)
    yield from _lin("time_embed.2", temb, temb)
    yield from _conv("input_blocks.0.0", UNET_CH, 4, 3)
    skips, ch, idx = [UNET_CH], UNET_CH, 1
    for level, mult in enumerate(UNET_MULT):
        for _ in range(UNET_RES):
            out = UNET_CH * mult
            yield from _res(f"input_blocks.{idx}.0", ch, out, temb)
            ch = out
            if UNET_ATTN_LEVELS[level]:
                yield from _st(f"input_blocks.{idx}.1", ch)
            skips.append(ch)
            idx += 1
        if level < len(UNET_MULT) - 1:
            yield from _conv(f"input_blocks.{idx}.0.op", ch, ch, 3)
            skips.append(ch)
            idx += 1
    yield from _res("middle_block.0", ch, ch, temb)
    yield from _st("middle_block.1", ch)
    yield from _res("middle_block.2", ch, ch, temb)
    idx = 0
    for level in reversed(range(len(UNET_MULT))):
        for i in range(UNET_RES + 1):
            out = UNET_CH * UNET_MULT[level]
            yield from _res(f"output_blocks.{idx}.0", ch + skips.pop(), out, temb)
            ch, slot = out, 1
            if UNET_ATTN_LEVELS[level]:
                yield from _st(f"output_blocks.{idx}.1", ch)
                slot = 2
            if level and i == UNET_RES:
                yield from _conv(f"output_blocks.{idx}.{slot}.conv", ch, ch, 3)
            idx += 1
    yield from _norm("out.0", ch)
    yield from _conv("out.2", 4, ch, 3)


# --------------------------------------------------------------------------- CLIP-L text tower


def clip_shapes() -> Iterator[tuple[str, Shape]]:
    t = "text_model"
    yield f"{t}.embeddings.token_embedding.weight", (CLIP_VOCAB, CLIP_D)
    yield f"{t}.embeddings.position_embedding.weight", (CLIP_POS, CLIP_D)
    for n in range(CLIP_LAYERS):
        p = f"{t}.encoder.layers.{n}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            yield from _lin(f"{p}.self_attn.{proj}", CLIP_D, CLIP_D)
        yield from _norm(f"{p}.layer_norm1", CLIP_D)
        yield from _lin(f"{p}.mlp.fc1", CLIP_FF, CLIP_D)
        yield from _lin(f"{p}.mlp.fc2", CLIP_D, CLIP_FF)
        yield from _norm(f"{p}.layer_norm2", CLIP_D)
    yield from _norm(f"{t}.final_layer_norm", CLIP_D)


# --------------------------------------------------------------------------- VAE


def _vres(p: str, cin: int, cout: int) -> Iterator[tuple[str, Shape]]:
    yield from _norm(f"{p}.norm1", cin)
    yield from _conv(f"{p}.conv1", cout, cin, 3)
    yield from _norm(f"{p}.norm2", cout)
    yield from _conv(f"{p}.conv2", cout, cout, 3)
    if cin != cout:
        yield from _conv(f"{p}.nin_shortcut", cout, cin, 1)


def _vmid(p: str, c: int) -> Iterator[tuple[str, Shape]]:
    yield from _vres(f"{p}.block_1", c, c)
    yield from _norm(f"{p}.attn_1.norm", c)
    for n in ("q", "k", "v", "proj_out"):
        yield from _conv(f"{p}.attn_1.{n}", c, c, 1)
    yield from _vres(f"{p}.block_2", c, c)


def vae_shapes() -> Iterator[tuple[str, Shape]]:
    chans = [VAE_CH * m for m in VAE_MULT]
    yield from _conv("encoder.conv_in", VAE_CH, 3, 3)
    ch = VAE_CH
    for i, out in enumerate(chans):
        for j in range(VAE_RES):
            yield from _vres(f"encoder.down.{i}.block.{j}", ch, out)
            ch = out
        if i < len(chans) - 1:
            yield from _conv(f"encoder.down.{i}.downsample.conv", ch, ch, 3)
    yield from _vmid("encoder.mid", ch)
    yield from _norm("encoder.norm_out", ch)
    yield from _conv("encoder.conv_out", 2 * VAE_Z, ch, 3)
    yield from _conv("quant_conv", 2 * VAE_Z, 2 * VAE_Z, 1)
    yield from _conv("post_quant_conv", VAE_Z, VAE_Z, 1)
    ch = chans[-1]
    yield from _conv("decoder.conv_in", ch, VAE_Z, 3)
    yield from _vmid("decoder.mid", ch)
    for i in reversed(range(len(chans))):
        for j in range(VAE_RES + 1):
            yield from _vres(f"decoder.up.{i}.block.{j}", ch, chans[i])
            ch = chans[i]
        if i:
            yield from _conv(f"decoder.up.{i}.upsample.conv", ch, ch, 3)
    yield from _norm("decoder.norm_out", ch)
    yield from _conv("decoder.conv_out", 3, ch, 3)


def checkpoint_shapes() -> dict[str, Shape]:
    out: dict[str, Shape] = {}
    for prefix, gen in (("model.diffusion_model.", unet_shapes), ("cond_stage_model.transformer.", clip_shapes),
                        ("first_stage_model.", vae_shapes)):
        for key, shape in gen():
            assert prefix + key not in out, key
            out[prefix + key] = shape
    return out


def write_checkpoint(path, seed: int = 0, dtype: str = "float16") -> dict[str, Shape]:
    """Write the checkpoint to ``path`` (safetensors); returns the key → shape table."""
    import torch  # noqa: PLC0415
    from safetensors.torch import save_file  # noqa: PLC0415

    shapes = checkpoint_shapes()
    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype)
    sd = {}
    for key, shape in shapes.items():
        if key.endswith(("token_embedding.weight", "position_embedding.weight")):
            t = torch.randn(shape, generator=g) * 0.02
        elif len(shape) >= 2:
            fan_in = 1
            for s in shape[1:]:
                fan_in *= s
            t = torch.randn(shape, generator=g) * (0.5 / fan_in ** 0.5)
        elif ".norm" in key or "layer_norm" in key or key.endswith(("in_layers.0.weight", "out_layers.0.weight",
                                                                    "out.0.weight")):
            t = torch.ones(shape) if key.endswith(".weight") else torch.zeros(shape)
        else:
            t = torch.zeros(shape)
        sd[key] = t.to(dt).contiguous()
    save_file(sd, str(path), metadata={"format": "pt", "written_by": "safet2i tests/webui (random weights)"})
    return shapes
