"""Test-only ComfyUI nodes and builders: tiny random SD3, Flux.1, Qwen-Image and Wan 2.1 (T2V)
models and text encoders made of ComfyUI's OWN classes. Never part of the SafeT2I pack.

conftest.py copies every ``comfy_pack_*.py`` into the test server's custom_nodes, so this file
must stay self-contained (its text is copied; it imports nothing from this repository).
``make_tiny_families.py`` imports it to write the checkpoint files with the same builders.

Why two routes to a MODEL
-------------------------
``UNETLoader`` sizes a model only from what ``comfy/model_detection.py`` reads from the file; some
widths are fixed there or by the model class defaults, and the text widths then follow:

=========== ================================================== ==========================================
family      forced by detection / ComfyUI                        consequence
=========== ================================================== ==========================================
SD3         hidden = 64 * depth, heads = depth (mmdit.py);       tiny file: depth 2 -> hidden 128
            context width 4096: SD3ClipModel zero-pads L|G to    (context_embedder 4096 -> 128, 0.5M);
            4096 and joins T5 rows on the sequence axis          T5 must be 4096 wide (its vocabulary is
                                                                  the shipped T5 tokenizer's 32128 -> 131M)
Flux        hidden_size 3072, num_heads 24, context_in_dim 4096  1 double block needed for detection:
            (fixed in detect_unet_config)                        400M params -> too big for tests; the
                                                                  tiny Flux is built by a node (route B)
Qwen-Image  only in_channels and num_layers are read; inner     a 0-block file (40M) is detected, but
            3072 and joint_attention_dim 3584 are class         text width 3584 x vocab 152064 = 545M:
            defaults                                             tiny Qwen-Image built by a node (route B)
Wan 2.1     dim read from head.modulation, heads = dim // 128,   tiny file: dim 128 (1 head), 1 block;
            text_dim 4096 (class default, not detected)          umT5 4096 wide with a tiny SentencePiece
                                                                  vocabulary (umT5's tokenizer ships inside
                                                                  the text-encoder file): ~5M params
=========== ================================================== ==========================================

Route A (files, stock ``UNETLoader`` / ``CheckpointLoaderSimple``): SD3, SD3.5 and Wan 2.1, plus
detection-only files for Qwen-Image (0 blocks) and, on request, Flux (1 double block, 400M).
Route B (node ``SafeT2ITestTinyModel``): ComfyUI's own ``model_detection.model_config_from_unet_config``
picks the supported_models class (Flux / FluxSchnell / QwenImage / SD3 / WAN21_T2V) from a unet
config with small widths, and its ``get_model`` builds the real model_base/ldm module; only the
width detection is skipped.

Text encoders: ``CLIPLoader`` / ``DualCLIPLoader`` / ``TripleCLIPLoader`` build T5-XXL, umT5-XXL,
CLIP-G and Qwen2.5-VL-7B from fixed JSON / dataclass configs (comfy/text_encoders/*.json,
llama.py), so a tiny file cannot load through them. ``SafeT2ITestTinyCLIP`` builds ComfyUI's own
CLIP object (``comfy.sd.CLIP(target=<supported_models class>.clip_target())``) with tiny configs
through ComfyUI's ``model_options["<model_name>_model_config"]`` override and the real tokenizers
shipped in ComfyUI (CLIP BPE, T5 SentencePiece JSON, Qwen2.5 BPE); umT5's tokenizer is not in the
repository (it lives in the umT5 file as ``spiece_model``), so a tiny SentencePiece model is
trained here from a fixed corpus and handed over as ``tokenizer_data`` like the file would.

All weights come from ``init_`` with a fixed seed (ComfyUI's ops skip weight init).
"""

from __future__ import annotations

import json

FAMILIES_CLIP = ["sd3", "flux", "qwen_image", "wan"]
FAMILIES_MODEL = ["sd3", "sd35", "flux_dev", "flux_schnell", "qwen_image", "wan21_t2v"]

# -- text encoders: per ComfyUI model_name; widths differ so that a wrong split cannot pass.
CLIP_L = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 2,
    "num_hidden_layers": 3,
    "projection_dim": 32,
}  # 3 layers: SD3 takes layer_idx -2 (needs abs(-2) < num_layers)
CLIP_G = {
    "hidden_size": 48,
    "intermediate_size": 96,
    "num_attention_heads": 4,
    "num_hidden_layers": 3,
    "projection_dim": 48,
}
T5_4096 = {"d_model": 4096, "d_ff": 64, "d_kv": 32, "num_heads": 2, "num_layers": 2}  # SD3: forced 4096
T5_40 = {"d_model": 40, "d_ff": 80, "d_kv": 8, "num_heads": 2, "num_layers": 2}  # Flux (route B)
UMT5_4096 = {"d_model": 4096, "d_ff": 64, "d_kv": 32, "num_heads": 2, "num_layers": 2}  # Wan: text_dim 4096
QWEN25 = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
}  # head_dim 128 and rope_dims are class constants in llama.py
UMT5_VOCAB = 256  # embedding rows; the SentencePiece model trained below has 84 pieces

CLIP_OPTIONS = {
    "sd3": {"clip_l_model_config": CLIP_L, "clip_g_model_config": CLIP_G, "t5xxl_model_config": T5_4096},
    "flux": {"clip_l_model_config": CLIP_L, "t5xxl_model_config": T5_40},
    "qwen_image": {"qwen25_7b_model_config": QWEN25},
    "wan": {"umt5xxl_model_config": {**UMT5_4096, "vocab_size": UMT5_VOCAB}},
}
# Output widths (cond rows, pooled) each CLIP gives, i.e. what the denoiser must accept.
CLIP_WIDTHS = {"sd3": (4096, 32 + 48), "flux": (40, 32), "qwen_image": (64, None), "wan": (4096, None)}

# -- denoisers: exactly what comfy.model_detection.detect_unet_config returns for the files
UNET_CONFIGS = {
    # route A file: hidden 64 * depth = 128, 2 heads of 64, 2 joint blocks; pooled 80 = L 32 + G 48
    "sd3": {
        "in_channels": 16,
        "patch_size": 2,
        "out_channels": 16,
        "depth": 2,
        "input_size": None,
        "adm_in_channels": 80,
        "context_embedder_config": {
            "target": "torch.nn.Linear",
            "params": {"in_features": 4096, "out_features": 128},
        },
        "num_patches": 256,
        "pos_embed_max_size": 16,
        "pos_embed_scaling_factor": None,
        "x_block_self_attn_layers": [],
    },
    # route A file: dim 128 -> 1 head (dim // 128), one block, text_dim 4096 (class default)
    "wan21_t2v": {
        "image_model": "wan2.1",
        "dim": 128,
        "out_dim": 16,
        "num_heads": 1,
        "ffn_dim": 256,
        "num_layers": 1,
        "patch_size": (1, 2, 2),
        "freq_dim": 256,
        "window_size": (-1, -1),
        "qk_norm": True,
        "cross_attn_norm": True,
        "eps": 1e-6,
        "in_dim": 16,
        "model_type": "t2v",
    },
    # route B: small widths (detection would force hidden 3072 / context 4096); 2 heads of 32,
    # RoPE axes 8+12+12 = 32, context 40 = tiny T5, vec 32 = CLIP-L pooled
    "flux_dev": {
        "image_model": "flux",
        "in_channels": 16,
        "patch_size": 2,
        "out_channels": 16,
        "vec_in_dim": 32,
        "context_in_dim": 40,
        "hidden_size": 64,
        "mlp_ratio": 4.0,
        "num_heads": 2,
        "depth": 1,
        "depth_single_blocks": 1,
        "axes_dim": [8, 12, 12],
        "theta": 10000,
        "qkv_bias": True,
        "guidance_embed": True,
    },
    # route B: inner 2 x 32, joint_attention_dim 64 = tiny Qwen2.5 width, in 64 = 16 ch x 2x2 patch
    "qwen_image": {
        "image_model": "qwen_image",
        "in_channels": 64,
        "num_layers": 2,
        "out_channels": 16,
        "attention_head_dim": 32,
        "num_attention_heads": 2,
        "joint_attention_dim": 64,
        "axes_dims_rope": (8, 12, 12),
    },
}
UNET_CONFIGS["flux_schnell"] = {**UNET_CONFIGS["flux_dev"], "guidance_embed": False}
# route A file, SD3.5 layout: RMS q/k norm (ln_q keys) and block 0's extra image self-attention
# (x_block.attn2, as in 3.5 medium); ComfyUI detects it as the same SD3 class
UNET_CONFIGS["sd35"] = {**UNET_CONFIGS["sd3"], "qk_norm": "rms", "x_block_self_attn_layers": [0]}
# Detection-only files (stock widths; see the module docstring)
DETECT_CONFIGS = {
    "qwen_image": {"image_model": "qwen_image", "in_channels": 64, "num_layers": 0},
    "flux_dev": {
        "image_model": "flux",
        "in_channels": 16,
        "patch_size": 2,
        "out_channels": 16,
        "vec_in_dim": 32,
        "context_in_dim": 4096,
        "hidden_size": 3072,
        "mlp_ratio": 4.0,
        "num_heads": 24,
        "depth": 1,
        "depth_single_blocks": 0,
        "axes_dim": [16, 56, 56],
        "theta": 10000,
        "qkv_bias": True,
        "guidance_embed": True,
    },
}
EXPECTED_CLASS = {
    "sd3": "SD3",
    "sd35": "SD3",
    "flux_dev": "Flux",
    "flux_schnell": "FluxSchnell",
    "qwen_image": "QwenImage",
    "wan21_t2v": "WAN21_T2V",
}
MODEL_CLIP = {
    "sd3": "sd3",
    "sd35": "sd3",
    "flux_dev": "flux",
    "flux_schnell": "flux",
    "qwen_image": "qwen_image",
    "wan21_t2v": "wan",
}

# A fixed corpus for the tiny umT5 SentencePiece model (unigram, pad 0 / eos 1 / unk 2 like umT5)
_WORDS = (  # noqa: SIM905
    "a photo of the cat dog woman man person nude naked beach city street sunny night portrait painting "
    "drawing museum figure standing sitting walking on in at with and red blue green bright dark light "
    "soft high quality detailed blurry erotic art video scene camera moving slowly river forest mountain "
    "sky clouds water people crowd dancing running"
).split()


def init_(module, seed: int) -> None:
    """Fixed-seed init of every parameter (ComfyUI's ops leave weights uninitialised).

    Matrices and embeddings ~ N(0, 1/fan_in), convolutions ~ N(0, 2/fan_in) (He: TAESD and the VAE
    are ReLU/SiLU nets; smaller gave flat images); 1-d ``weight``/``scale``/``gamma`` = 1 (norms);
    other 1-d/0-d parameters = 0 (biases). Names are visited sorted, so the result depends only
    on the seed and the parameter shapes. Buffers are not touched (see ``build_model``).
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if p.ndim >= 2:
                fan_in = p[0].numel()
                gain = 2.0 if p.ndim >= 3 and name.endswith("weight") else 1.0
                p.copy_(torch.randn(p.shape, generator=g) * (gain / fan_in) ** 0.5)
            elif name.endswith(("weight", "scale", "gamma")):
                p.fill_(1.0)
            else:
                p.zero_()


def umt5_spiece_model() -> bytes:
    """A tiny SentencePiece unigram model, umT5 special ids (pad 0, eos 1, unk 2), deterministic.

    Trained from a fixed word list with at most ``UMT5_VOCAB`` pieces (84 with this corpus: every
    listed word is one piece, e.g. "▁nude"; other text falls back to characters or <unk>).
    """
    import io
    import random

    import sentencepiece as spm

    rnd = random.Random(0)
    corpus = [" ".join(rnd.choice(_WORDS) for _ in range(rnd.randint(3, 12))) for _ in range(400)]
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=out,
        vocab_size=UMT5_VOCAB,
        model_type="unigram",
        character_coverage=1.0,
        num_threads=1,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return out.getvalue()


def build_clip(family: str, seed: int = 0):
    """ComfyUI's CLIP for ``family`` ("sd3", "flux", "qwen_image", "wan") with tiny configs, fp32.

    sd3: SD3ClipModel with clip_l 32 + clip_g 48 + t5xxl 4096 wide (cond [1, 77+T5 rows, 4096],
    pooled 80); flux: FluxClipModel clip_l 32 (pooled) + t5xxl 40 (cond [1, 256, 40]);
    qwen_image: QwenImageTEModel, Qwen2.5-VL hidden 64 (cond [1, n, 64], template dropped by
    ComfyUI); wan: WanT5Model umT5 4096 wide, tiny SentencePiece (cond [1, 512, 4096]).
    """
    import comfy.sd
    import comfy.supported_models as sm
    import torch

    target = {
        "sd3": lambda: sm.SD3({}).clip_target(
            {
                "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": None,
                "text_encoders.clip_g.transformer.text_model.final_layer_norm.weight": None,
                "text_encoders.t5xxl.transformer.encoder.final_layer_norm.weight": torch.zeros(1),
            }
        ),
        "flux": lambda: sm.Flux({}).clip_target(),
        "qwen_image": lambda: sm.QwenImage({}).clip_target(),
        "wan": lambda: sm.WAN21_T2V({}).clip_target(),
    }[family]()
    opts = {"dtype": torch.float32}
    for k, v in CLIP_OPTIONS[family].items():
        opts[k] = dict(v)
    tokenizer_data = (
        {"spiece_model": torch.frombuffer(bytearray(umt5_spiece_model()), dtype=torch.uint8)}
        if family == "wan"
        else {}
    )
    clip = comfy.sd.CLIP(target=target, model_options=opts, tokenizer_data=tokenizer_data)
    if family == "qwen_image":
        # llama.py builds Qwen2.5-VL's vision tower at fixed sizes (1280 wide, 32 blocks: 630M
        # parameters, unused for text prompts); swap in the same class at 32 wide x 1 block.
        from comfy.text_encoders.qwen_vl import Qwen2VLVisionTransformer

        te = clip.cond_stage_model.qwen25_7b.transformer
        te.visual = Qwen2VLVisionTransformer(
            hidden_size=32,
            output_hidden_size=QWEN25["hidden_size"],
            intermediate_size=64,
            num_heads=2,
            num_layers=1,
            dtype=torch.float32,
            ops=clip.cond_stage_model.qwen25_7b.operations,
        )
        clip.patcher.size = 0  # recomputed on next use
    init_(clip.cond_stage_model, seed)
    with torch.no_grad():  # small token embeddings, like trained encoders
        for name, p in clip.cond_stage_model.named_parameters():
            if name.endswith(("token_embedding.weight", "shared.weight", "embed_tokens.weight")):
                p.mul_(0.5)
    return clip


def unet_state_dict(name: str, seed: int = 0, config: dict | None = None) -> dict:
    """State dict (no prefix) of ComfyUI's own diffusion model for ``UNET_CONFIGS[name]``."""
    return build_model(name, seed, config=config).model.diffusion_model.state_dict()


def build_model(name: str, seed: int = 0, config: dict | None = None):
    """A ModelPatcher (what UNETLoader returns) for ``name`` in ``FAMILIES_MODEL``, fp32.

    The supported_models class is chosen by ComfyUI's ``model_config_from_unet_config`` (the
    matching step of UNETLoader) and asserted to be ``EXPECTED_CLASS[name]``.
    """
    import comfy.model_detection
    import comfy.model_management as mm
    import comfy.model_patcher
    import torch

    cfg = json.loads(json.dumps(config or UNET_CONFIGS[name]))
    for k in ("patch_size", "window_size", "axes_dims_rope"):  # tuples, as detection gives them
        if isinstance(cfg.get(k), list) and cfg.get("image_model") != "flux":
            cfg[k] = tuple(cfg[k])
    mc = comfy.model_detection.model_config_from_unet_config(cfg)
    assert mc is not None and type(mc).__name__ == EXPECTED_CLASS[name], (name, type(mc).__name__)
    mc.set_inference_dtype(torch.float32, None)
    model = mc.get_model({}, "")
    init_(model.diffusion_model, seed)
    pos = getattr(model.diffusion_model, "pos_embed", None)
    if isinstance(pos, torch.Tensor):  # MMDiT: a torch.empty buffer, the fixed 2-d sin-cos table in SD3
        from comfy.ldm.modules.diffusionmodules.mmdit import get_2d_sincos_pos_embed

        side = round(pos.shape[1] ** 0.5)
        pos.copy_(torch.from_numpy(get_2d_sincos_pos_embed(pos.shape[2], side)).reshape(pos.shape))
    bad = [
        k
        for k, v in model.diffusion_model.state_dict().items()
        if v.is_floating_point() and not v.isfinite().all()
    ]
    assert not bad, f"uninitialised tensors: {bad}"
    return comfy.model_patcher.ModelPatcher(
        model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()
    )


def taesd16_state_dict(seed: int = 0) -> dict:
    """TAESD with 16 latent channels: VAELoader picks TAESD from ``taesd_decoder.1.weight`` and reads
    the latent channels from its shape (comfy/sd.py), so this serves SD3 and Flux latents.

    ``init_``'s He init saturates this 16-channel decoder (activations grow ~1.5x per residual
    block: 99% of pixels at 0 or 255), so convolutions are rescaled to N(0, 1/fan_in), each
    residual branch's last conv is halved and the output conv's bias is 0.5 (mid grey):
    decoded random latents are textures with pixel std ~0.2 and no clipping.
    """
    import torch
    from comfy.taesd.taesd import TAESD, Block

    vae = TAESD(latent_channels=16)
    init_(vae, seed)
    with torch.no_grad():
        vae.vae_scale.fill_(1.0)
        vae.vae_shift.fill_(0.0)
        for mod in vae.modules():
            if isinstance(mod, torch.nn.Conv2d):
                mod.weight.mul_(0.5**0.5)
            if isinstance(mod, Block):
                mod.conv[-1].weight.mul_(0.5)
        vae.taesd_decoder[-1].bias.fill_(0.5)
    return vae.state_dict()


def wan21_vae_state_dict(seed: int = 0) -> dict:
    """Wan 2.1 VAE (also Qwen-Image's): comfy/sd.py fixes every size (dim 96, mult 1,2,4,4, two res
    blocks), so this is the full 127M-parameter WanVAE with random weights."""
    import comfy.ldm.wan.vae

    vae = comfy.ldm.wan.vae.WanVAE(
        dim=96,
        z_dim=16,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=2,
        attn_scales=[],
        temperal_downsample=[False, True, True],
        dropout=0.0,
    )
    init_(vae, seed)
    return vae.state_dict()


def model_info(model) -> dict:
    """What ComfyUI made of a MODEL: classes, model_sampling MRO, unet config, parameter count."""
    ms = model.get_model_object("model_sampling")
    base = model.model
    return {
        "model_config": type(base.model_config).__name__,
        "model_base": type(base).__name__,
        "diffusion_model": type(base.diffusion_model).__name__,
        "model_type": base.model_type.name,
        "model_sampling": [c.__name__ for c in type(ms).__mro__ if c.__name__ != "object"],
        "shift": float(getattr(ms, "shift", 0.0) or 0.0),
        "multiplier": float(getattr(ms, "multiplier", 0.0) or 0.0),
        "unet_config": {
            k: v
            for k, v in base.model_config.unet_config.items()
            if isinstance(v, (int, float, str, bool, list, tuple, type(None)))
        },
        "params": sum(p.numel() for p in base.diffusion_model.parameters()),
    }


# ---------------------------------------------------------------------------------------- nodes


class SafeT2ITestTinyCLIP:
    """ComfyUI's own CLIP of a family with tiny fixed-seed weights (see ``build_clip``)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"family": (FAMILIES_CLIP,), "seed": ("INT", {"default": 0, "min": 0, "max": 2**31})}
        }

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "run"
    CATEGORY = "_for_testing"

    def run(self, family, seed):
        return (build_clip(family, seed),)


class SafeT2ITestTinyModel:
    """ComfyUI's own model of a family with tiny fixed-seed weights (see ``build_model``)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"family": (FAMILIES_MODEL,), "seed": ("INT", {"default": 0, "min": 0, "max": 2**31})}
        }

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "run"
    CATEGORY = "_for_testing"

    def run(self, family, seed):
        return (build_model(family, seed),)


class SafeT2ITestModelInfo:
    """Reports ``model_info`` of a MODEL (after any ModelSampling* node) as UI text."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "_for_testing"

    @classmethod
    def IS_CHANGED(cls, **kw):
        return float("nan")

    def run(self, model):
        return {"ui": {"text": [json.dumps(model_info(model))]}}


NODE_CLASS_MAPPINGS = {
    "SafeT2ITestTinyCLIP": SafeT2ITestTinyCLIP,
    "SafeT2ITestTinyModel": SafeT2ITestTinyModel,
    "SafeT2ITestModelInfo": SafeT2ITestModelInfo,
}
