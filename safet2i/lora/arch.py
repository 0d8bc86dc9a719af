"""Module inventories of Stable Diffusion UNets and CLIP text encoders, computed from a config.

For every LoRA-patchable module (Linear or Conv2d) we list its diffusers path, its original
LDM ("CompVis", ComfyUI ``diffusion_model.*``) path and its weight shape. The inventory is what
lets us resolve kohya's flattened names, convert LDM names to diffusers names, recognise a
file's base architecture from its shapes and measure coverage without any host loaded.

The layout rules are those of diffusers' ``UNet2DConditionModel`` with cross-attention down/up
blocks and of the original ``openaimodel.UNetModel`` it was converted from; both are checked in
the tests against real diffusers modules and diffusers' own LDM → diffusers converter.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Module:
    diffusers: str
    ldm: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class UNetConfig:
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    attention_levels: tuple[bool, ...] = (True, True, True, False)
    transformer_depth: tuple[int, ...] = (1, 1, 1, 0)
    mid_depth: int = 1
    layers_per_block: int = 2
    cross_attention_dim: int = 768
    linear_projection: bool = False
    in_channels: int = 4
    out_channels: int = 4
    addition_embed_dim: int | None = None  # SDXL: 2816
    time_embed_dim: int | None = None      # default 4 × block_out_channels[0]
    ff_mult: int = 4
    mid_block: bool = True

    @classmethod
    def from_diffusers(cls, config) -> UNetConfig:
        """From a diffusers ``UNet2DConditionModel.config`` (or a dict of it)."""
        get = (lambda k, d=None: config.get(k, d)) if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
        boc = tuple(get("block_out_channels"))
        levels = tuple("CrossAttn" in t for t in get("down_block_types"))
        tl = get("transformer_layers_per_block", 1)
        depth = tuple(tl) if isinstance(tl, (list, tuple)) else (tl,) * len(boc)
        depth = tuple(d if a else 0 for d, a in zip(depth, levels))
        mid_type = get("mid_block_type", "UNetMidBlock2DCrossAttn")
        add = get("projection_class_embeddings_input_dim") if get("addition_embed_type") == "text_time" else None
        return cls(
            block_out_channels=boc, attention_levels=levels, transformer_depth=depth,
            mid_depth=(tl[-1] if isinstance(tl, (list, tuple)) else tl) if mid_type and "CrossAttn" in mid_type else 0,
            layers_per_block=int(get("layers_per_block", 2)), cross_attention_dim=int(get("cross_attention_dim")),
            linear_projection=bool(get("use_linear_projection", False)), in_channels=int(get("in_channels", 4)),
            out_channels=int(get("out_channels", 4)), addition_embed_dim=add,
            time_embed_dim=get("time_embedding_dim"), mid_block=mid_type is not None,
        )


@dataclass(frozen=True)
class TextConfig:
    hidden: int = 768
    layers: int = 12
    intermediate: int = 3072
    projection: int | None = None  # text_projection of CLIPTextModelWithProjection (SDXL bigG)


@dataclass
class Architecture:
    name: str
    title: str
    unet: UNetConfig
    text: dict[str, TextConfig] = field(default_factory=dict)


ARCHITECTURES: dict[str, Architecture] = {
    "sd1": Architecture("sd1", "SD1.x (v1.4/v1.5 and finetunes)", UNetConfig(), {"te1": TextConfig()}),
    "sd2": Architecture(
        "sd2", "SD2.x (OpenCLIP-H)",
        UNetConfig(cross_attention_dim=1024, linear_projection=True),
        {"te1": TextConfig(1024, 23, 4096)},
    ),
    "sdxl": Architecture(
        "sdxl", "SDXL 1.0",
        UNetConfig(block_out_channels=(320, 640, 1280), attention_levels=(False, True, True),
                   transformer_depth=(0, 2, 10), mid_depth=10, cross_attention_dim=2048,
                   linear_projection=True, addition_embed_dim=2816),
        {"te1": TextConfig(768, 12, 3072), "te2": TextConfig(1280, 32, 5120, projection=1280)},
    ),
}


def _linear(out: int, inp: int) -> tuple[int, ...]:
    return (out, inp)


def _conv(out: int, inp: int, k: int) -> tuple[int, ...]:
    return (out, inp, k, k)


def _resnet(d: str, ldm: str, cin: int, cout: int, temb: int) -> list[Module]:
    mods = [
        Module(f"{d}.conv1", f"{ldm}.in_layers.2", _conv(cout, cin, 3)),
        Module(f"{d}.time_emb_proj", f"{ldm}.emb_layers.1", _linear(cout, temb)),
        Module(f"{d}.conv2", f"{ldm}.out_layers.3", _conv(cout, cout, 3)),
    ]
    if cin != cout:
        mods.append(Module(f"{d}.conv_shortcut", f"{ldm}.skip_connection", _conv(cout, cin, 1)))
    return mods


def _transformer(d: str, ldm: str, c: int, depth: int, ctx: int, linear: bool, ff_mult: int) -> list[Module]:
    proj = _linear(c, c) if linear else _conv(c, c, 1)
    mods = [Module(f"{d}.proj_in", f"{ldm}.proj_in", proj)]
    for k in range(depth):
        b, lb = f"{d}.transformer_blocks.{k}", f"{ldm}.transformer_blocks.{k}"
        for attn, kv in (("attn1", c), ("attn2", ctx)):
            mods += [
                Module(f"{b}.{attn}.to_q", f"{lb}.{attn}.to_q", _linear(c, c)),
                Module(f"{b}.{attn}.to_k", f"{lb}.{attn}.to_k", _linear(c, kv)),
                Module(f"{b}.{attn}.to_v", f"{lb}.{attn}.to_v", _linear(c, kv)),
                Module(f"{b}.{attn}.to_out.0", f"{lb}.{attn}.to_out.0", _linear(c, c)),
            ]
        inner = c * ff_mult
        mods += [
            Module(f"{b}.ff.net.0.proj", f"{lb}.ff.net.0.proj", _linear(2 * inner, c)),
            Module(f"{b}.ff.net.2", f"{lb}.ff.net.2", _linear(c, inner)),
        ]
    mods.append(Module(f"{d}.proj_out", f"{ldm}.proj_out", proj))
    return mods


def unet_modules(cfg: UNetConfig) -> list[Module]:
    boc, lpb = cfg.block_out_channels, cfg.layers_per_block
    temb = cfg.time_embed_dim or boc[0] * 4
    mods = [
        Module("conv_in", "input_blocks.0.0", _conv(boc[0], cfg.in_channels, 3)),
        Module("time_embedding.linear_1", "time_embed.0", _linear(temb, boc[0])),
        Module("time_embedding.linear_2", "time_embed.2", _linear(temb, temb)),
    ]
    if cfg.addition_embed_dim:
        mods += [
            Module("add_embedding.linear_1", "label_emb.0.0", _linear(temb, cfg.addition_embed_dim)),
            Module("add_embedding.linear_2", "label_emb.0.2", _linear(temb, temb)),
        ]
    n = len(boc)
    # Encoder: input_blocks[1 + i·(lpb+1) + j] = (resnet j, attention j); downsampler after.
    skip = [boc[0]]
    cin = boc[0]
    for i, cout in enumerate(boc):
        for j in range(lpb):
            idx = 1 + i * (lpb + 1) + j
            mods += _resnet(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{idx}.0", cin, cout, temb)
            if cfg.attention_levels[i]:
                mods += _transformer(f"down_blocks.{i}.attentions.{j}", f"input_blocks.{idx}.1", cout,
                                     cfg.transformer_depth[i], cfg.cross_attention_dim, cfg.linear_projection, cfg.ff_mult)
            cin = cout
            skip.append(cout)
        if i < n - 1:
            idx = (i + 1) * (lpb + 1)
            mods.append(Module(f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{idx}.0.op", _conv(cout, cout, 3)))
            skip.append(cout)
    c = boc[-1]
    if cfg.mid_block:
        mods += _resnet("mid_block.resnets.0", "middle_block.0", c, c, temb)
        if cfg.mid_depth:
            mods += _transformer("mid_block.attentions.0", "middle_block.1", c, cfg.mid_depth,
                                 cfg.cross_attention_dim, cfg.linear_projection, cfg.ff_mult)
            mods += _resnet("mid_block.resnets.1", "middle_block.2", c, c, temb)
        else:
            mods += _resnet("mid_block.resnets.1", "middle_block.1", c, c, temb)
    # Decoder: output_blocks[i·(lpb+1) + j] = (resnet j, attention j[, upsampler]).
    rev = list(reversed(boc))
    rev_levels = list(reversed(cfg.attention_levels))
    rev_depth = list(reversed(cfg.transformer_depth))
    cin = c
    for i, cout in enumerate(rev):
        for j in range(lpb + 1):
            idx = i * (lpb + 1) + j
            s = skip.pop()
            mods += _resnet(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{idx}.0", cin + s, cout, temb)
            if rev_levels[i]:
                mods += _transformer(f"up_blocks.{i}.attentions.{j}", f"output_blocks.{idx}.1", cout,
                                     rev_depth[i], cfg.cross_attention_dim, cfg.linear_projection, cfg.ff_mult)
            cin = cout
        if i < n - 1:
            idx = i * (lpb + 1) + lpb
            slot = 2 if rev_levels[i] else 1
            mods.append(Module(f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{idx}.{slot}.conv", _conv(cout, cout, 3)))
    mods.append(Module("conv_out", "out.2", _conv(cfg.out_channels, boc[0], 3)))
    return mods


def text_modules(cfg: TextConfig) -> list[Module]:
    """HF ``CLIPTextModel`` names (diffusers, kohya and ComfyUI all use them for LoRA keys)."""
    mods = []
    d = cfg.hidden
    for n in range(cfg.layers):
        p = f"text_model.encoder.layers.{n}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            mods.append(Module(f"{p}.self_attn.{proj}", f"{p}.self_attn.{proj}", (d, d)))
        mods += [Module(f"{p}.mlp.fc1", f"{p}.mlp.fc1", (cfg.intermediate, d)),
                 Module(f"{p}.mlp.fc2", f"{p}.mlp.fc2", (d, cfg.intermediate))]
    if cfg.projection:
        mods.append(Module("text_projection", "text_projection", (cfg.projection, d)))
    return mods


_CACHE: dict[str, dict[str, dict[str, Module]]] = {}


def titles() -> dict[str, str]:
    """Every named architecture (SD UNets, then the transformer families of ``dit_arch``) and its title."""
    from .dit_arch import DIT_ARCHITECTURES  # noqa: PLC0415

    return {**{k: a.title for k, a in ARCHITECTURES.items()}, **{k: a.title for k, a in DIT_ARCHITECTURES.items()}}


def is_dit(arch: str | None) -> bool:
    """Whether ``arch`` names a diffusion-transformer architecture (Flux, SD3, Qwen-Image, Wan)."""
    from .dit_arch import DIT_ARCHITECTURES  # noqa: PLC0415

    return arch in DIT_ARCHITECTURES


def inventory(arch: str) -> dict[str, dict[str, Module]]:
    """``{component: {diffusers path: Module}}`` for a named architecture (cached). For a
    transformer (``dit_arch``) the only component is the denoiser, ``unet`` (as kohya's
    ``lora_unet_`` and ComfyUI's ``diffusion_model.``), and ``Module.ldm`` is its native name
    (empty for a module stored inside a stacked native weight)."""
    if arch not in _CACHE and is_dit(arch):
        from .dit_arch import arch_inventory  # noqa: PLC0415

        _CACHE[arch] = {"unet": dict(arch_inventory(arch).modules)}
    if arch not in _CACHE:
        a = ARCHITECTURES[arch]
        inv = {"unet": {m.diffusers: m for m in unet_modules(a.unet)}}
        for comp, tc in a.text.items():
            inv[comp] = {m.diffusers: m for m in text_modules(tc)}
        _CACHE[arch] = inv
    return _CACHE[arch]
