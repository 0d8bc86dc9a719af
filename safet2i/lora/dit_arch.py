"""LoRA-targetable modules of diffusion transformers (SD3/SD3.5, Flux.1, Qwen-Image, Wan 2.1/2.2),
computed from the config of their diffusers class, with the names of the original releases.

Two namings exist for each family:

* **diffusers**: the module paths of ``SD3Transformer2DModel``, ``FluxTransformer2DModel``,
  ``QwenImageTransformer2DModel`` and ``WanTransformer3DModel`` (what diffusers/PEFT,
  ai-toolkit and EraseAnything LoRAs name, usually under ``transformer.``);
* **native**: the original releases' module paths, which ComfyUI's models use
  (``diffusion_model.<native>``) and kohya/musubi LoRAs flatten (``lora_unet_<native with _>``):
  BFL Flux (``double_blocks.N.img_attn.qkv``, ``single_blocks.N.linear1``), SAI MMDiT
  (``joint_blocks.N.x_block.attn.qkv``), Wan (``blocks.N.self_attn.q``); Qwen-Image's
  original names are diffusers' own.

Most native modules are one diffusers module under another name. Some are several diffusers
modules **stacked along the output dimension** (:class:`Piece`): Flux ``img_attn.qkv`` =
``[to_q; to_k; to_v]``, ``txt_attn.qkv`` = ``[add_q_proj; add_k_proj; add_v_proj]``,
``single_blocks.N.linear1`` = ``[to_q; to_k; to_v; proj_mlp]``; SD3 ``x_block.attn.qkv`` /
``context_block.attn.qkv`` / ``x_block.attn2.qkv`` likewise. And the final AdaLN projection
(``final_layer.adaLN_modulation.1`` of Flux and SD3, and SD3's last ``context_block``) stores
diffusers' ``norm_out.linear`` / ``norm1_context.linear`` rows with its two halves swapped
(``shift, scale`` vs ``scale, shift``).

LoRA factors follow from ``ΔW = s·B·A`` (B: up ``[out, r]``, A: down ``[r, in]``, s = alpha/r):

* **split** (a native stacked LoRA → diffusers targets): piece i's rows of ΔW are
  ``s·B[rows_i]·A``, so piece i gets up ``B[rows_i]`` (halves swapped back where the native
  rows are swapped), the **same** down ``A`` and the same alpha and rank: exact, bit for bit.
* **fuse** (diffusers targets → one native stacked LoRA): with pieces sharing one down and one
  scale (what a split gives), up = the pieces' ups stacked in row order, down = the shared A:
  rank r, exact. Otherwise the ranks are concatenated, block-diagonally:
  ``down = [s_1·A_1; …; s_k·A_k]`` (rank Σr_i), ``up`` zero except ``B_i`` at (rows_i, the
  columns of A_i), alpha = Σr_i (scale 1): ``up·down = Σ_i E_i·s_i·B_i·A_i``, the stacked
  ΔW, where E_i places rows; a piece the file does not patch stays zero rows (unchanged, as
  before). The scale folded into the down factor is the only rounding (float32).

Only Linear modules of the denoiser (plus SD3's ``pos_embed.proj`` Conv2d) are listed; Wan's
``patch_embedding`` (Conv3d) and the text encoders (CLIP, T5, UMT5, Qwen2.5-VL) are not: a LoRA
that targets them is reported unmatched (refused).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .arch import Module


@dataclass(frozen=True)
class Piece:
    """A diffusers module stored as rows ``[start, start + rows)`` of a native weight."""
    diffusers: str
    start: int
    rows: int
    swap: bool = False   # native rows = diffusers rows with the two halves exchanged


@dataclass(frozen=True)
class Native:
    """A native module: its name, weight shape and the diffusers modules it stacks (one for a rename)."""
    name: str
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]

    @property
    def fused(self) -> bool:
        return len(self.pieces) > 1 or self.pieces[0].swap


@dataclass
class DitInventory:
    family: str
    modules: dict[str, Module] = field(default_factory=dict)   # diffusers path -> Module (ldm = native or "")
    natives: dict[str, Native] = field(default_factory=dict)   # native path -> Native
    owner: dict[str, str] = field(default_factory=dict)        # diffusers path -> native path holding it

    def add(self, native: str, *mods: tuple[str, tuple[int, ...]], swap: bool = False) -> None:
        """``native`` stacks ``mods`` (diffusers path, shape) in order along dim 0."""
        pieces, start = [], 0
        inner = mods[0][1][1:]
        for name, shape in mods:
            if tuple(shape[1:]) != tuple(inner):
                raise ValueError(f"{native}: pieces of different input shapes")
            pieces.append(Piece(name, start, shape[0], swap))
            start += shape[0]
        single = len(mods) == 1 and not swap
        for name, shape in mods:
            self.modules[name] = Module(name, native if single else "", tuple(shape))
            self.owner[name] = native
        self.natives[native] = Native(native, (start, *inner), tuple(pieces))


FAMILIES = {"flux": "Flux.1", "sd3": "SD3 / SD3.5 (MMDiT)", "qwen-image": "Qwen-Image", "wan": "Wan 2.1 / 2.2"}
DIFFUSERS_CLASSES = {"FluxTransformer2DModel": "flux", "SD3Transformer2DModel": "sd3",
                     "QwenImageTransformer2DModel": "qwen-image", "WanTransformer3DModel": "wan"}


def _get(cfg, key, default=None):
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _flux(cfg) -> DitInventory:
    h = int(_get(cfg, "num_attention_heads", 24)) * int(_get(cfg, "attention_head_dim", 128))
    inc = int(_get(cfg, "in_channels", 64))
    out = int(_get(cfg, "out_channels") or inc)
    p = int(_get(cfg, "patch_size", 1))
    mlp = int(h * 4.0)
    inv = DitInventory("flux")
    inv.add("time_in.in_layer", ("time_text_embed.timestep_embedder.linear_1", (h, 256)))
    inv.add("time_in.out_layer", ("time_text_embed.timestep_embedder.linear_2", (h, h)))
    if _get(cfg, "guidance_embeds", False):
        inv.add("guidance_in.in_layer", ("time_text_embed.guidance_embedder.linear_1", (h, 256)))
        inv.add("guidance_in.out_layer", ("time_text_embed.guidance_embedder.linear_2", (h, h)))
    pooled = int(_get(cfg, "pooled_projection_dim", 768))
    inv.add("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1", (h, pooled)))
    inv.add("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2", (h, h)))
    inv.add("txt_in", ("context_embedder", (h, int(_get(cfg, "joint_attention_dim", 4096)))))
    inv.add("img_in", ("x_embedder", (h, inc)))
    for i in range(int(_get(cfg, "num_layers", 19))):
        d, n = f"transformer_blocks.{i}", f"double_blocks.{i}"
        inv.add(f"{n}.img_mod.lin", (f"{d}.norm1.linear", (6 * h, h)))
        inv.add(f"{n}.txt_mod.lin", (f"{d}.norm1_context.linear", (6 * h, h)))
        inv.add(f"{n}.img_attn.qkv", *[(f"{d}.attn.to_{x}", (h, h)) for x in "qkv"])
        inv.add(f"{n}.txt_attn.qkv", *[(f"{d}.attn.add_{x}_proj", (h, h)) for x in "qkv"])
        inv.add(f"{n}.img_attn.proj", (f"{d}.attn.to_out.0", (h, h)))
        inv.add(f"{n}.txt_attn.proj", (f"{d}.attn.to_add_out", (h, h)))
        inv.add(f"{n}.img_mlp.0", (f"{d}.ff.net.0.proj", (mlp, h)))
        inv.add(f"{n}.img_mlp.2", (f"{d}.ff.net.2", (h, mlp)))
        inv.add(f"{n}.txt_mlp.0", (f"{d}.ff_context.net.0.proj", (mlp, h)))
        inv.add(f"{n}.txt_mlp.2", (f"{d}.ff_context.net.2", (h, mlp)))
    for i in range(int(_get(cfg, "num_single_layers", 38))):
        d, n = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        inv.add(f"{n}.linear1", *[(f"{d}.attn.to_{x}", (h, h)) for x in "qkv"], (f"{d}.proj_mlp", (mlp, h)))
        inv.add(f"{n}.linear2", (f"{d}.proj_out", (h, h + mlp)))
        inv.add(f"{n}.modulation.lin", (f"{d}.norm.linear", (3 * h, h)))
    inv.add("final_layer.adaLN_modulation.1", ("norm_out.linear", (2 * h, h)), swap=True)
    inv.add("final_layer.linear", ("proj_out", (p * p * out, h)))
    return inv


def _sd3(cfg) -> DitInventory:
    h = int(_get(cfg, "num_attention_heads", 18)) * int(_get(cfg, "attention_head_dim", 64))
    cap = int(_get(cfg, "caption_projection_dim", 1152))
    inc, p = int(_get(cfg, "in_channels", 16)), int(_get(cfg, "patch_size", 2))
    out = int(_get(cfg, "out_channels") or 16)
    layers = int(_get(cfg, "num_layers", 18))
    dual = set(_get(cfg, "dual_attention_layers", ()) or ())
    inv = DitInventory("sd3")
    inv.add("x_embedder.proj", ("pos_embed.proj", (h, inc, p, p)))
    inv.add("t_embedder.mlp.0", ("time_text_embed.timestep_embedder.linear_1", (h, 256)))
    inv.add("t_embedder.mlp.2", ("time_text_embed.timestep_embedder.linear_2", (h, h)))
    pooled = int(_get(cfg, "pooled_projection_dim", 2048))
    inv.add("y_embedder.mlp.0", ("time_text_embed.text_embedder.linear_1", (h, pooled)))
    inv.add("y_embedder.mlp.2", ("time_text_embed.text_embedder.linear_2", (h, h)))
    inv.add("context_embedder", ("context_embedder", (cap, int(_get(cfg, "joint_attention_dim", 4096)))))
    for i in range(layers):
        d, n = f"transformer_blocks.{i}", f"joint_blocks.{i}"
        last = i == layers - 1                      # context_pre_only: no context attention output / MLP
        inv.add(f"{n}.x_block.adaLN_modulation.1", (f"{d}.norm1.linear", ((9 if i in dual else 6) * h, h)))
        if last:
            inv.add(f"{n}.context_block.adaLN_modulation.1", (f"{d}.norm1_context.linear", (2 * h, h)), swap=True)
        else:
            inv.add(f"{n}.context_block.adaLN_modulation.1", (f"{d}.norm1_context.linear", (6 * h, h)))
        inv.add(f"{n}.x_block.attn.qkv", *[(f"{d}.attn.to_{x}", (h, h)) for x in "qkv"])
        inv.add(f"{n}.context_block.attn.qkv", *[(f"{d}.attn.add_{x}_proj", (h, h)) for x in "qkv"])
        inv.add(f"{n}.x_block.attn.proj", (f"{d}.attn.to_out.0", (h, h)))
        if not last:
            inv.add(f"{n}.context_block.attn.proj", (f"{d}.attn.to_add_out", (h, h)))
        if i in dual:
            inv.add(f"{n}.x_block.attn2.qkv", *[(f"{d}.attn2.to_{x}", (h, h)) for x in "qkv"])
            inv.add(f"{n}.x_block.attn2.proj", (f"{d}.attn2.to_out.0", (h, h)))
        inv.add(f"{n}.x_block.mlp.fc1", (f"{d}.ff.net.0.proj", (4 * h, h)))
        inv.add(f"{n}.x_block.mlp.fc2", (f"{d}.ff.net.2", (h, 4 * h)))
        if not last:
            inv.add(f"{n}.context_block.mlp.fc1", (f"{d}.ff_context.net.0.proj", (4 * h, h)))
            inv.add(f"{n}.context_block.mlp.fc2", (f"{d}.ff_context.net.2", (h, 4 * h)))
    inv.add("final_layer.adaLN_modulation.1", ("norm_out.linear", (2 * h, h)), swap=True)
    inv.add("final_layer.linear", ("proj_out", (p * p * out, h)))
    return inv


def _qwen(cfg) -> DitInventory:
    h = int(_get(cfg, "num_attention_heads", 24)) * int(_get(cfg, "attention_head_dim", 128))
    inc, p = int(_get(cfg, "in_channels", 64)), int(_get(cfg, "patch_size", 2))
    out = int(_get(cfg, "out_channels") or 16)
    inv = DitInventory("qwen-image")

    def same(name, shape):
        inv.add(name, (name, shape))

    same("time_text_embed.timestep_embedder.linear_1", (h, 256))
    same("time_text_embed.timestep_embedder.linear_2", (h, h))
    same("img_in", (h, inc))
    same("txt_in", (h, int(_get(cfg, "joint_attention_dim", 3584))))
    for i in range(int(_get(cfg, "num_layers", 60))):
        d = f"transformer_blocks.{i}"
        for s in ("img", "txt"):
            same(f"{d}.{s}_mod.1", (6 * h, h))
            same(f"{d}.{s}_mlp.net.0.proj", (4 * h, h))
            same(f"{d}.{s}_mlp.net.2", (h, 4 * h))
        for x in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out"):
            same(f"{d}.attn.{x}", (h, h))
    same("norm_out.linear", (2 * h, h))
    same("proj_out", (p * p * out, h))
    return inv


def _wan(cfg) -> DitInventory:
    dim = int(_get(cfg, "num_attention_heads", 40)) * int(_get(cfg, "attention_head_dim", 128))
    ffn, freq = int(_get(cfg, "ffn_dim", 13824)), int(_get(cfg, "freq_dim", 256))
    patch = tuple(_get(cfg, "patch_size", (1, 2, 2)))
    out = int(_get(cfg, "out_channels", 16))
    image_dim, added = _get(cfg, "image_dim"), _get(cfg, "added_kv_proj_dim")
    inv = DitInventory("wan")
    c = "condition_embedder"
    inv.add("time_embedding.0", (f"{c}.time_embedder.linear_1", (dim, freq)))
    inv.add("time_embedding.2", (f"{c}.time_embedder.linear_2", (dim, dim)))
    inv.add("time_projection.1", (f"{c}.time_proj", (6 * dim, dim)))
    inv.add("text_embedding.0", (f"{c}.text_embedder.linear_1", (dim, int(_get(cfg, "text_dim", 4096)))))
    inv.add("text_embedding.2", (f"{c}.text_embedder.linear_2", (dim, dim)))
    if image_dim is not None:
        image_dim = int(image_dim)
        inv.add("img_emb.proj.1", (f"{c}.image_embedder.ff.net.0.proj", (image_dim, image_dim)))
        inv.add("img_emb.proj.3", (f"{c}.image_embedder.ff.net.2", (dim, image_dim)))
    for i in range(int(_get(cfg, "num_layers", 40))):
        d, n = f"blocks.{i}", f"blocks.{i}"
        for a, na in (("attn1", "self_attn"), ("attn2", "cross_attn")):
            for x, nx in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "o")):
                inv.add(f"{n}.{na}.{nx}", (f"{d}.{a}.{x}", (dim, dim)))
        if added is not None:
            inv.add(f"{n}.cross_attn.k_img", (f"{d}.attn2.add_k_proj", (dim, int(added))))
            inv.add(f"{n}.cross_attn.v_img", (f"{d}.attn2.add_v_proj", (dim, int(added))))
        inv.add(f"{n}.ffn.0", (f"{d}.ffn.net.0.proj", (ffn, dim)))
        inv.add(f"{n}.ffn.2", (f"{d}.ffn.net.2", (dim, ffn)))
    prod = 1
    for x in patch:
        prod *= int(x)
    inv.add("head.head", ("proj_out", (out * prod, dim)))
    return inv


_BUILDERS = {"flux": _flux, "sd3": _sd3, "qwen-image": _qwen, "wan": _wan}


def build(family: str, config) -> DitInventory:
    """The inventory of a ``family`` transformer with a diffusers ``config`` (dict or config object)."""
    if family not in _BUILDERS:
        raise KeyError(f"unknown transformer family {family!r}; known: {sorted(_BUILDERS)}")
    return _BUILDERS[family](config)


@dataclass(frozen=True)
class DitArchitecture:
    name: str
    title: str
    family: str
    config: tuple   # sorted (key, value) pairs of the diffusers config fields that set shapes

    @property
    def config_dict(self) -> dict:
        return dict(self.config)


def _arch(name, title, family, **cfg) -> DitArchitecture:
    return DitArchitecture(name, title, family, tuple(sorted(cfg.items())))


# Released configurations (the diffusers config.json of each release; only the fields that set
# a Linear shape). Releases whose targetable Linear shapes are all equal share one entry (Flux dev
# and schnell differ by the guidance embedder; Wan 2.1 T2V-14B and the two Wan 2.2 A14B experts,
# T2V and I2V, differ only in the Conv3d patch embedding, which is not listed).
DIT_ARCHITECTURES: dict[str, DitArchitecture] = {a.name: a for a in (
    _arch("flux-dev", "Flux.1 [dev]", "flux", num_layers=19, num_single_layers=38, num_attention_heads=24,
          attention_head_dim=128, in_channels=64, patch_size=1, joint_attention_dim=4096, pooled_projection_dim=768,
          guidance_embeds=True),
    _arch("flux-schnell", "Flux.1 [schnell]", "flux", num_layers=19, num_single_layers=38, num_attention_heads=24,
          attention_head_dim=128, in_channels=64, patch_size=1, joint_attention_dim=4096, pooled_projection_dim=768,
          guidance_embeds=False),
    _arch("sd3-medium", "SD3 Medium", "sd3", num_layers=24, num_attention_heads=24, attention_head_dim=64,
          caption_projection_dim=1536, in_channels=16, out_channels=16, patch_size=2, joint_attention_dim=4096,
          pooled_projection_dim=2048, dual_attention_layers=()),
    _arch("sd3.5-medium", "SD3.5 Medium", "sd3", num_layers=24, num_attention_heads=24, attention_head_dim=64,
          caption_projection_dim=1536, in_channels=16, out_channels=16, patch_size=2, joint_attention_dim=4096,
          pooled_projection_dim=2048, dual_attention_layers=tuple(range(13))),
    _arch("sd3.5-large", "SD3.5 Large / Large Turbo", "sd3", num_layers=38, num_attention_heads=38,
          attention_head_dim=64, caption_projection_dim=2432, in_channels=16, out_channels=16, patch_size=2,
          joint_attention_dim=4096, pooled_projection_dim=2048, dual_attention_layers=()),
    _arch("qwen-image", "Qwen-Image", "qwen-image", num_layers=60, num_attention_heads=24, attention_head_dim=128,
          in_channels=64, out_channels=16, patch_size=2, joint_attention_dim=3584),
    _arch("wan2.1-1.3b", "Wan 2.1 T2V 1.3B", "wan", num_layers=30, num_attention_heads=12, attention_head_dim=128,
          ffn_dim=8960, text_dim=4096, freq_dim=256, out_channels=16, patch_size=(1, 2, 2)),
    _arch("wan-14b", "Wan 2.1 T2V 14B / Wan 2.2 A14B (T2V, I2V)", "wan", num_layers=40, num_attention_heads=40,
          attention_head_dim=128, ffn_dim=13824, text_dim=4096, freq_dim=256, out_channels=16, patch_size=(1, 2, 2)),
    _arch("wan2.1-i2v-14b", "Wan 2.1 I2V / FLF2V 14B", "wan", num_layers=40, num_attention_heads=40,
          attention_head_dim=128, ffn_dim=13824, text_dim=4096, freq_dim=256, out_channels=16, patch_size=(1, 2, 2),
          image_dim=1280, added_kv_proj_dim=5120),
    _arch("wan2.2-5b", "Wan 2.2 TI2V 5B", "wan", num_layers=30, num_attention_heads=24, attention_head_dim=128,
          ffn_dim=14336, text_dim=4096, freq_dim=256, out_channels=48, patch_size=(1, 2, 2)),
)}

_INV: dict[str, DitInventory] = {}


def arch_inventory(name: str) -> DitInventory:
    if name not in _INV:
        a = DIT_ARCHITECTURES[name]
        _INV[name] = build(a.family, a.config_dict)
    return _INV[name]


def shape_signature(inv: DitInventory) -> dict[str, tuple[int, ...]]:
    return {m.diffusers: m.shape for m in inv.modules.values()}


def match_config(family: str, config) -> str | None:
    """The named architecture whose every targetable module (name and shape) equals those of a
    ``family`` model with ``config`` (None: another size, e.g. a test model)."""
    sig = shape_signature(build(family, config))
    for name, a in DIT_ARCHITECTURES.items():
        if a.family == family and shape_signature(arch_inventory(name)) == sig:
            return name
    return None


def roots() -> set[str]:
    """First path segments of every known transformer module name, both namings."""
    out: set[str] = set()
    for name in DIT_ARCHITECTURES:
        inv = arch_inventory(name)
        out |= {k.split(".")[0] for k in inv.modules} | {k.split(".")[0] for k in inv.natives}
    return out


# ----------------------------------------------------------------------------- factor algebra


def split_factors(native: Native, up, down):
    """[(diffusers path, up_i, down)] of a LoRA on a stacked native module (same down, alpha, rank)."""
    out = []
    for pc in native.pieces:
        u = up[pc.start:pc.start + pc.rows]
        out.append((pc.diffusers, (_swap(u) if pc.swap else u).contiguous(), down))
    return out


def fuse_factors(native: Native, parts: dict):
    """(up, down, alpha) of one LoRA on ``native`` with the effect of ``parts``:
    ``{diffusers path: (up, down, scale)}`` (pieces absent from ``parts`` are left unchanged).

    One shared down tensor and scale: rows stacked, rank r, alpha = scale·r. Otherwise ranks
    concatenated, block-diagonal up, scale folded into the down rows, alpha = Σr (scale 1)."""
    import torch  # noqa: PLC0415

    present = [pc for pc in native.pieces if pc.diffusers in parts]
    if not present:
        raise ValueError(f"{native.name}: no part to fuse")
    first_up, first_down, first_scale = parts[present[0].diffusers]
    dtype = first_up.dtype
    shared = len(present) == len(native.pieces) and all(
        torch.equal(parts[pc.diffusers][1], first_down) and parts[pc.diffusers][2] == first_scale for pc in present)
    out_rows = native.shape[0]
    if shared:
        r = int(first_down.shape[0])
        up = torch.zeros(out_rows, r, dtype=dtype)
        for pc in present:
            u = parts[pc.diffusers][0].to(dtype)
            up[pc.start:pc.start + pc.rows] = _swap(u) if pc.swap else u
        return up, first_down.clone(), first_scale * r
    ranks = [int(parts[pc.diffusers][1].shape[0]) for pc in present]
    total = sum(ranks)
    up = torch.zeros(out_rows, total, dtype=torch.float32)
    downs, col = [], 0
    for pc, r in zip(present, ranks):
        u, d, s = parts[pc.diffusers]
        u = u.to(torch.float32)
        up[pc.start:pc.start + pc.rows, col:col + r] = _swap(u) if pc.swap else u
        downs.append(d.to(torch.float64).mul(s).to(torch.float32))
        col += r
    return up, torch.cat(downs, dim=0), float(total)


def _swap(u):
    import torch  # noqa: PLC0415

    half = u.shape[0] // 2
    return torch.cat([u[half:], u[:half]], dim=0)


# ----------------------------------------------------------------------------- naming by rule


def family_of_names(names) -> set[str]:
    """Families whose naming (either one) contains every one of ``names`` (module paths without
    prefixes, block indices replaced by ``N``), over the named architectures."""
    import re  # noqa: PLC0415

    pats = {re.sub(r"\.\d+(?=\.|$)", ".N", n) for n in names}
    fams = set()
    for fam in FAMILIES:
        known: set[str] = set()
        for name, a in DIT_ARCHITECTURES.items():
            if a.family == fam:
                inv = arch_inventory(name)
                known |= {re.sub(r"\.\d+(?=\.|$)", ".N", k) for k in (*inv.modules, *inv.natives)}
        if pats and pats <= known:
            fams.add(fam)
    return fams


_TEMPLATES: dict[str, DitInventory] = {}


def native_candidates(diffusers_name: str) -> list[str]:
    """Native names of a diffusers transformer module that is its own native weight (a rename),
    in every family where the name exists, from a one-block template of each family (any size:
    names do not depend on widths). Modules stored inside a stacked native weight have none."""
    import re  # noqa: PLC0415

    if not _TEMPLATES:
        full = {"flux": dict(num_layers=1, num_single_layers=1, guidance_embeds=True),
                "sd3": dict(num_layers=2, dual_attention_layers=(0,)),
                "qwen-image": dict(num_layers=1), "wan": dict(num_layers=1, image_dim=8, added_kv_proj_dim=8)}
        for fam, cfg in full.items():
            _TEMPLATES[fam] = build(fam, cfg)
    m = re.match(r"((?:single_)?transformer_blocks|blocks)\.(\d+)\.(.*)$", diffusers_name)
    out = []
    for fam, inv in _TEMPLATES.items():
        if m:
            probe = f"{m.group(1)}.0.{m.group(3)}"
            mod = inv.modules.get(probe)
            if mod is not None and mod.ldm:
                out.append(re.sub(r"^(\w+)\.0\.", lambda x: f"{x.group(1)}.{m.group(2)}.", mod.ldm, count=1))
        else:
            mod = inv.modules.get(diffusers_name)
            if mod is not None and mod.ldm:
                out.append(mod.ldm)
    return list(dict.fromkeys(out))
