"""Helpers for test_lora.py: real diffusers/transformers module inventories (meta device, no
downloads) and synthetic LoRA state dicts in the exact key layouts of real releases.

A LoRA is described once as a list of :class:`Spec` (ground truth: component, diffusers and
LDM path, down/up tensors, alpha) and written out in any layout with :func:`write_layout`,
so every layout of the same weights can be compared with the others.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import numpy as np
import torch

from safet2i.lora.arch import Module, TextConfig, UNetConfig, text_modules, unet_modules

# ----------------------------------------------------------------------------- real configs

SDXL_KW = dict(
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=[1, 2, 10], cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    attention_head_dim=[5, 10, 20],
)
UNET_KW = {
    "sd1": dict(cross_attention_dim=768),
    "sd2": dict(cross_attention_dim=1024, use_linear_projection=True, attention_head_dim=[5, 10, 20, 20]),
    "sdxl": SDXL_KW,
}
# Not a named architecture, only checked through UNetConfig.from_diffusers.
SDXL_REFINER_KW = dict(
    block_out_channels=(384, 768, 1536, 1536),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=4, cross_attention_dim=1280, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2560,
    attention_head_dim=[6, 12, 24, 24],
)
# The UNet of tiny_diffusers.tiny_sdxl_pipeline (built alone here).
TINY_SDXL_UNET_KW = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64,
    norm_num_groups=32,
)
CLIP_KW = {  # (class name, config kwargs, our TextConfig)
    "clip-l": ("CLIPTextModel", dict(hidden_size=768, num_hidden_layers=12, intermediate_size=3072,
                                     num_attention_heads=12), TextConfig(768, 12, 3072)),
    "openclip-h": ("CLIPTextModel", dict(hidden_size=1024, num_hidden_layers=23, intermediate_size=4096,
                                         num_attention_heads=16, hidden_act="gelu"), TextConfig(1024, 23, 4096)),
    "openclip-bigg": ("CLIPTextModelWithProjection",
                      dict(hidden_size=1280, num_hidden_layers=32, intermediate_size=5120, num_attention_heads=20,
                           projection_dim=1280, hidden_act="gelu"), TextConfig(1280, 32, 5120, projection=1280)),
}


def meta_unet(kw: dict):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**kw)


@functools.lru_cache(maxsize=None)
def meta_unet_named(arch: str):
    return meta_unet(UNET_KW[arch])


def meta_clip(which: str):
    import transformers

    cls, kw, _ = CLIP_KW[which]
    with torch.device("meta"):
        return getattr(transformers, cls)(transformers.CLIPTextConfig(**kw))


def patchable(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """{name: weight shape} of every Linear / Conv2d."""
    return {n: tuple(m.weight.shape) for n, m in module.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def hf_text_name(name: str) -> str:
    """transformers ≥ 5 dropped the ``text_model.`` wrapper of ``CLIPTextModel`` (not of
    ``CLIPTextModelWithProjection``); LoRA files keep the original ``text_model.`` names."""
    return name if name.startswith(("text_model.", "text_projection")) else "text_model." + name


def shapes(mods: list[Module]) -> dict[str, tuple[int, ...]]:
    return {m.diffusers: tuple(m.shape) for m in mods}


# ----------------------------------------------------------------------------- ground truth

@dataclass
class Spec:
    component: str          # unet | te1 | te2
    diffusers: str
    ldm: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None
    dora: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank

    def delta64(self) -> np.ndarray:
        """scale·B·A in float64 numpy, weight-shaped, computed without safet2i."""
        up = self.up.double().numpy().reshape(self.up.shape[0], -1)
        down = self.down.double().numpy()
        full = up @ down.reshape(down.shape[0], -1)
        if down.ndim == 4:
            full = full.reshape(up.shape[0], down.shape[1], down.shape[2], down.shape[3])
        return self.scale * full


def make_specs(mods: list[Module], component: str = "unet", rank: int = 2, seed: int = 0,
               alpha: float | None = None, std: float = 0.1) -> list[Spec]:
    """Random LoRA weights for modules: Linear [r,in]/[out,r]; Conv 3×3 down [r,in,k,k], 1×1 up [out,r,1,1]."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for m in mods:
        if len(m.shape) == 4:
            down = torch.randn(rank, m.shape[1], m.shape[2], m.shape[3], generator=g) * std
            up = torch.randn(m.shape[0], rank, 1, 1, generator=g) * std
        else:
            down = torch.randn(rank, m.shape[1], generator=g) * std
            up = torch.randn(m.shape[0], rank, generator=g) * std
        out.append(Spec(component, m.diffusers, m.ldm, down, up, alpha))
    return out


# ----------------------------------------------------------------------------- layouts

def _flat(path: str) -> str:
    return path.replace(".", "_")


_TE_DOTTED = {"te1": "text_encoder.", "te2": "text_encoder_2."}


def _attn_proc_old(path: str) -> str | None:
    m = re.match(r"(.*\.attn[12])\.(to_q|to_k|to_v|to_out\.0)$", path)
    if not m:
        return None
    return f"{m.group(1)}.processor.{m.group(2).replace('.0', '')}_lora"


# layout: (unet key stem, text key stem (None: layout has no text keys), down suffix, up suffix, writes alpha)
def _stems(layout: str, s: Spec, sdxl: bool) -> tuple[str, str, str, bool]:
    te = s.component != "unet"
    kohya_te = {"te1": "lora_te1_" if sdxl else "lora_te_", "te2": "lora_te2_"}.get(s.component)
    if layout == "diffusers":        # DUO / save_lora_weights after convert_state_dict_to_diffusers
        stem = (_TE_DOTTED[s.component] if te else "unet.") + s.diffusers
        return stem, ".lora.down.weight", ".lora.up.weight", False
    if layout == "peft-unet":
        stem = (_TE_DOTTED[s.component] if te else "unet.") + s.diffusers
        return stem, ".lora_A.weight", ".lora_B.weight", False
    if layout == "peft-default":
        stem = (_TE_DOTTED[s.component] if te else "unet.") + s.diffusers
        return stem, ".lora_A.default.weight", ".lora_B.default.weight", False
    if layout == "peft-base":
        assert not te
        return "base_model.model." + s.diffusers, ".lora_A.weight", ".lora_B.weight", False
    if layout == "peft-bare":
        assert s.component in ("unet", "te1")
        return s.diffusers, ".lora_A.weight", ".lora_B.weight", False
    if layout == "kohya":
        return (kohya_te if te else "lora_unet_") + _flat(s.diffusers), ".lora_down.weight", ".lora_up.weight", True
    if layout == "kohya-ldm":
        return (kohya_te + _flat(s.diffusers)) if te else "lora_unet_" + _flat(s.ldm), \
            ".lora_down.weight", ".lora_up.weight", True
    if layout == "comfy-ldm":
        assert not te
        return "diffusion_model." + s.ldm, ".lora_A.weight", ".lora_B.weight", False
    if layout == "attn-processor-old":
        assert not te
        return "unet." + _attn_proc_old(s.diffusers), ".down.weight", ".up.weight", False
    if layout == "lora-linear-layer":
        stem = (_TE_DOTTED[s.component] if te else "unet.") + s.diffusers
        return stem, ".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight", False
    raise KeyError(layout)


LAYOUTS = ["diffusers", "peft-unet", "peft-default", "peft-base", "peft-bare", "kohya", "kohya-ldm",
           "comfy-ldm", "attn-processor-old", "lora-linear-layer"]
UNET_ONLY = {"peft-base", "comfy-ldm", "attn-processor-old"}
ATTN_ONLY = {"attn-processor-old"}
WRITES_ALPHA = {"kohya", "kohya-ldm"}
LDM_NAMED = {"kohya-ldm", "comfy-ldm"}
FORMAT_NAMES = {
    "diffusers": ["diffusers"],
    "peft-unet": ["diffusers-PEFT"], "peft-default": ["diffusers-PEFT"], "peft-base": ["diffusers-PEFT"],
    "peft-bare": ["diffusers-PEFT"],
    "kohya": ["kohya"], "kohya-ldm": ["LDM/ComfyUI names", "kohya"],
    "comfy-ldm": ["LDM/ComfyUI names", "diffusers-PEFT"],
    "attn-processor-old": ["diffusers attn-processor (old)"], "lora-linear-layer": ["diffusers attn-processor"],
}


def layout_accepts(layout: str, s: Spec) -> bool:
    if layout in UNET_ONLY and s.component != "unet":
        return False
    if layout == "peft-bare" and s.component == "te2":
        return False
    if layout in ATTN_ONLY and _attn_proc_old(s.diffusers) is None:
        return False
    return True


def write_layout(specs: list[Spec], layout: str, sdxl: bool = False) -> dict[str, torch.Tensor]:
    """State dict of ``specs`` in ``layout`` (alpha written only by kohya layouts: the spec's, else rank)."""
    sd: dict[str, torch.Tensor] = {}
    for s in specs:
        stem, dsuf, usuf, alpha = _stems(layout, s, sdxl)
        sd[stem + dsuf] = s.down.clone()
        sd[stem + usuf] = s.up.clone()
        if alpha:
            sd[stem + ".alpha"] = torch.tensor(float(s.alpha if s.alpha is not None else s.rank))
        if s.dora is not None:
            if layout.startswith("kohya"):
                sd[stem + ".dora_scale"] = s.dora.clone()
            else:
                sd[stem + ".lora_magnitude_vector"] = s.dora.clone()
    return sd


def expected_module(layout: str, s: Spec) -> tuple[str, str]:
    """(module, naming) parse() must give for a spec written in ``layout`` (arch known to the inventory)."""
    if layout in LDM_NAMED and s.component == "unet":
        return s.ldm, "ldm"
    return s.diffusers, "diffusers"


# ----------------------------------------------------------------------------- hosts

def host_resolver(unet: torch.nn.Module, text: torch.nn.Module | None = None):
    """target -> (host key, weight shape) for a real diffusers UNet (+ HF CLIP text encoder), any naming;
    built from the module tree, not from safet2i's key tables (only its LDM map)."""
    params = {"unet": {n: m.weight for n, m in unet.named_modules()
                       if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}}
    if text is not None:
        params["te1"] = {hf_text_name(n): m.weight for n, m in text.named_modules() if isinstance(m, torch.nn.Linear)}
    ldm = {m.ldm: m.diffusers for m in unet_modules(UNetConfig.from_diffusers(unet.config))}
    flat = {c: {_flat(n): n for n in p} for c, p in params.items()}
    flat_ldm = {_flat(k): v for k, v in ldm.items()}

    def resolve(t):
        names = params.get(t.component, {})
        if t.naming == "diffusers":
            name = t.module
        elif t.naming == "ldm":
            name = ldm.get(t.module)
        else:
            name = flat.get(t.component, {}).get(t.module) or (flat_ldm.get(t.module) if t.component == "unet" else None)
        w = names.get(name) if name else None
        return (f"{t.component}.{name}", tuple(w.shape)) if w is not None else (None, None)

    return resolve, params


def tiny_unet_modules(unet) -> list[Module]:
    return unet_modules(UNetConfig.from_diffusers(unet.config))


def tiny_text_modules(text) -> list[Module]:
    c = text.config
    return text_modules(TextConfig(c.hidden_size, c.num_hidden_layers, c.intermediate_size))


# ----------------------------------------------------------------------------- hostile files (converters)

def duo_state(arch: str = "sd1", rank: int = 32, seed: int = 0, layout: str = "diffusers",
              std: float = 0.01) -> dict[str, torch.Tensor]:
    """DUO's release shape (every UNet self-attention projection, no alpha) in ``layout``."""
    mods = [m for m in unet_modules(_unet_cfg(arch)) if ".attn1." in m.diffusers]
    return write_layout(make_specs(mods, rank=rank, seed=seed, std=std), layout)


def _unet_cfg(arch: str) -> UNetConfig:
    from safet2i.lora.arch import ARCHITECTURES

    return ARCHITECTURES[arch].unet


KOHYA_Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"   # SD1/SD2: [320, 320]


def one_target(down: torch.Tensor, up: torch.Tensor, alpha: float | torch.Tensor | None = None,
               stem: str = KOHYA_Q) -> dict[str, torch.Tensor]:
    """A one-target kohya state dict (tensors used as given, so degenerate ones can be built)."""
    sd = {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up}
    if alpha is not None:
        sd[f"{stem}.alpha"] = alpha if isinstance(alpha, torch.Tensor) else torch.tensor(float(alpha))
    return sd


# ----------------------------------------------------------------------------- diffusion transformers
# Tiny configs of the real diffusers classes (test_lora_families.py); every option that adds a
# targetable module is switched on somewhere (Flux guidance, SD3 dual attention and its last
# context_pre_only block, Wan I2V image cross-attention).

DIT_TINY = {
    "flux": ("FluxTransformer2DModel", dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=24,
                                            pooled_projection_dim=20, guidance_embeds=True, axes_dims_rope=(2, 2, 4))),
    "flux-schnell": ("FluxTransformer2DModel", dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                                    attention_head_dim=8, num_attention_heads=2,
                                                    joint_attention_dim=24, pooled_projection_dim=20,
                                                    guidance_embeds=False, axes_dims_rope=(2, 2, 4))),
    "sd3": ("SD3Transformer2DModel", dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3,
                                          attention_head_dim=8, num_attention_heads=2, joint_attention_dim=24,
                                          caption_projection_dim=16, pooled_projection_dim=20, out_channels=4,
                                          pos_embed_max_size=8, dual_attention_layers=(0,), qk_norm="rms_norm")),
    "qwen-image": ("QwenImageTransformer2DModel", dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                                       attention_head_dim=8, num_attention_heads=2,
                                                       joint_attention_dim=24, axes_dims_rope=(2, 2, 4))),
    "wan": ("WanTransformer3DModel", dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                          in_channels=4, out_channels=4, text_dim=24, freq_dim=16, ffn_dim=40,
                                          num_layers=2, rope_max_seq_len=32)),
    "wan-i2v": ("WanTransformer3DModel", dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                              in_channels=4, out_channels=4, text_dim=24, freq_dim=16, ffn_dim=40,
                                              num_layers=1, rope_max_seq_len=32, image_dim=12, added_kv_proj_dim=16)),
}


def dit_family(key: str) -> str:
    return {"flux-schnell": "flux", "wan-i2v": "wan"}.get(key, key)


def tiny_dit(key: str, device: str = "cpu", seed: int = 0):
    import diffusers

    cls, kw = DIT_TINY[key]
    torch.manual_seed(seed)
    with torch.device(device):
        return getattr(diffusers, cls)(**kw).eval()


def dit_linear_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """{name: weight shape} of every Linear / Conv2d of a real diffusers transformer."""
    return {n: tuple(m.weight.shape) for n, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


@dataclass
class Factor:
    """One LoRA as written in a file: its module name (in the file's naming), A, B, alpha."""
    name: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None

    def delta64(self) -> np.ndarray:
        """scale·B·A in float64 numpy (weight-shaped), computed without safet2i."""
        up = self.up.double().numpy().reshape(self.up.shape[0], -1)
        down = self.down.double().numpy()
        full = up @ down.reshape(down.shape[0], -1)
        scale = 1.0 if self.alpha is None else self.alpha / down.shape[0]
        return scale * full.reshape((up.shape[0], *down.shape[1:]))


def make_factors(shapes: dict[str, tuple[int, ...]], rank: int = 2, seed: int = 0, alpha: float | None = None,
                 std: float = 0.2) -> list[Factor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for name, shape in shapes.items():
        if len(shape) == 4:
            down = torch.randn(rank, *shape[1:], generator=g) * std
            up = torch.randn(shape[0], rank, 1, 1, generator=g) * std
        else:
            down = torch.randn(rank, shape[1], generator=g) * std
            up = torch.randn(shape[0], rank, generator=g) * std
        out.append(Factor(name, down, up, alpha))
    return out


# (key stem, down suffix, up suffix, writes alpha)
DIT_LAYOUTS = {
    "peft-transformer": ("transformer.{d}", ".lora_A.weight", ".lora_B.weight", False),   # diffusers/ai-toolkit/EraseAnything
    "peft-bare": ("{d}", ".lora_A.weight", ".lora_B.weight", False),
    "peft-base": ("base_model.model.{d}", ".lora_A.weight", ".lora_B.weight", False),
    "peft-default": ("transformer.{d}", ".lora_A.default.weight", ".lora_B.default.weight", False),
    "diffusers-old": ("transformer.{d}", ".lora.down.weight", ".lora.up.weight", False),
    "onetrainer": ("lora_transformer_{f}", ".lora_down.weight", ".lora_up.weight", True),
    "kohya-native": ("lora_unet_{f}", ".lora_down.weight", ".lora_up.weight", True),       # sd-scripts Flux, musubi Wan
    "comfy-native": ("diffusion_model.{d}", ".lora_A.weight", ".lora_B.weight", True),    # ComfyUI / BFL / Wan original
}
NATIVE_LAYOUTS = {"kohya-native", "comfy-native"}


def write_dit_layout(factors: list[Factor], layout: str) -> dict[str, torch.Tensor]:
    stem, dsuf, usuf, alpha = DIT_LAYOUTS[layout]
    sd = {}
    for f in factors:
        k = stem.format(d=f.name, f=f.name.replace(".", "_"))
        sd[k + dsuf], sd[k + usuf] = f.down.clone(), f.up.clone()
        if alpha:
            sd[k + ".alpha"] = torch.tensor(float(f.alpha if f.alpha is not None else f.down.shape[0]))
    return sd
