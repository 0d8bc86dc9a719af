"""Tiny random diffusers pipelines of the newer families, for tests (CPU, no downloads).

Every pipeline is the real diffusers class built from tiny random configs of the real component
classes; nothing here is a stand-in of our own:

=========== =========================== ============================================================
family      pipeline                    components
=========== =========================== ============================================================
``sd3``     StableDiffusion3Pipeline    SD3Transformer2DModel, CLIPTextModelWithProjection x2 (L, G),
                                        T5EncoderModel, AutoencoderKL (16 ch), FlowMatchEuler
``flux``    FluxPipeline (dev layout)   FluxTransformer2DModel (guidance_embeds), CLIPTextModel,
                                        T5EncoderModel, AutoencoderKL (16 ch), FlowMatchEuler
``qwen``    QwenImagePipeline           QwenImageTransformer2DModel, Qwen2_5_VLForConditionalGeneration,
                                        AutoencoderKLQwenImage (16 ch), FlowMatchEuler
``wan``     WanPipeline (2.1 T2V)       WanTransformer3DModel, UMT5EncoderModel, AutoencoderKLWan
                                        (16 ch), UniPCMultistepScheduler (flow)
=========== =========================== ============================================================

Widths differ between encoders so that a wrong channel split cannot pass unnoticed:

* SD3: CLIP-L 32, CLIP-G 48, T5 96. StableDiffusion3Pipeline concatenates L|G (80 wide) and pads
  it to the T5 width before joining the two on the sequence axis, so the T5 width must be at
  least 80; the pooled vector is L|G projections (80 = ``pooled_projection_dim``).
* Flux: CLIP-L 32 (pooled only, ``pooled_projection_dim``), T5 40 (``joint_attention_dim``).
* Qwen-Image: Qwen2.5-VL text width 24 (``joint_attention_dim``).
* Wan 2.1: umT5 width 40 (``text_dim``).

The latents have 16 channels like the real models. VAEs are one or two levels deep, so the
spatial factor is 2 (SD3/Flux: 32 px -> 16x16 latent -> 64 tokens of 2x2 patches), 4 (Qwen:
``2 ** len(temperal_downsample)``) or 8 (Wan: three down levels, temporal factor 4).

Tokenizers are built here, no files from the hub: CLIP is ``tiny_diffusers.tiny_tokenizer``
(byte-level, no merges); T5/umT5 are ``T5TokenizerFast`` over a character Unigram
(``<pad>``=0, ``</s>``=1, ``<unk>``=2 as in T5); Qwen2 is ``Qwen2TokenizerFast`` byte-level BPE
with merges for a few whole words plus Qwen's chat special tokens: the Qwen-Image template
prefix is 34 tokens as with the real tokenizer, so the pipeline's fixed
``prompt_template_encode_start_idx`` of 34 drops exactly the system prompt.

Each pipeline runs 2 steps at 32x32 (Wan: 5 frames) in well under a second on one CPU thread;
use :func:`call_kwargs` for those arguments. :data:`FAMILIES` describes each family (denoiser
attribute, encoders, how guidance works) for code that must handle all of them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

try:  # tests/unit is on sys.path under pytest (no __init__.py), as for tiny_diffusers' users
    from tiny_diffusers import tiny_tokenizer as tiny_clip_tokenizer
except ImportError:  # imported as tests.unit.tiny_families
    from tests.unit.tiny_diffusers import tiny_tokenizer as tiny_clip_tokenizer

# -------------------------------------------------------------------------------- tokenizers

_T5_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-()/&+*=%$#@_<>[]{}|"


def tiny_t5_tokenizer(max_length: int = 64):
    """``T5TokenizerFast`` over a character Unigram (T5 layout: <pad> 0, </s> 1, <unk> 2, then "▁").

    Words split into "▁" + single characters; unknown characters map to <unk>. ``max_length``
    becomes ``model_max_length``. Used for T5 (SD3, Flux) and umT5 (Wan) alike: both are
    SentencePiece Unigram tokenizers with the same special ids.
    """
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in _T5_CHARS]
    vocab += [("\u2581" + c, -3.5) for c in _T5_CHARS]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=max_length)


QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# The words of Qwen-Image's system prompt, each one BPE token as in the real Qwen2 vocabulary, so
# that the template prefix "<|im_start|>system\n...:<|im_end|>\n<|im_start|>user\n" is exactly
# 34 tokens: QwenImagePipeline drops a fixed ``prompt_template_encode_start_idx`` = 34.
_QWEN_WORDS = [
    "system",
    "user",
    "assistant",
    *(
        "\u0120" + w
        for w in (  # noqa: SIM905
            "the image by detailing color shape size texture quantity text spatial relationships of objects "
            "and background a an in on with photo"
        ).split()
    ),
    "Describe",
]


def tiny_qwen2_tokenizer():
    """``Qwen2TokenizerFast``: byte-level BPE + Qwen's chat special tokens.

    Ids 0..255 are the byte symbols (GPT-2 byte-to-unicode table); then a few whole words built by
    left-to-right merges (the system-prompt words, so Qwen-Image's template prefix is 34 tokens
    like with the real tokenizer; other text falls back to one token per byte); then
    ``QWEN_SPECIALS`` (<|endoftext|> is pad/eos as in Qwen2, then <|im_start|>, <|im_end|>, ...).
    """
    from transformers import Qwen2TokenizerFast

    from safet2i.lab.tokenizer import bytes_to_unicode

    chars = bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    merges = []
    for word in _QWEN_WORDS:
        for i in range(2, len(word) + 1):
            if word[:i] not in vocab:
                merges.append((word[: i - 1], word[i - 1]))
                vocab[word[:i]] = len(vocab)
    for tok in QWEN_SPECIALS:
        vocab[tok] = len(vocab)
    tok = Qwen2TokenizerFast(
        vocab=vocab,
        merges=merges,
        unk_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=2048,
    )
    tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIALS[1:]})
    return tok


# -------------------------------------------------------------------------------- encoders


def _clip(tok, width: int, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=width,
        intermediate_size=2 * width,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=77,
        projection_dim=width,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _t5(tok, width: int, umt5: bool = False):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    kw = {
        "vocab_size": len(tok),
        "d_model": width,
        "d_kv": 8,
        "d_ff": 2 * width,
        "num_layers": 2,
        "num_heads": 2,
        "relative_attention_num_buckets": 8,
        "feed_forward_proj": "gated-gelu",
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
    }
    if umt5:
        return UMT5EncoderModel(UMT5Config(**kw)).eval()
    return T5EncoderModel(T5Config(**kw)).eval()


def _kl_vae(scaling_factor: float, shift_factor: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=8,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    ).eval()


def _done(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -------------------------------------------------------------------------------- pipelines


def tiny_sd3(folder: Path, seed: int = 0, sd35: bool = False):
    """StableDiffusion3Pipeline (SD3-medium layout): CLIP-L 32 + CLIP-G 48 + T5 96, MMDiT 2 blocks.

    ``sd35=True``: the SD3.5 layout instead (RMS q/k norm as in 3.5 large/medium and, as in 3.5
    medium, a second self-attention in block 0's image stream).

    ``joint_attention_dim`` 96 = T5 width (>= 80 = L|G, which the pipeline zero-pads to it);
    ``pooled_projection_dim`` 80 = L|G projections. Transformer: 2 heads x 16, patch 2, 16 ch.
    Uses CFG (``guidance_scale`` > 1 with ``negative_prompt``).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    folder = Path(folder)
    tok, tok2, tok3 = (
        tiny_clip_tokenizer(folder / "tokenizer"),
        tiny_clip_tokenizer(folder / "tokenizer_2"),
        tiny_t5_tokenizer(77),
    )
    torch.manual_seed(seed)
    te, te2, te3 = _clip(tok, 32, True), _clip(tok2, 48, True), _t5(tok3, 96)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=96,
        caption_projection_dim=32,
        pooled_projection_dim=80,
        pos_embed_max_size=16,
        qk_norm="rms_norm" if sd35 else None,
        dual_attention_layers=(0,) if sd35 else (),
    ).eval()
    vae = _kl_vae(1.5305, 0.0609)  # SD3's VAE scale/shift
    return _done(
        StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=vae,
            text_encoder=te,
            tokenizer=tok,
            text_encoder_2=te2,
            tokenizer_2=tok2,
            text_encoder_3=te3,
            tokenizer_3=tok3,
        )
    )


def tiny_flux(folder: Path, seed: int = 0, schnell: bool = False):
    """FluxPipeline, Flux.1-dev layout: CLIP-L 32 (pooled) + T5 40 (sequence), 1 double + 1 single block.

    ``guidance_embeds=True`` (dev): ``guidance_scale`` is an input of the guidance embedding, not
    CFG; true CFG only with ``true_cfg_scale`` > 1 and a ``negative_prompt``. Transformer in_channels
    64 = 16 latent channels x 2x2 packing; 2 heads x 16 with RoPE axes (4, 6, 6). ``schnell=True``:
    no guidance embedding (Flux.1-schnell layout; ``guidance_scale`` is then ignored).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    folder = Path(folder)
    tok, tok2 = tiny_clip_tokenizer(folder / "tokenizer"), tiny_t5_tokenizer(64)
    torch.manual_seed(seed)
    te, te2 = _clip(tok, 32, False), _t5(tok2, 40)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=40,
        pooled_projection_dim=32,
        guidance_embeds=not schnell,
        axes_dims_rope=(4, 6, 6),
    ).eval()
    vae = _kl_vae(0.3611, 0.1159)  # Flux's VAE scale/shift
    sched = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return _done(
        FluxPipeline(
            scheduler=sched,
            vae=vae,
            text_encoder=te,
            tokenizer=tok,
            text_encoder_2=te2,
            tokenizer_2=tok2,
            transformer=transformer,
        )
    )


def tiny_qwen_image(folder: Path, seed: int = 0):
    """QwenImagePipeline: Qwen2.5-VL text width 24 (2 layers, 2 heads x 12), transformer 2 blocks.

    ``joint_attention_dim`` 24 = text width; in_channels 64 = 16 latent channels x 2x2 packing.
    The vision tower is 1 block of width 16 (unused for text prompts). No guidance embedding:
    CFG is ``true_cfg_scale`` > 1 with ``negative_prompt``. ``folder`` is unused (no files).
    """
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok = tiny_qwen2_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": 24,
            "intermediate_size": 48,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "vocab_size": len(tok),
            "max_position_embeddings": 2048,
            "rope_scaling": {"mrope_section": [2, 2, 2], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_heads": 2,
            "out_hidden_size": 24,
        },
        hidden_size=24,
        vocab_size=len(tok),
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        vision_token_id=ids["<|vision_pad|>"],
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
    )
    te = Qwen2_5_VLForConditionalGeneration(config).eval()
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=64,
        out_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=24,
        guidance_embeds=False,
        axes_dims_rope=(4, 6, 6),
    ).eval()
    vae = AutoencoderKLQwenImage(
        base_dim=16,
        z_dim=16,
        dim_mult=[1, 2, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        latents_mean=[0.0] * 16,
        latents_std=[1.0] * 16,
    ).eval()
    sched = FlowMatchEulerDiscreteScheduler(
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
        time_shift_type="exponential",
    )
    return _done(
        QwenImagePipeline(scheduler=sched, vae=vae, text_encoder=te, tokenizer=tok, transformer=transformer)
    )


def tiny_wan(folder: Path, seed: int = 0):
    """WanPipeline (Wan 2.1 T2V): umT5 width 40, transformer 2 blocks (2 heads x 12), Wan VAE.

    ``text_dim`` 40 = umT5 width. VAE: ``AutoencoderKLWan`` base_dim 8, three down levels (spatial
    factor 8, temporal factor 4: 5 frames -> 2 latent frames). Scheduler: UniPC in flow mode with
    ``flow_shift`` 3.0 as in Wan 2.1's diffusers config. CFG: ``guidance_scale`` > 1 (negative
    prompt defaults to ""). ``folder`` is unused (no files).
    """
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    tok = tiny_t5_tokenizer(64)
    torch.manual_seed(seed)
    te = _t5(tok, 40, umt5=True)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=40,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ).eval()
    vae = AutoencoderKLWan(
        base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    ).eval()
    sched = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, num_train_timesteps=1000
    )
    return _done(
        WanPipeline(tokenizer=tok, text_encoder=te, vae=vae, scheduler=sched, transformer=transformer)
    )


# -------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Family:
    """What code that handles every family needs to know about one tiny pipeline.

    ``encoders``: ``(text encoder attribute, tokenizer attribute, kind, width)`` in the order the
    pipeline uses them. ``cfg``: how classifier-free guidance is switched on (``"guidance_scale"``:
    CFG when it is > 1; ``"true_cfg_scale"``: CFG only when it is > 1 and a ``negative_prompt`` is
    given). ``guidance_embed``: ``guidance_scale`` feeds the transformer's guidance embedding
    (guidance-distilled Flux dev), so it is not CFG. ``call``: keyword arguments for a 2-step run.
    ``output``: the attribute of the pipeline output holding pixels (``images`` [B,H,W,3] or
    ``frames`` [B,F,H,W,3] with ``output_type="np"``).
    """

    name: str
    build: Callable
    pipeline: str
    encoders: tuple
    cfg: str
    guidance_embed: bool
    call: dict = field(default_factory=dict)
    output: str = "images"
    denoiser: str = "transformer"
    latent_channels: int = 16


_IMG = {"height": 32, "width": 32, "num_inference_steps": 2, "output_type": "np"}

FAMILIES: dict[str, Family] = {
    "sd3": Family(
        "sd3",
        tiny_sd3,
        "StableDiffusion3Pipeline",
        (
            ("text_encoder", "tokenizer", "clip_l", 32),
            ("text_encoder_2", "tokenizer_2", "clip_g", 48),
            ("text_encoder_3", "tokenizer_3", "t5", 96),
        ),
        cfg="guidance_scale",
        guidance_embed=False,
        call={**_IMG, "guidance_scale": 4.0, "max_sequence_length": 64},
    ),
    "flux": Family(
        "flux",
        tiny_flux,
        "FluxPipeline",
        (("text_encoder", "tokenizer", "clip_l", 32), ("text_encoder_2", "tokenizer_2", "t5", 40)),
        cfg="true_cfg_scale",
        guidance_embed=True,
        call={**_IMG, "guidance_scale": 3.5, "max_sequence_length": 64},
    ),
    "qwen_image": Family(
        "qwen_image",
        tiny_qwen_image,
        "QwenImagePipeline",
        (("text_encoder", "tokenizer", "qwen25_vl", 24),),
        cfg="true_cfg_scale",
        guidance_embed=False,
        call={**_IMG, "true_cfg_scale": 4.0, "negative_prompt": " ", "max_sequence_length": 64},
    ),
    "wan": Family(
        "wan",
        tiny_wan,
        "WanPipeline",
        (("text_encoder", "tokenizer", "umt5", 40),),
        cfg="guidance_scale",
        guidance_embed=False,
        call={**_IMG, "num_frames": 5, "guidance_scale": 5.0, "max_sequence_length": 64},
        output="frames",
    ),
}


def call_kwargs(family: str, seed: int = 0, **overrides) -> dict:
    """Keyword arguments for a fast deterministic run: 2 steps, 32x32 (Wan: 5 frames), CPU generator."""
    kw = dict(FAMILIES[family].call)
    kw["generator"] = torch.Generator("cpu").manual_seed(seed)
    kw.update(overrides)
    return kw


def run(pipe, family: str, prompt: str, seed: int = 0, **overrides):
    """Run ``pipe`` with :func:`call_kwargs` and return the pixels (numpy, see ``Family.output``)."""
    out = pipe(prompt=prompt, **call_kwargs(family, seed, **overrides))
    return getattr(out, FAMILIES[family].output)


def describe(pipe, family: str) -> str:
    """One JSON line with parameter counts per component (for debugging fixture sizes)."""
    counts = {}
    for name in ("transformer", "vae") + tuple(e[0] for e in FAMILIES[family].encoders):
        counts[name] = sum(p.numel() for p in getattr(pipe, name).parameters())
    return json.dumps(counts)
