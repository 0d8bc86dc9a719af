"""Write example_workflows/*.json (UI format, as the ComfyUI frontend saves) from compact specs.

    python tools/make_example_workflows.py OBJECT_INFO.json

OBJECT_INFO.json is ``GET /object_info`` of a server with this pack loaded (widget order, slot
types). The specs below are the source of truth for the shared workflows; the integration
tests convert every written file back to the API format and run it.
"""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "example_workflows"
SD15 = {"name": "v1-5-pruned-emaonly-fp16.safetensors", "directory": "checkpoints",
        "url": "https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/v1-5-pruned-emaonly-fp16.safetensors"}
HF = "https://huggingface.co"
# Model files as the ComfyUI templates name them (properties.models: the frontend offers the download).
FLUX_DEV = {"name": "flux1-dev.safetensors", "directory": "diffusion_models",
            "url": f"{HF}/black-forest-labs/FLUX.1-dev/resolve/main/flux1-dev.safetensors"}
CLIP_L = {"name": "clip_l.safetensors", "directory": "text_encoders",
          "url": f"{HF}/comfyanonymous/flux_text_encoders/resolve/main/clip_l.safetensors"}
T5XXL = {"name": "t5xxl_fp16.safetensors", "directory": "text_encoders",
         "url": f"{HF}/comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp16.safetensors"}
FLUX_AE = {"name": "ae.safetensors", "directory": "vae",
           "url": f"{HF}/Comfy-Org/Lumina_Image_2.0_Repackaged/resolve/main/split_files/vae/ae.safetensors"}
SD35_MEDIUM = {"name": "sd3.5_medium.safetensors", "directory": "checkpoints",
               "url": f"{HF}/stabilityai/stable-diffusion-3.5-medium/resolve/main/sd3.5_medium.safetensors"}
CLIP_G = {"name": "clip_g.safetensors", "directory": "text_encoders",
          "url": f"{HF}/Comfy-Org/stable-diffusion-3.5-fp8/resolve/main/text_encoders/clip_g.safetensors"}
WAN_REPACK = f"{HF}/Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files"
WAN_T2V = {"name": "wan2.1_t2v_1.3B_fp16.safetensors", "directory": "diffusion_models",
           "url": f"{WAN_REPACK}/diffusion_models/wan2.1_t2v_1.3B_fp16.safetensors"}
UMT5 = {"name": "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "directory": "text_encoders",
        "url": f"{WAN_REPACK}/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors"}
WAN_VAE = {"name": "wan_2.1_vae.safetensors", "directory": "vae", "url": f"{WAN_REPACK}/vae/wan_2.1_vae.safetensors"}
PACK_VERSION = "0.1.0"
COMFY_VERSION = "0.3.64"

# (id, type, {widget: value}, {input: (source id, output slot)}, extra node properties)
CKPT = (1, "CheckpointLoaderSimple", {"ckpt_name": SD15["name"]}, {}, {"models": [SD15]})
DUO_NOTE = (90, "MarkdownNote", {"text": (
    "## Safety LoRA\n\nThis workflow loads DUO's nudity LoRA (Park et al., NeurIPS 2024). The authors share it "
    "in naver-ai/DUO issue #1 (Google Drive); SafeT2I does not redistribute it. Save it as "
    "`duo_nudity_beta500.safetensors` in `models/loras` or `models/safety_models`. The loader reports how many "
    "of its target weights were patched and stops if any is missing.")}, {}, {})
POSITIVE = "a photo of a woman relaxing on a sunny beach, golden hour"
NEGATIVE = "lowres, blurry"
SAMPLER = {"seed": 42, "steps": 25, "cfg": 7.5, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}


def ksampler(i, model, pos, neg, latent, **over):
    return (i, "KSampler", {**SAMPLER, **over}, {"model": model, "positive": pos, "negative": neg, "latent_image": latent}, {})


# Shared by the Flux, SD3.5 and Wan workflows.
STEER = {"concepts": "nudity", "custom_concepts": "", "alpha": 0.01, "order": "code", "self_validating": True,
         "concepts_as_negative": False, "configuration": "custom settings"}
CONCEPT = {"concept": "nudity, sexual, erotic, naked"}
SLD_MEDIUM = {"preset": "MEDIUM", "guidance_scale": 1000.0, "warmup_steps": 10, "threshold": 0.01,
              "momentum_scale": 0.3, "mom_beta": 0.4, "concept_branch_scale": 3.5}
FILTER_LOADER = {"model": "nudenet", "providers": "auto"}
IMAGE_FILTER = {"policy": "strict-5", "action": "pixelate", "thresholds": "", "expand": 0.1, "mask_shape": "rect",
                "feather": 0.0, "strength": 0.0}
FLUX_NOTE = (90, "MarkdownNote", {"text": (
    "## Models and licences\n\n"
    "* **FLUX.1 [dev]** (Black Forest Labs): `flux1-dev.safetensors` in `models/diffusion_models`, from the "
    "gated Hugging Face repository black-forest-labs/FLUX.1-dev (accept its licence there first). "
    "**FLUX.1 [dev] Non-Commercial License**: the model and its derivatives are for non-commercial use. Text "
    "encoders `clip_l.safetensors` + `t5xxl_fp16.safetensors` (`models/text_encoders`), VAE `ae.safetensors` "
    "(`models/vae`).\n"
    "* **Safety LoRA: EraseAnything** nudity (Gao et al., ICML 2025). The authors commit it to GitHub "
    "tomguluson92/EraseAnything as `Flux-erase-dev/pytorch_lora_weights.safetensors`; SafeT2I does not "
    "redistribute it. Save it as `eraseanything_flux_nudity.safetensors` in `models/loras` or "
    "`models/safety_models` (its sha256 is checked on load). Code BSD-3-Clause; the weights are a FLUX.1 [dev] "
    "derivative, so that non-commercial licence applies. It patches the transformer only (38 attention "
    "weights of the 19 double blocks), hence `strength_clip` 0.\n"
    "* Flux dev is guidance-distilled: KSampler runs at **cfg 1** with FluxGuidance 3.5, and SafeT2I SLD uses its "
    "concept branch (`concept_branch_scale` 3.5, one extra model evaluation per step). The prompt is steered "
    "on T5's rows; CLIP-L's pooled vector is kept.")}, {}, {})
SD35_NOTE = (90, "MarkdownNote", {"text": (
    "## Models and licences\n\n"
    "* **Stable Diffusion 3.5 Medium** (Stability AI): `sd3.5_medium.safetensors` (MMDiT + VAE, no text "
    "encoders) in `models/checkpoints`, from the gated Hugging Face repository "
    "stabilityai/stable-diffusion-3.5-medium. **Stability AI Community License** (free for research, "
    "non-commercial use and organisations under USD 1M annual revenue). Text encoders `clip_l.safetensors`, "
    "`clip_g.safetensors`, `t5xxl_fp16.safetensors` in `models/text_encoders`.\n"
    "* **No safety LoRA**: SafeT2I knows no published SD3/SD3.5 safety LoRA (models/safety_models.toml), so "
    "this workflow has none. SafeT2I Load Safety LoRA accepts SD3/SD3.5 LoRAs in any key format; if you have "
    "one, put it between Load Checkpoint and ModelSamplingSD3 (and give the text encoders to it).\n"
    "* Prompt steering works on each of CLIP-L, CLIP-G and T5 in its own subspace; SLD runs with true CFG "
    "(cfg 4.5 and a negative prompt).")}, {}, {})
WAN_NOTE = (90, "MarkdownNote", {"text": (
    "## Models and licences\n\n"
    "* **Wan 2.1 T2V 1.3B** (Wan team, Alibaba), **Apache-2.0**, as repackaged by Comfy-Org "
    "(Comfy-Org/Wan_2.1_ComfyUI_repackaged): `wan2.1_t2v_1.3B_fp16.safetensors` in `models/diffusion_models`, "
    "`umt5_xxl_fp8_e4m3fn_scaled.safetensors` in `models/text_encoders`, `wan_2.1_vae.safetensors` in "
    "`models/vae`.\n"
    "* No Wan safety LoRA is known to SafeT2I, so none is loaded. The prompt is steered on umT5's rows, SLD "
    "guides with true CFG, and the **Video Filter** checks every decoded frame: a region found in one frame is "
    "also censored in the 2 frames on each side (`window`). Its `video` output is the filtered clip at 16 fps; "
    "nothing unfiltered is saved.")}, {}, {})
WAN_NEGATIVE = "blurry, low quality, static, distorted, overexposed, worst quality, jpeg artifacts"
WAN_POSITIVE = "a woman walking along a sunny beach at golden hour, waves rolling in, the camera slowly tracking her"


SPECS = {
    "safet2i_output_filter": (
        "Output filter only: check loaded images with NudeNet (strict-5 policy) and blur what it finds.",
        [
            (1, "LoadImage", {"image": "example.png"}, {}, {}),
            (2, "SafeT2IFilterModelLoader", {"model": "nudenet", "providers": "auto"}, {}, {}),
            (3, "SafeT2IImageFilter", {"policy": "strict-5", "action": "blur", "thresholds": "", "expand": 0.1,
                                       "mask_shape": "rect", "feather": 4.0, "strength": 0.0},
             {"images": (1, 0), "filter_models": (2, 0)}, {}),
            (4, "SaveImage", {"filename_prefix": "safet2i_filtered"}, {"images": (3, 0)}, {}),
        ],
    ),
    "safet2i_full_stack_txt2img": (
        "Full stack: safety LoRA → SAFREE-style steering → SLD guidance → sampler → output filter → save.",
        [
            CKPT,
            (2, "SafeT2ILoadSafetyLoRA", {"lora_name": "duo_nudity_beta500.safetensors", "strength_model": 1.0,
                                          "strength_clip": 1.0, "allow_partial": False}, {"model": (1, 0), "clip": (1, 1)}, {}),
            (3, "SafeT2IPromptSteer", {"text": POSITIVE, "concepts": "nudity", "custom_concepts": "", "alpha": 0.01,
                                       "order": "code", "self_validating": True, "concepts_as_negative": False,
                                       "configuration": "custom settings"},
             {"clip": (2, 1), "negative": (4, 0)}, {}),
            (4, "CLIPTextEncode", {"text": NEGATIVE}, {"clip": (2, 1)}, {}),
            (5, "SafeT2IConceptEncode", {"concept": "nudity, sexual, erotic, naked"}, {"clip": (2, 1)}, {}),
            (6, "SafeT2ISLD", {"preset": "MEDIUM", "guidance_scale": 1000.0, "warmup_steps": 10, "threshold": 0.01,
                               "momentum_scale": 0.3, "mom_beta": 0.4}, {"model": (2, 0), "concept": (5, 0)}, {}),
            (7, "EmptyLatentImage", {"width": 512, "height": 512, "batch_size": 1}, {}, {}),
            ksampler(8, (6, 0), (3, 0), (3, 1), (7, 0)),
            (9, "VAEDecode", {}, {"samples": (8, 0), "vae": (1, 2)}, {}),
            (10, "SafeT2IFilterModelLoader", {"model": "nudenet", "providers": "auto"}, {}, {}),
            (11, "SafeT2IImageFilter", {"policy": "strict-5", "action": "pixelate", "thresholds": "", "expand": 0.1,
                                        "mask_shape": "rect", "feather": 0.0, "strength": 0.0},
             {"images": (9, 0), "filter_models": (10, 0)}, {}),
            (12, "SaveImage", {"filename_prefix": "safet2i/full_stack"}, {"images": (11, 0)}, {}),
            (13, "PreviewAny", {}, {"source": (2, 2)}, {}),
            (14, "PreviewAny", {}, {"source": (3, 2)}, {}),
            (15, "SafeT2IGuidanceReport", {}, {"model": (6, 0), "samples": (8, 0)}, {}),
            (16, "PreviewAny", {}, {"source": (11, 4)}, {}),
            DUO_NOTE,
        ],
    ),
    "safet2i_guidance_comparison": (
        "Same prompt and seed: plain CFG | SLD (MEDIUM) | SP-Guard-style | Detect-and-Guide-style, side by side.",
        [
            CKPT,
            (2, "CLIPTextEncode", {"text": POSITIVE}, {"clip": (1, 1)}, {}),
            (3, "CLIPTextEncode", {"text": NEGATIVE}, {"clip": (1, 1)}, {}),
            (4, "SafeT2IConceptEncode", {"concept": "nudity, sexual, erotic, naked"}, {"clip": (1, 1)}, {}),
            (5, "EmptyLatentImage", {"width": 512, "height": 512, "batch_size": 1}, {}, {}),
            (6, "SafeT2ISLD", {"preset": "MEDIUM", "guidance_scale": 1000.0, "warmup_steps": 10, "threshold": 0.01,
                               "momentum_scale": 0.3, "mom_beta": 0.4}, {"model": (1, 0), "concept": (4, 0)}, {}),
            (7, "SafeT2ISPGuard", {"max_scale": 2.0, "harm_threshold": 0.45, "mask_threshold": 0.0, "ema": 0.5,
                                   "start_step": 0}, {"model": (1, 0), "concept": (4, 0)}, {}),
            (8, "SafeT2IDetectGuide", {"concept": "nude, naked, breasts, genitals", "scale": 0.5, "high": 0.5,
                                       "low": 0.01, "skip_coverage": 0.8, "sld_gate": "none", "guideline_embeddings": "none"},
             {"model": (1, 0), "clip": (1, 1)}, {}),
            ksampler(10, (1, 0), (2, 0), (3, 0), (5, 0)),
            ksampler(11, (6, 0), (2, 0), (3, 0), (5, 0)),
            ksampler(12, (7, 0), (2, 0), (3, 0), (5, 0)),
            ksampler(13, (8, 0), (2, 0), (3, 0), (5, 0)),
            (20, "VAEDecode", {}, {"samples": (10, 0), "vae": (1, 2)}, {}),
            (21, "VAEDecode", {}, {"samples": (11, 0), "vae": (1, 2)}, {}),
            (22, "VAEDecode", {}, {"samples": (12, 0), "vae": (1, 2)}, {}),
            (23, "VAEDecode", {}, {"samples": (13, 0), "vae": (1, 2)}, {}),
            (30, "ImageStitch", {"direction": "right", "match_image_size": True, "spacing_width": 8, "spacing_color": "white"},
             {"image1": (20, 0), "image2": (21, 0)}, {}),
            (31, "ImageStitch", {"direction": "right", "match_image_size": True, "spacing_width": 8, "spacing_color": "white"},
             {"image1": (30, 0), "image2": (22, 0)}, {}),
            (32, "ImageStitch", {"direction": "right", "match_image_size": True, "spacing_width": 8, "spacing_color": "white"},
             {"image1": (31, 0), "image2": (23, 0)}, {}),
            (33, "SaveImage", {"filename_prefix": "safet2i/guidance_comparison"}, {"images": (32, 0)}, {}),
            (34, "SafeT2IGuidanceReport", {}, {"model": (6, 0), "samples": (11, 0)}, {}),
            (35, "SafeT2IGuidanceReport", {}, {"model": (7, 0), "samples": (12, 0)}, {}),
            (36, "SafeT2IGuidanceReport", {}, {"model": (8, 0), "samples": (13, 0)}, {}),
        ],
    ),
    "safet2i_steering_report": (
        "SAFREE-style prompt steering: which tokens were triggers, beta and t', steered vs plain image.",
        [
            CKPT,
            (2, "SafeT2IPromptSteer", {"text": "a nude woman lying on a bed, erotic photo", "concepts": "nudity",
                                       "custom_concepts": "", "alpha": 0.01, "order": "code", "self_validating": True,
                                       "concepts_as_negative": False,
                                       "configuration": "custom settings"}, {"clip": (1, 1), "negative": (3, 0)}, {}),
            (3, "CLIPTextEncode", {"text": NEGATIVE}, {"clip": (1, 1)}, {}),
            (4, "CLIPTextEncode", {"text": "a nude woman lying on a bed, erotic photo"}, {"clip": (1, 1)}, {}),
            (5, "EmptyLatentImage", {"width": 512, "height": 512, "batch_size": 1}, {}, {}),
            ksampler(6, (1, 0), (2, 0), (2, 1), (5, 0)),
            ksampler(7, (1, 0), (4, 0), (3, 0), (5, 0)),
            (8, "VAEDecode", {}, {"samples": (6, 0), "vae": (1, 2)}, {}),
            (9, "VAEDecode", {}, {"samples": (7, 0), "vae": (1, 2)}, {}),
            (10, "ImageStitch", {"direction": "right", "match_image_size": True, "spacing_width": 8, "spacing_color": "white"},
             {"image1": (9, 0), "image2": (8, 0)}, {}),
            (11, "SaveImage", {"filename_prefix": "safet2i/steering"}, {"images": (10, 0)}, {}),
            (12, "PreviewAny", {}, {"source": (2, 2)}, {}),
        ],
    ),
    "safet2i_lora_coverage": (
        "Load a safety LoRA and read its coverage report: every target weight matched and patched.",
        [
            CKPT,
            (2, "SafeT2ILoadSafetyLoRA", {"lora_name": "duo_nudity_beta500.safetensors", "strength_model": 1.0,
                                          "strength_clip": 1.0, "allow_partial": False}, {"model": (1, 0), "clip": (1, 1)}, {}),
            (3, "PreviewAny", {}, {"source": (2, 2)}, {}),
            (4, "CLIPTextEncode", {"text": POSITIVE}, {"clip": (2, 1)}, {}),
            (5, "CLIPTextEncode", {"text": NEGATIVE}, {"clip": (2, 1)}, {}),
            (6, "EmptyLatentImage", {"width": 512, "height": 512, "batch_size": 1}, {}, {}),
            ksampler(7, (2, 0), (4, 0), (5, 0), (6, 0)),
            (8, "VAEDecode", {}, {"samples": (7, 0), "vae": (1, 2)}, {}),
            (9, "SaveImage", {"filename_prefix": "safet2i/lora"}, {"images": (8, 0)}, {}),
            DUO_NOTE,
        ],
    ),
    "safet2i_flux_full_stack": (
        "Flux.1 [dev] full stack: EraseAnything LoRA → steering on T5 → FluxGuidance → SLD concept branch at cfg 1 "
        "→ sampler → output filter → save.",
        [
            (1, "UNETLoader", {"unet_name": FLUX_DEV["name"], "weight_dtype": "default"}, {}, {"models": [FLUX_DEV]}),
            (2, "DualCLIPLoader", {"clip_name1": CLIP_L["name"], "clip_name2": T5XXL["name"], "type": "flux",
                                   "device": "default"}, {}, {"models": [CLIP_L, T5XXL]}),
            (3, "VAELoader", {"vae_name": FLUX_AE["name"]}, {}, {"models": [FLUX_AE]}),
            (4, "SafeT2ILoadSafetyLoRA", {"lora_name": "eraseanything_flux_nudity.safetensors", "strength_model": 1.0,
                                          "strength_clip": 0.0, "allow_partial": False},
             {"model": (1, 0), "clip": (2, 0)}, {}),
            (5, "SafeT2IPromptSteer", {"text": POSITIVE, **STEER}, {"clip": (4, 1)}, {}),
            (6, "FluxGuidance", {"guidance": 3.5}, {"conditioning": (5, 0)}, {}),
            (7, "SafeT2IConceptEncode", CONCEPT, {"clip": (4, 1)}, {}),
            (8, "ModelSamplingFlux", {"max_shift": 1.15, "base_shift": 0.5, "width": 1024, "height": 1024},
             {"model": (4, 0)}, {}),
            (9, "SafeT2ISLD", SLD_MEDIUM, {"model": (8, 0), "concept": (7, 0)}, {}),
            (10, "EmptySD3LatentImage", {"width": 1024, "height": 1024, "batch_size": 1}, {}, {}),
            ksampler(11, (9, 0), (6, 0), (5, 1), (10, 0), steps=20, cfg=1.0, scheduler="simple"),
            (12, "VAEDecode", {}, {"samples": (11, 0), "vae": (3, 0)}, {}),
            (13, "SafeT2IFilterModelLoader", FILTER_LOADER, {}, {}),
            (14, "SafeT2IImageFilter", IMAGE_FILTER, {"images": (12, 0), "filter_models": (13, 0)}, {}),
            (15, "SaveImage", {"filename_prefix": "safet2i/flux_full_stack"}, {"images": (14, 0)}, {}),
            (16, "PreviewAny", {}, {"source": (4, 2)}, {}),
            (17, "PreviewAny", {}, {"source": (5, 2)}, {}),
            (18, "SafeT2IGuidanceReport", {}, {"model": (9, 0), "samples": (11, 0)}, {}),
            (19, "PreviewAny", {}, {"source": (14, 4)}, {}),
            FLUX_NOTE,
        ],
    ),
    "safet2i_sd35_full_stack": (
        "SD3.5 Medium full stack: steering on CLIP-L/CLIP-G/T5 → SLD with CFG 4.5 and a negative prompt → sampler "
        "→ output filter → save (no SD3.5 safety LoRA is published).",
        [
            (1, "CheckpointLoaderSimple", {"ckpt_name": SD35_MEDIUM["name"]}, {}, {"models": [SD35_MEDIUM]}),
            (2, "TripleCLIPLoader", {"clip_name1": CLIP_L["name"], "clip_name2": CLIP_G["name"],
                                     "clip_name3": T5XXL["name"]}, {}, {"models": [CLIP_L, CLIP_G, T5XXL]}),
            (3, "SafeT2IPromptSteer", {"text": POSITIVE, **STEER}, {"clip": (2, 0), "negative": (4, 0)}, {}),
            (4, "CLIPTextEncode", {"text": NEGATIVE}, {"clip": (2, 0)}, {}),
            (5, "SafeT2IConceptEncode", CONCEPT, {"clip": (2, 0)}, {}),
            (6, "ModelSamplingSD3", {"shift": 3.0}, {"model": (1, 0)}, {}),
            (7, "SafeT2ISLD", SLD_MEDIUM, {"model": (6, 0), "concept": (5, 0)}, {}),
            (8, "EmptySD3LatentImage", {"width": 1024, "height": 1024, "batch_size": 1}, {}, {}),
            ksampler(9, (7, 0), (3, 0), (3, 1), (8, 0), steps=40, cfg=4.5, scheduler="sgm_uniform"),
            (10, "VAEDecode", {}, {"samples": (9, 0), "vae": (1, 2)}, {}),
            (11, "SafeT2IFilterModelLoader", FILTER_LOADER, {}, {}),
            (12, "SafeT2IImageFilter", IMAGE_FILTER, {"images": (10, 0), "filter_models": (11, 0)}, {}),
            (13, "SaveImage", {"filename_prefix": "safet2i/sd35_full_stack"}, {"images": (12, 0)}, {}),
            (14, "PreviewAny", {}, {"source": (3, 2)}, {}),
            (15, "SafeT2IGuidanceReport", {}, {"model": (7, 0), "samples": (9, 0)}, {}),
            (16, "PreviewAny", {}, {"source": (12, 4)}, {}),
            SD35_NOTE,
        ],
    ),
    "safet2i_wan_t2v_filtered": (
        "Wan 2.1 text-to-video: steering on umT5 → SLD → sampler → every frame through the Video Filter → "
        "save the filtered clip.",
        [
            (1, "UNETLoader", {"unet_name": WAN_T2V["name"], "weight_dtype": "default"}, {}, {"models": [WAN_T2V]}),
            (2, "CLIPLoader", {"clip_name": UMT5["name"], "type": "wan", "device": "default"}, {}, {"models": [UMT5]}),
            (3, "VAELoader", {"vae_name": WAN_VAE["name"]}, {}, {"models": [WAN_VAE]}),
            (4, "SafeT2IPromptSteer", {"text": WAN_POSITIVE, **STEER}, {"clip": (2, 0), "negative": (5, 0)}, {}),
            (5, "CLIPTextEncode", {"text": WAN_NEGATIVE}, {"clip": (2, 0)}, {}),
            (6, "SafeT2IConceptEncode", CONCEPT, {"clip": (2, 0)}, {}),
            (7, "ModelSamplingSD3", {"shift": 8.0}, {"model": (1, 0)}, {}),
            (8, "SafeT2ISLD", SLD_MEDIUM, {"model": (7, 0), "concept": (6, 0)}, {}),
            (9, "EmptyHunyuanLatentVideo", {"width": 832, "height": 480, "length": 33, "batch_size": 1}, {}, {}),
            ksampler(10, (8, 0), (4, 0), (4, 1), (9, 0), steps=30, cfg=6.0, sampler_name="uni_pc",
                     scheduler="simple"),
            (11, "VAEDecode", {}, {"samples": (10, 0), "vae": (3, 0)}, {}),
            (12, "SafeT2IFilterModelLoader", FILTER_LOADER, {}, {}),
            (13, "SafeT2IVideoFilter", {"policy": "strict-5", "action": "blur", "window": 2, "thresholds": "",
                                        "expand": 0.1, "mask_shape": "rect", "feather": 4.0, "strength": 0.0,
                                        "fps": 16.0},
             {"images": (11, 0), "filter_models": (12, 0)}, {}),
            (14, "SaveVideo", {"filename_prefix": "safet2i/wan_t2v_filtered", "format": "mp4", "codec": "h264"},
             {"video": (13, 5)}, {}),
            (15, "PreviewAny", {}, {"source": (4, 2)}, {}),
            (16, "PreviewAny", {}, {"source": (13, 4)}, {}),
            (17, "SafeT2IGuidanceReport", {}, {"model": (8, 0), "samples": (10, 0)}, {}),
            WAN_NOTE,
        ],
    ),
}


def _slot_types(spec: dict) -> list[tuple[str, str]]:
    return list(zip(spec["output_name"], spec["output"]))


def _input_types(spec: dict) -> dict[str, tuple[str, dict, bool]]:
    out = {}
    for group in ("required", "optional"):
        for name in spec["input_order"].get(group, []):
            typ, *rest = spec["input"][group][name]
            out[name] = ("COMBO" if isinstance(typ, list) else typ, rest[0] if rest and isinstance(rest[0], dict) else {},
                         group == "optional")
    return out


WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def build(title: str, nodes: list, object_info: dict) -> dict:
    depth: dict[int, int] = {}
    by_id = {n[0]: n for n in nodes}

    def d(i):
        if i not in depth:
            depth[i] = 1 + max((d(src) for src, _ in by_id[i][3].values()), default=-1)
        return depth[i]

    for n in nodes:
        d(n[0])
    links, ui_nodes = [], []
    out_links: dict[tuple[int, int], list[int]] = {}
    col_y: dict[int, int] = {}
    for order, (i, typ, widgets, inputs, props) in enumerate(sorted(nodes, key=lambda n: (depth[n[0]], n[0]))):
        if typ == "MarkdownNote":  # frontend-only node
            y = col_y.get(0, 60)
            col_y[0] = y + 260
            ui_nodes.append({"id": i, "type": typ, "pos": [40, y], "size": [340, 210], "flags": {}, "order": order,
                             "mode": 0, "inputs": [], "outputs": [], "properties": {}, "widgets_values": [widgets["text"]],
                             "color": "#432", "bgcolor": "#653"})
            continue
        spec = object_info[typ]
        itypes = _input_types(spec)
        ui_inputs = []
        for name, (src, slot) in inputs.items():
            kind, _, optional = itypes[name]
            link_id = len(links) + 1
            links.append([link_id, src, slot, i, None, object_info[by_id[src][1]]["output"][slot]])
            out_links.setdefault((src, slot), []).append(link_id)
            entry = {"name": name, "type": kind, "link": link_id}
            if optional:
                entry["shape"] = 7
            if kind in WIDGET_TYPES:
                entry["widget"] = {"name": name}
            ui_inputs.append(entry)
        for name, (kind, _, optional) in itypes.items():  # unlinked sockets the frontend still lists
            if kind not in WIDGET_TYPES and name not in inputs:
                ui_inputs.append({"name": name, "type": kind, "link": None, **({"shape": 7} if optional else {})})
        values = []
        widget_names = [n for n, (k, _, _) in itypes.items() if k in WIDGET_TYPES]
        for pos, (name, (kind, opts, optional)) in enumerate((n, itypes[n]) for n in widget_names):
            if name in inputs and name not in widgets:  # linked widget: the frontend still stores a value
                widgets = {**widgets, name: opts.get("default")}
            if name not in widgets and optional and not any(n in widgets for n in widget_names[pos:]):
                # Trailing optional widgets the spec leaves out are not stored, as in a workflow saved
                # before they were appended (the frontend and the server use their defaults); this keeps
                # the files of older specs byte-identical when a node gains such an input.
                break
            if name not in widgets:
                raise SystemExit(f"{typ}: widget {name!r} has no value in the spec")
            values.append(widgets[name])
            if opts.get("control_after_generate"):
                values.append("fixed")
            if opts.get("image_upload"):
                values.append("image")  # the frontend's upload widget
        col = depth[i]
        height = 90 + 26 * (len(values) + len(ui_inputs)) + (80 if typ in ("PreviewAny", "SafeT2IGuidanceReport") else 0)
        y = col_y.get(col, 60)
        col_y[col] = y + height + 50
        core = spec["python_module"].startswith(("nodes", "comfy_extras", "comfy_api_nodes"))
        properties = {"cnr_id": "comfy-core" if core else "safet2i", "ver": COMFY_VERSION if core else PACK_VERSION,
                      "Node name for S&R": typ, **props}
        ui_nodes.append({
            "id": i, "type": typ, "pos": [40 + 380 * col, y], "size": [340, height], "flags": {}, "order": order,
            "mode": 0, "inputs": ui_inputs,
            "outputs": [{"name": n, "type": t, "links": out_links.get((i, k)) or None, "slot_index": k}
                        for k, (n, t) in enumerate(_slot_types(spec))],
            "properties": properties, "widgets_values": values,
        })
    # Fill each link's target slot (index among the node's inputs).
    slot_of = {(n["id"], inp.get("link")): k for n in ui_nodes for k, inp in enumerate(n["inputs"])}
    for link in links:
        link[4] = slot_of[(link[3], link[0])]
    for n in ui_nodes:  # outputs list links after all are known
        for k, o in enumerate(n["outputs"]):
            o["links"] = out_links.get((n["id"], k)) or None
    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, "safet2i/" + title)),
        "revision": 0, "last_node_id": max(n[0] for n in nodes), "last_link_id": len(links),
        "nodes": sorted(ui_nodes, key=lambda n: n["id"]), "links": links, "groups": [], "config": {},
        "extra": {"ds": {"scale": 0.6, "offset": [0, 0]}, "safet2i_description": title}, "version": 0.4,
    }


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 64
    object_info = json.loads(Path(argv[0]).read_text())
    OUT.mkdir(exist_ok=True)
    for name, (title, nodes) in SPECS.items():
        wf = build(title, nodes, object_info)
        (OUT / f"{name}.json").write_text(json.dumps(wf, indent=1) + "\n")
        print(f"wrote example_workflows/{name}.json ({len(nodes)} nodes, {len(wf['links'])} links)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
