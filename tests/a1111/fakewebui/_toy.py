"""A small deterministic text-to-image "model" for the stand-in (not an upstream module).

* Text encoder: each word of a prompt gets a fixed pseudo-random vector (SHA-256 seeded);
  77 token rows (BOS, words, EOS padding), ``D`` features; SDXL adds a pooled ``vector``.
* Denoiser ("UNet"): in k-diffusion terms x = x0 + σ·ε; the model's x0 estimate is
  ``target(text) + 0.1·tanh(c_in·x + b(text))``, a
  nonlinear, channel- and position-dependent function, so guidance masks are not trivial
  (the inpainting ``c_concat`` is ignored, as by non-inpainting checkpoints).
  ε = (x − x0)/σ. Timestep models see x_t = c_in·x with ᾱ(t) = 1/(1 + σ(t)²).
* VAE: the decoder turns a latent into a *picture registered for a prompt* when the latent
  points (cosine > 0.5, relative to the empty prompt's target) at that prompt's target, so a
  prompt like "astronaut" yields skimage's astronaut photograph: the real NudeNet filter can
  then flag (face-only policy) or pass (benign pictures) generated images. Other latents
  decode to a smooth colour field.

Everything is float64 so the guidance math can be compared exactly with a reference.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
from PIL import Image

DTYPE = torch.float64
TOKENS = 77
SIGMA_MIN, SIGMA_MAX = 0.03, 14.6


def _vec(word: str, dim: int, salt: str) -> torch.Tensor:
    seed = int.from_bytes(hashlib.sha256(f"{salt}:{word}".encode()).digest()[:8], "little")
    g = torch.Generator().manual_seed(seed)
    return torch.randn(dim, generator=g, dtype=DTYPE)


def sigma_of_t(t):
    t = torch.as_tensor(t, dtype=DTYPE)
    return torch.exp(math.log(SIGMA_MIN) + t / 999.0 * (math.log(SIGMA_MAX) - math.log(SIGMA_MIN)))


def t_of_sigma(sigma):
    s = torch.as_tensor(sigma, dtype=DTYPE)
    return (torch.log(s) - math.log(SIGMA_MIN)) / (math.log(SIGMA_MAX) - math.log(SIGMA_MIN)) * 999.0


class ToyUNet(torch.nn.Module):
    """The denoiser's only real parameters, in LDM names (``out.0``: a per-channel affine on the
    x0 estimate, identity by default so the toy's math is unchanged): what full safety weights
    replace (A1111 ``sd_model.model.diffusion_model``, Forge/reForge ``KModel.diffusion_model``)."""

    def __init__(self, channels: int = 4):
        super().__init__()
        self.out = torch.nn.ModuleList([torch.nn.GroupNorm(1, channels).to(DTYPE)])
        for prm in self.parameters():
            prm.requires_grad_(False)

    def affine(self, x0: torch.Tensor) -> torch.Tensor:
        n = self.out[0]
        return x0 * n.weight.reshape(1, -1, 1, 1) + n.bias.reshape(1, -1, 1, 1)


#: The toy's LoRA-targetable layers (SD1 shapes, LDM names; not an upstream module). The
#: webui's Lora loaders match a file's kohya keys against these names: A1111 against
#: ``network_layer_mapping`` (``diffusion_model_…``/``transformer_text_model_…``), Forge/reForge
#: against the patchers' parameter keys (``diffusion_model.….weight``, ``clip_l.transformer.….weight``).
LORA_UNET_LAYERS = {f"input_blocks.1.1.transformer_blocks.0.{a}.{m}": (320, 768 if a == "attn2" and m in ("to_k", "to_v")
                                                                        else 320)
                    for a in ("attn1", "attn2") for m in ("to_q", "to_k", "to_v", "to_out.0")}
LORA_TE_LAYERS = {f"transformer.text_model.encoder.layers.0.self_attn.{m}": (768, 768)
                  for m in ("q_proj", "k_proj", "v_proj", "out_proj")}


def _nested(names: dict) -> torch.nn.Module:
    """A module tree whose ``named_parameters()`` are ``<name>.weight`` (zeros; the toy's
    denoiser never computes with them: they are what the webui's LoRA loaders patch, so a
    merge can be seen in them)."""
    root = torch.nn.Module()
    for name, (out, inp) in names.items():
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        layer = torch.nn.utils.skip_init(torch.nn.Linear, inp, out, bias=False)
        layer.weight.requires_grad_(False).zero_()
        parent.add_module(leaf, layer)
    return root


class ToyLoraLayers:
    """``unet``: the UNet's attention projections of ``input_blocks.1.1``; ``te``: the text
    encoder's layer 0 (A1111's ``cond_stage_model.wrapped``)."""

    def __init__(self):
        self.unet = _nested(LORA_UNET_LAYERS)
        self.te = _nested(LORA_TE_LAYERS)


class ToyClipModel(torch.nn.Module):
    """Forge/reForge ``CLIP.cond_stage_model`` role (``clip_l.transformer.…``)."""

    def __init__(self, te: torch.nn.Module):
        super().__init__()
        self.clip_l = te


class ToyClip:
    """Forge ``backend.patcher.clip.CLIP`` / reForge ``ldm_patched.modules.sd.CLIP`` role: a
    ``patcher`` over ``cond_stage_model``, ``clone()`` and ``add_patches`` (delegated)."""

    def __init__(self, patcher, cond_stage_model):
        self.patcher, self.cond_stage_model = patcher, cond_stage_model

    def clone(self):
        return ToyClip(self.patcher.clone(), self.cond_stage_model)

    def add_patches(self, *args, **kwargs):
        return self.patcher.add_patches(*args, **kwargs)


class ToyMath:
    """The denoiser's math, shared by every host flavour."""

    def __init__(self, dim: int = 16, vector_dim: int | None = None):
        self.dim = dim
        self.vector_dim = vector_dim
        self._basis: dict[tuple, torch.Tensor] = {}
        self.unet = ToyUNet()

    # -- text ------------------------------------------------------------------
    def encode(self, prompts) -> torch.Tensor | dict:
        rows = []
        pooled = []
        for prompt in prompts:
            words = str(prompt).lower().replace(",", " ").split()[:TOKENS - 2]
            toks = [_vec("<bos>", self.dim, "tok")] + [_vec(w, self.dim, "tok") for w in words]
            toks += [_vec("<eos>", self.dim, "tok")] * (TOKENS - len(toks))
            rows.append(torch.stack(toks))
            if self.vector_dim:
                v = torch.zeros(self.vector_dim, dtype=DTYPE)
                for w in words:
                    v = v + _vec(w, self.vector_dim, "pool")
                pooled.append(v / max(1, len(words)))
        cross = torch.stack(rows)
        if self.vector_dim:
            return {"crossattn": cross, "vector": torch.stack(pooled)}
        return cross

    # -- denoiser --------------------------------------------------------------
    def basis(self, h: int, w: int) -> torch.Tensor:
        key = (h, w)
        if key not in self._basis:
            g = torch.Generator().manual_seed(1234 + 7 * h + w)
            self._basis[key] = torch.randn(self.dim + (self.vector_dim or 0), 4, h, w, generator=g, dtype=DTYPE)
        return self._basis[key]

    def target(self, ctx: torch.Tensor, y: torch.Tensor | None, h: int, w: int) -> torch.Tensor:
        pooled = ctx.to(DTYPE)[:, 1:9].sum(dim=1) / 2.0      # the first words dominate
        if self.vector_dim:
            pooled = torch.cat([pooled, y.to(DTYPE) if y is not None else torch.zeros(pooled.shape[0], self.vector_dim,
                                                                                 dtype=DTYPE)], dim=1)
        return torch.einsum("bd,dchw->bchw", pooled, self.basis(h, w)) / math.sqrt(pooled.shape[1])

    def x0(self, x, sigma, ctx, y=None, concat=None) -> torch.Tensor:
        """x0 estimate for k-diffusion input x (x = x0 + σ·ε), σ per row."""
        x = x.to(DTYPE)
        s = torch.as_tensor(sigma, dtype=DTYPE).reshape(-1, 1, 1, 1)
        c_in = 1.0 / torch.sqrt(s ** 2 + 1.0)
        ctx = ctx.to(DTYPE)
        b = ctx[:, 1:5, :4].mean(dim=1).reshape(-1, 4, 1, 1)
        # ``concat`` (the inpainting image condition) is ignored, as non-inpainting UNets do.
        return self.unet.affine(self.target(ctx, y, x.shape[2], x.shape[3]) + 0.1 * torch.tanh(c_in * x * 3.0 + b))

    def eps(self, x, sigma, ctx, y=None, concat=None) -> torch.Tensor:
        s = torch.as_tensor(sigma, dtype=DTYPE).reshape(-1, 1, 1, 1)
        return (x.to(DTYPE) - self.x0(x, sigma, ctx, y, concat)) / s


class _Chunk:
    def __init__(self, tokens, multipliers):
        self.tokens, self.multipliers, self.fixes = tokens, multipliers, []


class ToyTextEngine:
    """A text engine with the webui's interface (A1111's hijacked ``cond_stage_model`` and
    Forge's ``text_processing_engine``: ``tokenize_line``, ``encode_with_transformers``,
    ``id_start``/``id_end``/``id_pad``), so the steering layer runs through the stand-in.

    Token ids come from a vocabulary grown on the fly (0 is the mask token steering uses, 1
    BOS, 2 EOS/padding); rows are causal like CLIP's: a token's vector plus half the running
    mean of the vectors up to it, so removing a word moves the end-token rows."""

    chunk_length = 75
    id_start, id_end, id_pad = 1, 2, 2

    def __init__(self, dim: int):
        self.dim = dim
        self.words = ["<mask>", "<bos>", "<eos>"]
        self.ids = {w: i for i, w in enumerate(self.words)}
        self.tokenizer = self        # the report's convert_ids_to_tokens

    def convert_ids_to_tokens(self, token: int) -> str:
        return self.words[int(token)]

    def _id(self, word: str) -> int:
        if word not in self.ids:
            self.ids[word] = len(self.words)
            self.words.append(word)
        return self.ids[word]

    def tokenize_line(self, line: str):
        """The webui's ``tokenize_line`` (``sd_hijack_clip``) for a prompt of at most
        ``chunk_length`` tokens (one chunk; no emphasis, commas or embeddings): BOS in front,
        EOS padding behind."""
        ids = [self._id(word) for word in str(line).lower().replace(",", " ").split()]
        assert len(ids) <= self.chunk_length, "the toy text engine makes one chunk"
        tokens = [self.id_start] + ids + [self.id_end] * (self.chunk_length + 1 - len(ids))
        return [_Chunk(tokens, [1.0] * len(tokens))], len(ids)

    def encode_with_transformers(self, tokens: torch.Tensor) -> torch.Tensor:
        table = torch.stack([_vec(w, self.dim, "tok") for w in self.words])
        v = table[tokens.long().cpu()]
        steps = torch.arange(1, v.shape[1] + 1, dtype=DTYPE).reshape(1, -1, 1)
        return v + 0.5 * v.cumsum(dim=1) / steps

    def encode(self, prompts) -> torch.Tensor:
        """The conditioning the webui builds: the chunk's rows (no emphasis)."""
        tokens = torch.tensor([self.tokenize_line(prompt)[0][0].tokens for prompt in prompts])
        return self.encode_with_transformers(tokens)


class ToyVAE:
    """Latent ↔ pixels; decodes to registered pictures (see the module docstring)."""

    def __init__(self, math_: ToyMath, encode_text):
        self.math = math_
        self.encode_text = encode_text
        self.pictures: dict[str, np.ndarray] = {}

    def register(self, prompt: str, picture: np.ndarray) -> None:
        self.pictures[prompt] = np.asarray(picture)

    def _target(self, prompt: str, h: int, w: int) -> torch.Tensor:
        c = self.encode_text([prompt])
        if isinstance(c, dict):
            return self.math.target(c["crossattn"], c["vector"], h, w)[0]
        return self.math.target(c, None, h, w)[0]

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """[B, 4, h, w] → [B, 3, 8h, 8w] in [-1, 1]."""
        out = []
        for lat in latent.to(DTYPE):
            h, w = lat.shape[-2:]
            base = self._target("", h, w)
            best, best_cos = None, 0.5
            for prompt, pic in self.pictures.items():
                d = self._target(prompt, h, w) - base
                cos = float(torch.nn.functional.cosine_similarity((lat - base).flatten(), d.flatten(), dim=0))
                if cos > best_cos:
                    best, best_cos = pic, cos
            if best is not None:
                img = Image.fromarray(best).convert("RGB").resize((8 * w, 8 * h), Image.LANCZOS)
                arr = torch.from_numpy(np.asarray(img, dtype=np.float64) / 127.5 - 1.0).permute(2, 0, 1)
            else:
                arr = torch.tanh(0.3 * lat[:3]).repeat_interleave(8, dim=1).repeat_interleave(8, dim=2)
            out.append(arr)
        return torch.stack(out)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] → [B, 4, H/8, W/8]."""
        image = image.to(DTYPE)
        small = torch.nn.functional.avg_pool2d(image, 8)
        return torch.cat([small, small.mean(dim=1, keepdim=True)], dim=1)


def alphas_cumprod() -> torch.Tensor:
    return 1.0 / (sigma_of_t(torch.arange(1000, dtype=DTYPE)) ** 2 + 1.0)


class _Info:
    name_for_extra = "toy"
    title = "toy.safetensors [0123456789]"
    short_title = "toy"


class _Predictor:
    """Forge ``KModel.predictor`` (reForge ``model_sampling``): the σ table and, as Forge's
    ``AbstractPrediction``, the prediction type (``epsilon``: x = x0 + σ·ε)."""

    prediction_type = "epsilon"

    def __init__(self):
        self.sigmas = sigma_of_t(torch.arange(1000))


class ToyKModel:
    """Forge's ``KModel`` / reForge's ``BaseModel`` role: ``apply_model(x, σ, **conds)`` → x0."""

    def __init__(self, math_: ToyMath):
        self.math = math_
        self.predictor = _Predictor()
        self.diffusion_model = math_.unet      # the UNet's parameters (full safety weights)
        self.rows = 0          # UNet rows evaluated (cost checks)

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, y=None, control=None, transformer_options=None,
                    **kwargs):
        self.rows += x.shape[0]
        return self.math.x0(x, t, c_crossattn, y, c_concat)

    def named_parameters(self):
        """``diffusion_model.…`` keys, as the KModel's (what Forge's ``add_patches`` matches)."""
        yield from self.diffusion_model.named_parameters(prefix="diffusion_model")
        if getattr(self, "lora_layers", None) is not None:
            yield from self.lora_layers.unet.named_parameters(prefix="diffusion_model")

    def state_dict(self):
        """reForge's ``add_patches`` matches ``model.state_dict()`` keys."""
        return dict(self.named_parameters())


class ToySdModel:
    """``shared.sd_model``: A1111's LatentDiffusion role (plus ``forge_objects`` on Forge/reForge)."""

    def __init__(self, kind: str = "sd1"):
        # "sd1-text": SD1 whose text encoder is a ToyTextEngine (steering through the stand-in).
        self.engine = ToyTextEngine(16) if kind == "sd1-text" else None
        kind = "sd1" if kind == "sd1-text" else kind
        self.math = ToyMath(24, 12) if kind == "sdxl" else ToyMath(16)
        self.vae = ToyVAE(self.math, self._encode_plain)
        self.is_sdxl = kind == "sdxl"
        self.is_sd1 = kind == "sd1"
        self.is_sd2 = False
        self.is_sd3 = kind == "sd3"
        self.model = type("DiffusionWrapper", (), {})()
        self.model.diffusion_model = self.math.unet
        self.sd_checkpoint_info = _Info()
        self.sd_model_hash = "0123456789"
        self.alphas_cumprod = alphas_cumprod()
        self.encoded: list[list[str]] = []     # every get_learned_conditioning call
        self.rows = 0                           # UNet rows evaluated (A1111 path)
        self.kmodel = ToyKModel(self.math)
        self.lora_layers = ToyLoraLayers() if kind == "sd1" else None   # LoRA targets (SD1)
        self.kmodel.lora_layers = self.lora_layers

    def _encode_plain(self, prompts):
        if self.engine is not None:
            return self.engine.encode(list(prompts))
        return self.math.encode(list(prompts))

    def get_learned_conditioning(self, prompts):
        self.encoded.append(list(prompts))
        clip = getattr(getattr(self, "forge_objects", None), "clip", None)
        if hasattr(getattr(clip, "patcher", None), "refresh_loras"):
            # Forge's engines load the CLIP patcher first (its LoRAs are merged then)
            from backend import memory_management
            memory_management.load_model_gpu(clip.patcher)
        return self._encode_plain(prompts)

    def apply_model(self, x_noisy, t, cond):
        """A1111 LDM: ε for timestep t (float; σ(t) from the toy schedule)."""
        self.rows += x_noisy.shape[0]
        sigma = sigma_of_t(t).to(DTYPE)
        x_k = x_noisy.to(DTYPE) * torch.sqrt(sigma ** 2 + 1.0).reshape(-1, 1, 1, 1)
        if "crossattn" in cond:
            ctx, y = cond["crossattn"], cond["vector"]
        else:
            ctx, y = cond["c_crossattn"][0], None
        concat = cond.get("c_concat", [None])[0]
        return self.math.eps(x_k, sigma, ctx, y, concat)

    def decode_first_stage(self, x):
        return self.vae.decode(x)

    def encode_first_stage(self, x):
        return self.vae.encode(x)

    def get_first_stage_encoding(self, x):
        return x

    def attach_forge(self, variant: str) -> None:
        """Forge: ``backend`` UnetPatcher + ForgeObjects; reForge: ``modules_forge``/``ldm_patched``."""
        if variant == "forge":
            from backend.diffusion_engine.base import ForgeObjects
            from backend.patcher.unet import UnetPatcher
            unet = UnetPatcher(self.kmodel, load_device="cpu", offload_device="cpu")
            objects = ForgeObjects(unet, None, None, None)
        else:
            from modules_forge.forge_loader import ForgeSD
            from modules_forge.unet_patcher import UnetPatcher
            unet = UnetPatcher(self.kmodel, load_device="cpu", offload_device="cpu")
            objects = ForgeSD(unet, None, None, None)
        if self.engine is not None and variant == "forge":
            self.text_processing_engine = self.engine      # Forge: the engine hangs off the model
        if self.lora_layers is not None:
            # The text encoder's patcher (its LoRA patches are recorded there); the engine stays.
            if variant == "forge":
                from backend.patcher.base import ModelPatcher
            else:
                from ldm_patched.modules.model_patcher import ModelPatcher
            clip_model = ToyClipModel(self.lora_layers.te)
            objects.clip = ToyClip(ModelPatcher(clip_model, load_device="cpu", offload_device="cpu"), clip_model)
        self.current_lora_hash = str([])        # upstream forge_loader / sd_models
        self.forge_objects = objects
        self.forge_objects_original = objects.shallow_copy()
        self.forge_objects_after_applying_lora = objects.shallow_copy()


def make_sd_model(kind: str = "sd1") -> ToySdModel:
    from _variant import VARIANT
    if kind == "flux":
        assert VARIANT == "forge", "the toy Flux is Forge's (backend/diffusion_engine/flux.py)"
        return _flux_model()
    if kind == "sd35":
        assert VARIANT == "forge", "the toy SD3.5 is Forge's (backend/diffusion_engine/sd35.py)"
        return _sd35_model()
    m = ToySdModel(kind)
    if m.engine is not None and VARIANT != "forge":
        m.cond_stage_model = m.engine      # A1111 / reForge: the hijacked cond_stage_model
    if VARIANT in ("forge", "reforge"):
        m.attach_forge(VARIANT)
    return m


# --------------------------------------------------------------------------- Forge's Flux (kind "flux")
#
# ``backend.diffusion_engine.flux.Flux`` with toy parts: a T5 encoder and tokenizer under
# Forge's own ``T5TextProcessingEngine`` (the stand-in's ``backend/text_processing``), a CLIP-L
# engine for the pooled ``vector``, and a KModel whose ``diffusion_model`` has the LoRA-targetable
# Linear weights of Forge's ``backend/nn/flux.py`` ``IntegratedFluxTransformer2DModel`` under
# their BFL names (tiny sizes), with Forge's ``PredictionFlux`` prediction type ``const``.

T5_VOCAB = 4096
T5_DIM = 16            # context_in_dim of the toy Flux
FLUX_POOLED = 12       # vec_in_dim (the CLIP-L engine's pooled width)


class ToyT5Tokenizer:
    """``tokenizer_2`` role (a T5 tokenizer): lower-cased words, ids 0 ``<pad>``, 1 ``</s>``, 2
    ``<unk>``, other words a SHA-256 hash into the vocabulary."""

    def __init__(self):
        self.words = {0: "<pad>", 1: "</s>", 2: "<unk>"}

    def _id(self, word: str) -> int:
        i = 3 + int.from_bytes(hashlib.sha256(f"t5:{word}".encode()).digest()[:8], "little") % (T5_VOCAB - 3)
        self.words.setdefault(i, word)
        return i

    def __call__(self, texts, truncation=False, add_special_tokens=True):
        ids = [[self._id(w) for w in str(t).lower().replace(",", " ").split()] for t in texts]
        return {"input_ids": [x + [1] if add_special_tokens else x for x in ids]}

    def get_vocab(self):
        return {w: i for i, w in self.words.items()}

    def convert_ids_to_tokens(self, token):
        return self.words.get(int(token), f"#{int(token)}")


class ToyT5Encoder(torch.nn.Module):
    """``t5xxl.transformer`` role: ``shared`` (the token embedding Forge's engine moves to float32)
    and a bidirectional mix: every row sees the sum of all rows (the ``<pad>`` embedding is zero),
    ``z = e + tanh(M·Σe / 8)``, so leaving a token out moves every row, the ``</s>`` row too."""

    def __init__(self, dim: int = T5_DIM):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.shared = torch.nn.Embedding(T5_VOCAB, dim).to(DTYPE)
        with torch.no_grad():
            self.shared.weight.copy_(torch.randn(T5_VOCAB, dim, generator=g, dtype=DTYPE))
            self.shared.weight[0] = 0.0
        self.register_buffer("mix", torch.randn(dim, dim, generator=g, dtype=DTYPE) / math.sqrt(dim))
        for prm in self.parameters():
            prm.requires_grad_(False)

    def forward(self, input_ids):
        e = self.shared(input_ids)
        ctx = e.sum(dim=1, keepdim=True) / 8.0
        return e + torch.tanh(ctx @ self.mix.to(e.dtype))


class ToyT5Holder(torch.nn.Module):
    """``clip.cond_stage_model.t5xxl`` role (Forge's engine takes ``text_encoder.transformer``)."""

    def __init__(self):
        super().__init__()
        self.transformer = ToyT5Encoder()


class ToyClipPooledEngine(ToyTextEngine):
    """Forge's ``ClassicTextProcessingEngine`` with ``return_pooled=True`` (Flux's CLIP-L):
    ``engine(texts)`` → (rows, pooled = the first end token's row)."""

    def __call__(self, texts):
        rows = self.encode(list(texts))
        ends = [self.tokenize_line(t)[0][0].tokens.index(self.id_end) for t in texts]
        return rows, torch.stack([rows[i, e] for i, e in enumerate(ends)])


#: ``IntegratedFluxTransformer2DModel`` Linear weights, [out, in], of a tiny Flux (hidden 8,
#: mlp_ratio 4, one double and one single block, in_channels 4 → 16 packed, guidance_embed),
#: as Forge's backend/nn/flux.py builds them (MLPEmbedder in_layer/out_layer, SelfAttention
#: qkv/proj, Modulation lin, Sequential mlps .0/.2, SingleStreamBlock linear1/linear2,
#: LastLayer linear/adaLN_modulation.1).
_H, _MLP, _IN = 8, 32, 16
FLUX_LAYERS = {
    "img_in": (_H, _IN), "time_in.in_layer": (_H, 256), "time_in.out_layer": (_H, _H),
    "vector_in.in_layer": (_H, FLUX_POOLED), "vector_in.out_layer": (_H, _H),
    "guidance_in.in_layer": (_H, 256), "guidance_in.out_layer": (_H, _H), "txt_in": (_H, T5_DIM),
    **{f"double_blocks.0.{s}_{m}": shape for s in ("img", "txt") for m, shape in (
        ("mod.lin", (6 * _H, _H)), ("attn.qkv", (3 * _H, _H)), ("attn.proj", (_H, _H)), ("mlp.0", (_MLP, _H)),
        ("mlp.2", (_H, _MLP)))},
    "single_blocks.0.linear1": (3 * _H + _MLP, _H), "single_blocks.0.linear2": (_H, _H + _MLP),
    "single_blocks.0.modulation.lin": (3 * _H, _H),
    "final_layer.linear": (_IN, _H), "final_layer.adaLN_modulation.1": (2 * _H, _H),
}


class ToyFluxTransformer(torch.nn.Module):
    """``KModel.diffusion_model`` of Forge's Flux: the Linear weights above (deterministic random
    values, float32 as Forge stores them) and the attributes Forge's model sets."""

    def __init__(self):
        super().__init__()
        self.hidden_size, self.num_heads, self.guidance_embed = _H, 2, True
        self.in_channels = self.out_channels = _IN
        g = torch.Generator().manual_seed(11)
        for name, (out, inp) in FLUX_LAYERS.items():
            parent = self
            *path, leaf = name.split(".")
            for part in path:
                if not hasattr(parent, part):
                    parent.add_module(part, torch.nn.Module())
                parent = getattr(parent, part)
            layer = torch.nn.Linear(inp, out)
            with torch.no_grad():
                layer.weight.copy_(torch.randn(out, inp, generator=g))
            parent.add_module(leaf, layer)
        for prm in self.parameters():
            prm.requires_grad_(False)


class _FluxPredictor(_Predictor):
    """Forge's ``PredictionFlux`` (``AbstractPrediction`` ``prediction_type='const'``)."""

    prediction_type = "const"


class ToyFluxKModel(ToyKModel):
    """Forge's ``KModel`` over the Flux transformer; ``config`` is huggingface_guess's estimated
    config (Forge's LoRA key maps test ``'flux' in config.huggingface_repo.lower()``)."""

    def __init__(self, math_: ToyMath):
        super().__init__(math_)
        self.predictor = _FluxPredictor()
        self.diffusion_model = ToyFluxTransformer()
        from types import SimpleNamespace
        self.config = SimpleNamespace(huggingface_repo="black-forest-labs/FLUX.1-dev",
                                      unet_config=dict(image_model="flux", in_channels=4, vec_in_dim=FLUX_POOLED,
                                                       context_in_dim=T5_DIM, hidden_size=_H, mlp_ratio=4.0,
                                                       num_heads=2, depth=1, depth_single_blocks=1,
                                                       guidance_embed=True))


class ToyFluxClipModel(torch.nn.Module):
    """Forge ``CLIP.cond_stage_model`` of Flux: ``clip_l`` (toy layers) and ``t5xxl``."""

    def __init__(self):
        super().__init__()
        self.clip_l = _nested(LORA_TE_LAYERS)
        self.t5xxl = ToyT5Holder()


def _flux_model():
    """``shared.sd_model`` of Forge's Flux: ``backend.diffusion_engine.flux.Flux`` (its
    ``get_learned_conditioning``) with the toy's parts, built as Forge's ``Flux.__init__`` does."""
    from backend.diffusion_engine.base import ForgeObjects
    from backend.diffusion_engine.flux import Flux
    from backend.patcher.base import ModelPatcher
    from backend.patcher.unet import UnetPatcher
    from backend.text_processing.t5_engine import T5TextProcessingEngine

    class ToyFluxModel(Flux, ToySdModel):
        def __init__(self):
            ToySdModel.__init__(self, "flux")
            self.math = ToyMath(T5_DIM, FLUX_POOLED)
            self.vae = ToyVAE(self.math, self._encode_plain)
            self.is_sd1 = self.is_sd2 = self.is_sdxl = self.is_sd3 = False
            self.lora_layers = None
            self.kmodel = ToyFluxKModel(self.math)
            self.model.diffusion_model = self.kmodel.diffusion_model
            self.use_distilled_cfg_scale = True
            clip_model = ToyFluxClipModel()
            clip = ToyClip(ModelPatcher(clip_model, load_device="cpu", offload_device="cpu"), clip_model)
            self.text_processing_engine_l = ToyClipPooledEngine(FLUX_POOLED)
            self.text_processing_engine_t5 = T5TextProcessingEngine(
                text_encoder=clip.cond_stage_model.t5xxl, tokenizer=ToyT5Tokenizer(), emphasis_name="Original")
            unet = UnetPatcher(self.kmodel, load_device="cpu", offload_device="cpu")
            self.current_lora_hash = str([])
            self.forge_objects = ForgeObjects(unet, clip, None, None)
            self.forge_objects_original = self.forge_objects.shallow_copy()
            self.forge_objects_after_applying_lora = self.forge_objects.shallow_copy()

        def _encode_plain(self, prompts):
            return Flux.get_learned_conditioning(self, list(prompts))

        def get_learned_conditioning(self, prompts):
            self.encoded.append(list(prompts))
            return Flux.get_learned_conditioning(self, prompts)

    return ToyFluxModel()


# --------------------------------------------------------------------------- Forge's SD3.5 (kind "sd35")
#
# ``backend.diffusion_engine.sd35.StableDiffusion3`` with toy parts: CLIP-L and CLIP-G engines
# (the webui engine interface, ``(rows, pooled)``; different widths and token vectors), Forge's
# own ``T5TextProcessingEngine`` over the toy T5, and a KModel whose ``diffusion_model`` has the
# weights of Forge's ``backend/nn/mmditx.py`` ``MMDiTX`` under their SAI names (tiny sizes), with
# the ``const`` prediction type.

SD35_L, SD35_G = 6, 8          # CLIP-L / CLIP-G widths: L‖G = 14, zero-padded to the T5 width 16


class ToyClipGEngine(ToyClipPooledEngine):
    """CLIP-G role: the toy CLIP engine with its own token vectors (another salt)."""

    def encode_with_transformers(self, tokens: torch.Tensor) -> torch.Tensor:
        table = torch.stack([_vec(w, self.dim, "tok-g") for w in self.words])
        v = table[tokens.long().cpu()]
        steps = torch.arange(1, v.shape[1] + 1, dtype=DTYPE).reshape(1, -1, 1)
        return v + 0.5 * v.cumsum(dim=1) / steps


def mmditx_shapes(h: int, layers: int, dual=(), inc: int = 4, patch: int = 2, out: int = 4, context: int = T5_DIM,
                  pooled: int = SD35_L + SD35_G) -> dict:
    """Weight shapes of Forge's ``MMDiTX`` (backend/nn/mmditx.py), written from its module
    definitions: PatchEmbed ``x_embedder.proj`` (Conv2d), TimestepEmbedder / VectorEmbedder
    ``mlp.0``/``mlp.2``, ``context_embedder`` (Linear), per ``JointBlock`` a ``context_block`` and
    an ``x_block`` (DismantledBlock: ``adaLN_modulation.1`` with 9 (x_block_self_attn), 6 or 2
    (pre_only, the last block's context) mods, ``attn.qkv``/``attn.proj`` (no proj when pre_only),
    ``attn2`` when x_block_self_attn, ``mlp.fc1``/``mlp.fc2`` unless pre_only), FinalLayer
    ``linear`` and ``adaLN_modulation.1``."""
    s = {"x_embedder.proj": (h, inc, patch, patch), "t_embedder.mlp.0": (h, 256), "t_embedder.mlp.2": (h, h),
         "y_embedder.mlp.0": (h, pooled), "y_embedder.mlp.2": (h, h), "context_embedder": (h, context),
         "final_layer.linear": (patch * patch * out, h), "final_layer.adaLN_modulation.1": (2 * h, h)}
    for i in range(layers):
        for part in ("x_block", "context_block"):
            pre_only = part == "context_block" and i == layers - 1
            self_attn = part == "x_block" and i in dual
            b = f"joint_blocks.{i}.{part}"
            s[f"{b}.adaLN_modulation.1"] = ((9 if self_attn else 2 if pre_only else 6) * h, h)
            s[f"{b}.attn.qkv"] = (3 * h, h)
            if not pre_only:
                s[f"{b}.attn.proj"] = (h, h)
                s[f"{b}.mlp.fc1"], s[f"{b}.mlp.fc2"] = (4 * h, h), (h, 4 * h)
            if self_attn:
                s[f"{b}.attn2.qkv"], s[f"{b}.attn2.proj"] = (3 * h, h), (h, h)
    return s


#: The toy MMDiT: hidden 8, two joint blocks, block 0 with SD3.5 Medium's second x attention.
SD35_LAYERS = mmditx_shapes(8, 2, dual=(0,))


class ToyMMDiT(torch.nn.Module):
    """``KModel.diffusion_model`` of Forge's SD3.5: the weights above (deterministic random
    values, float32) as parameters under their SAI names (the toy's denoiser does not use them)."""

    def __init__(self, shapes: dict = SD35_LAYERS):
        super().__init__()
        g = torch.Generator().manual_seed(13)
        for name, shape in shapes.items():
            parent = self
            *path, leaf = name.split(".")
            for part in path:
                if not hasattr(parent, part):
                    parent.add_module(part, torch.nn.Module())
                parent = getattr(parent, part)
            layer = torch.nn.Module()
            layer.weight = torch.nn.Parameter(torch.randn(*shape, generator=g), requires_grad=False)
            layer.bias = torch.nn.Parameter(torch.zeros(shape[0]), requires_grad=False)
            parent.add_module(leaf, layer)


class ToySD3KModel(ToyKModel):
    """Forge's ``KModel`` over the MMDiT; ``config.huggingface_repo`` is huggingface_guess's for
    every SD3 checkpoint (``model_list.SD3``)."""

    def __init__(self, math_: ToyMath):
        super().__init__(math_)
        self.predictor = _FluxPredictor()          # PredictionDiscreteFlow: prediction type 'const'
        self.diffusion_model = ToyMMDiT()
        from types import SimpleNamespace
        self.config = SimpleNamespace(huggingface_repo="stabilityai/stable-diffusion-3-medium-diffusers",
                                      unet_config=dict(in_channels=4, pos_embed_scaling_factor=None))


class ToySD35ClipModel(torch.nn.Module):
    """Forge ``CLIP.cond_stage_model`` of SD3.5: ``clip_l``, ``clip_g`` (toy layers) and ``t5xxl``."""

    def __init__(self):
        super().__init__()
        self.clip_l = _nested(LORA_TE_LAYERS)
        self.clip_g = _nested(LORA_TE_LAYERS)
        self.t5xxl = ToyT5Holder()


def _sd35_model():
    """``shared.sd_model`` of Forge's SD3.5: ``backend.diffusion_engine.sd35.StableDiffusion3``
    (its ``get_learned_conditioning``) with the toy's parts, built as Forge's ``__init__`` does."""
    from backend.diffusion_engine.base import ForgeObjects
    from backend.diffusion_engine.sd35 import StableDiffusion3
    from backend.patcher.base import ModelPatcher
    from backend.patcher.unet import UnetPatcher
    from backend.text_processing.t5_engine import T5TextProcessingEngine

    class ToySD35Model(StableDiffusion3, ToySdModel):
        def __init__(self):
            ToySdModel.__init__(self, "sd35")
            self.math = ToyMath(T5_DIM, SD35_L + SD35_G)
            self.vae = ToyVAE(self.math, self._encode_plain)
            self.is_sd1 = self.is_sd2 = self.is_sdxl = False
            self.is_sd3 = True
            self.lora_layers = None
            self.kmodel = ToySD3KModel(self.math)
            self.model.diffusion_model = self.kmodel.diffusion_model
            clip_model = ToySD35ClipModel()
            clip = ToyClip(ModelPatcher(clip_model, load_device="cpu", offload_device="cpu"), clip_model)
            self.text_processing_engine_l = ToyClipPooledEngine(SD35_L)
            self.text_processing_engine_g = ToyClipGEngine(SD35_G)
            self.text_processing_engine_t5 = T5TextProcessingEngine(
                text_encoder=clip.cond_stage_model.t5xxl, tokenizer=ToyT5Tokenizer(), emphasis_name="Original")
            unet = UnetPatcher(self.kmodel, load_device="cpu", offload_device="cpu")
            self.current_lora_hash = str([])
            self.forge_objects = ForgeObjects(unet, clip, None, None)
            self.forge_objects_original = self.forge_objects.shallow_copy()
            self.forge_objects_after_applying_lora = self.forge_objects.shallow_copy()

        def _encode_plain(self, prompts):
            return StableDiffusion3.get_learned_conditioning(self, list(prompts))

        def get_learned_conditioning(self, prompts):
            self.encoded.append(list(prompts))
            return StableDiffusion3.get_learned_conditioning(self, prompts)

    return ToySD35Model()
