"""SD3, Flux.1 (dev, schnell), Qwen-Image and Wan 2.1 T2V in a real ComfyUI with tiny random models.

Files come from ``make_tiny_families.py`` (run once per session with ComfyUI's interpreter into the
server's model folders); the text encoders and the tiny Flux / Qwen-Image models come from the
test-only nodes of ``comfy_pack_tiny_families.py`` (installed by conftest like every
``comfy_pack_*.py``); everything else is stock ComfyUI nodes. Each workflow is the family's
customary graph: model sampling node, empty latent, KSampler, VAEDecode, Save*.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.integration

POS = "a photo of a woman standing on a sunny beach"
OTHER = "a nude figure drawing in a quiet museum hall"
NEG = "blurry, low quality"


@pytest.fixture(scope="session")
def family_files(comfy) -> dict:
    """make_tiny_families.py's JSON summary; its files are in the server's model folders."""
    from .conftest import _comfy_env

    path, python = _comfy_env()
    res = subprocess.run(
        [python, str(Path(__file__).with_name("make_tiny_families.py")), str(comfy.base)],
        cwd=path,
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_ok(comfy, g: dict) -> dict:
    entry = comfy.run(g, timeout=300)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:4000] + comfy.log_tail()
    return entry


def pixels(comfy, entry, node: str) -> np.ndarray:
    from PIL import Image

    return np.stack(
        [
            np.asarray(Image.open(comfy.output_dir / im["subfolder"] / im["filename"])).astype(int)
            for im in entry["outputs"][node]["images"]
        ]
    )


def info(entry, node: str = "info") -> dict:
    return json.loads(entry["outputs"][node]["text"][0])


def graph(
    model: dict,
    clip: str,
    sampling: dict | None,
    latent: dict,
    vae: str,
    text: str = POS,
    cfg: float = 1.0,
    steps: int = 2,
    guidance: float | None = None,
    save: str = "SaveImage",
    seed: int = 5,
    extra: dict | None = None,
) -> dict:
    """API graph: model node(s) -> [sampling patch] -> KSampler <- CLIPTextEncode x2 -> VAEDecode -> save.

    ``model``: nodes whose id "m" gives MODEL at output 0 (and may give VAE at "m"/2 when ``vae``
    is ``"ckpt"``). ``guidance``: FluxGuidance on the positive conditioning.
    """
    g = dict(model)
    g["clip"] = {"class_type": "SafeT2ITestTinyCLIP", "inputs": {"family": clip, "seed": 0}}
    g["pos"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["clip", 0], "text": text}}
    g["neg"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["clip", 0], "text": NEG}}
    positive, m = ["pos", 0], ["m", 0]
    if guidance is not None:
        g["guid"] = {"class_type": "FluxGuidance", "inputs": {"conditioning": positive, "guidance": guidance}}
        positive = ["guid", 0]
    if sampling:
        g["ms"] = {"class_type": sampling["class_type"], "inputs": {"model": m, **sampling["inputs"]}}
        m = ["ms", 0]
    g["info"] = {"class_type": "SafeT2ITestModelInfo", "inputs": {"model": m}}
    g["lat"] = latent
    g["ks"] = {
        "class_type": "KSampler",
        "inputs": {
            "model": m,
            "positive": positive,
            "negative": ["neg", 0],
            "latent_image": ["lat", 0],
            "seed": seed,
            "steps": steps,
            "cfg": cfg,
            "sampler_name": "euler",
            "scheduler": "simple",
            "denoise": 1.0,
        },
    }
    if vae == "ckpt":
        vae_out = ["m", 2]
    else:
        g["vae"] = {"class_type": "VAELoader", "inputs": {"vae_name": vae}}
        vae_out = ["vae", 0]
    g["dec"] = {"class_type": "VAEDecode", "inputs": {"samples": ["ks", 0], "vae": vae_out}}
    g["save"] = {"class_type": "SaveImage", "inputs": {"images": ["dec", 0], "filename_prefix": "fam"}}
    if save == "SaveAnimatedWEBP":
        g["webp"] = {
            "class_type": "SaveAnimatedWEBP",
            "inputs": {
                "images": ["dec", 0],
                "filename_prefix": "fam_video",
                "fps": 16.0,
                "lossless": False,
                "quality": 80,
                "method": "default",
            },
        }
    g.update(extra or {})
    return g


def unet(name: str) -> dict:
    return {"m": {"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": "default"}}}


def tiny(family: str, seed: int = 0) -> dict:
    return {"m": {"class_type": "SafeT2ITestTinyModel", "inputs": {"family": family, "seed": seed}}}


SD3_LATENT = {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
SD3_SAMPLING = {"class_type": "ModelSamplingSD3", "inputs": {"shift": 3.0}}
FLUX_SAMPLING = {
    "class_type": "ModelSamplingFlux",
    "inputs": {"max_shift": 1.15, "base_shift": 0.5, "width": 64, "height": 64},
}
WAN_LATENT = {
    "class_type": "EmptyHunyuanLatentVideo",
    "inputs": {"width": 32, "height": 32, "length": 5, "batch_size": 1},
}


def sd3(model=None, **kw) -> dict:
    kw.setdefault("vae", "tiny_taesd16.safetensors")
    return graph(model or unet("tiny_sd3.safetensors"), "sd3", SD3_SAMPLING, SD3_LATENT, cfg=4.0, **kw)


def flux(model=None, guidance=3.5, **kw) -> dict:
    return graph(
        model or tiny("flux_dev"),
        "flux",
        FLUX_SAMPLING,
        SD3_LATENT,
        "tiny_taesd16.safetensors",
        guidance=guidance,
        **kw,
    )


def qwen(**kw) -> dict:
    return graph(
        tiny("qwen_image"),
        "qwen_image",
        {"class_type": "ModelSamplingAuraFlow", "inputs": {"shift": 3.1}},
        SD3_LATENT,
        "tiny_wan21_vae.safetensors",
        cfg=2.5,
        **kw,
    )


def wan(**kw) -> dict:
    return graph(
        unet("tiny_wan21_t2v.safetensors"),
        "wan",
        {"class_type": "ModelSamplingSD3", "inputs": {"shift": 8.0}},
        WAN_LATENT,
        "tiny_wan21_vae.safetensors",
        cfg=5.0,
        save="SaveAnimatedWEBP",
        **kw,
    )


def assert_image(px: np.ndarray, shape: tuple) -> None:
    """Shape, and a texture rather than a flat or clipped picture (a NaN latent decodes to one colour)."""
    assert px.shape == shape, px.shape
    assert px.std() > 10, "flat image"
    assert ((px == 0) | (px == 255)).mean() < 0.6, "mostly clipped pixels"


def test_files_are_detected(family_files):
    assert {k: v["detected"] for k, v in family_files.items()} == {
        "sd3": "SD3",
        "sd35": "SD3",
        "flux_dev": "Flux",
        "flux_schnell": "FluxSchnell",
        "qwen_image": "QwenImage",
        "wan21_t2v": "WAN21_T2V",
    }
    assert family_files["wan21_t2v"]["diffusion_models"] == ["tiny_wan21_t2v.safetensors"]


def test_sd3_unet_checkpoint_and_node_routes_agree(comfy, family_files):
    a = run_ok(comfy, sd3())
    got = info(a)
    assert got["model_config"] == "SD3" and got["model_base"] == "SD3"
    assert "ModelSamplingDiscreteFlow" in got["model_sampling"] and got["shift"] == 3.0
    assert got["unet_config"]["depth"] == 2 and got["params"] < 3_000_000
    img = pixels(comfy, a, "save")
    assert_image(img, (1, 64, 64, 3))
    ckpt = {"m": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd3.safetensors"}}}
    for other in (sd3(model=ckpt, vae="ckpt"), sd3(model=tiny("sd3"))):
        assert np.array_equal(pixels(comfy, run_ok(comfy, other), "save"), img)
    assert np.abs(pixels(comfy, run_ok(comfy, sd3(text=OTHER)), "save") - img).max() > 3


def test_sd35_layout(comfy, family_files):
    a = run_ok(comfy, sd3(model=unet("tiny_sd35.safetensors")))
    got = info(a)
    assert got["model_config"] == "SD3" and "ModelSamplingDiscreteFlow" in got["model_sampling"]
    assert got["unet_config"]["qk_norm"] == "rms" and got["unet_config"]["x_block_self_attn_layers"] == [0]
    assert_image(pixels(comfy, a, "save"), (1, 64, 64, 3))


def test_flux_dev_guidance_is_live(comfy, family_files):
    a = run_ok(comfy, flux())
    got = info(a)
    assert got["model_config"] == "Flux" and got["model_type"] == "FLUX"
    assert "ModelSamplingFlux" in got["model_sampling"] and got["unet_config"]["guidance_embed"] is True
    img = pixels(comfy, a, "save")
    assert_image(img, (1, 64, 64, 3))
    assert np.abs(pixels(comfy, run_ok(comfy, flux(guidance=1.0)), "save") - img).max() > 3
    assert np.abs(pixels(comfy, run_ok(comfy, flux(text=OTHER)), "save") - img).max() > 3


def test_flux_schnell(comfy, family_files):
    a = run_ok(comfy, graph(tiny("flux_schnell"), "flux", None, SD3_LATENT, "tiny_taesd16.safetensors"))
    got = info(a)
    assert got["model_config"] == "FluxSchnell" and got["model_sampling"][:2] == [
        "ModelSampling",
        "ModelSamplingDiscreteFlow",
    ]
    assert got["shift"] == 1.0 and got["multiplier"] == 1.0
    assert_image(pixels(comfy, a, "save"), (1, 64, 64, 3))


def test_qwen_image(comfy, family_files):
    a = run_ok(comfy, qwen())
    got = info(a)
    assert got["model_config"] == "QwenImage" and "ModelSamplingDiscreteFlow" in got["model_sampling"]
    assert got["shift"] == 3.1 and got["multiplier"] == 1.0  # ModelSamplingAuraFlow
    img = pixels(comfy, a, "save")
    assert_image(img, (1, 64, 64, 3))
    assert np.abs(pixels(comfy, run_ok(comfy, qwen(text=OTHER)), "save") - img).max() > 3
    # the stock-width file (0 blocks) loads through UNETLoader as QwenImage with flux sampling
    det = {
        **unet("tiny_qwen_image_detect.safetensors"),
        "info": {"class_type": "SafeT2ITestModelInfo", "inputs": {"model": ["m", 0]}},
    }
    got = info(run_ok(comfy, det))
    assert got["model_config"] == "QwenImage" and "ModelSamplingFlux" in got["model_sampling"]
    assert got["unet_config"]["num_layers"] == 0


def test_wan21_t2v_frames(comfy, family_files):
    a = run_ok(comfy, wan())
    got = info(a)
    assert got["model_config"] == "WAN21_T2V" and got["model_base"] == "WAN21"
    assert "ModelSamplingDiscreteFlow" in got["model_sampling"] and got["shift"] == 8.0
    frames = pixels(comfy, a, "save")
    assert_image(frames, (5, 32, 32, 3))
    (webp,) = a["outputs"]["webp"]["images"]
    assert (comfy.output_dir / webp["subfolder"] / webp["filename"]).stat().st_size > 0
    assert np.abs(pixels(comfy, run_ok(comfy, wan(text=OTHER)), "save") - frames).max() > 3


@pytest.mark.skipif(
    not os.environ.get("SAFET2I_TEST_FLUX_DETECT"),
    reason="opt-in (SAFET2I_TEST_FLUX_DETECT=1): writes and loads an 800 MB Flux file, ~40 s",
)
def test_flux_dev_stock_width_file_is_detected(comfy, family_files, tmp_path):
    from .conftest import _comfy_env

    path, python = _comfy_env()
    subprocess.run(
        [python, str(Path(__file__).with_name("make_tiny_families.py")), str(tmp_path), "--flux-detect"],
        cwd=path,
        check=True,
        capture_output=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    big = comfy.base / "diffusion_models" / "tiny_flux_dev_detect.safetensors"
    (tmp_path / "diffusion_models" / big.name).rename(big)
    det = {**unet(big.name), "info": {"class_type": "SafeT2ITestModelInfo", "inputs": {"model": ["m", 0]}}}
    try:
        got = info(run_ok(comfy, det))
    finally:
        big.unlink()
    assert got["model_config"] == "Flux" and "ModelSamplingFlux" in got["model_sampling"]
    assert got["unet_config"]["hidden_size"] == 3072 and got["unet_config"]["depth"] == 1
