"""Write tiny random SD3 / Wan 2.1 / Qwen-Image (/ Flux) files that ComfyUI's stock loaders detect.

Run with ComfyUI's interpreter and ComfyUI on sys.path (cwd = COMFYUI_PATH):
    python make_tiny_families.py OUTDIR [--seed N] [--flux-detect]

Writes into OUTDIR's model folders (use them as ``diffusion_models`` / ``checkpoints`` / ``vae``
in extra_model_paths) and prints one JSON line: file names per family, the ComfyUI class each
file was detected as, and the node that gives each family its CLIP.

* ``diffusion_models/tiny_sd3.safetensors``: MMDiT depth 2 (hidden 64*depth = 128 is forced by
  detection), context 4096 -> 128 (4096: SD3ClipModel pads CLIP-L|G to it), pooled 80, fp32.
* ``diffusion_models/tiny_sd35.safetensors``: the same in the SD3.5 layout (RMS q/k norm, block 0
  with a second image self-attention); detected as the same ``SD3`` class.
* ``checkpoints/tiny_sd3.safetensors``: the same MMDiT + the TAESD-16 VAE (for
  ``CheckpointLoaderSimple``; no text encoders, as they cannot be tiny, see the node module).
* ``diffusion_models/tiny_wan21_t2v.safetensors``: WanModel dim 128 (heads = dim // 128 is
  forced), one block, text_dim 4096 (class default), fp32.
* ``diffusion_models/tiny_qwen_image_detect.safetensors``: QwenImage with 0 blocks (inner 3072 /
  text 3584 are class defaults): detection and model sampling only, the text path is dead.
* ``diffusion_models/tiny_flux_dev_detect.safetensors`` (``--flux-detect`` only): Flux with one
  double block at the forced 3072 width, 400M parameters, 800 MB in fp16.
* ``vae/tiny_taesd16.safetensors``: TAESD with 16 latent channels (SD3 and Flux latents).
* ``vae/tiny_wan21_vae.safetensors``: the Wan 2.1 VAE (Wan and Qwen-Image latents); all of its
  sizes are fixed by comfy/sd.py, so it is full size (127M parameters, fp16, 254 MB).

Tiny Flux and Qwen-Image models with working text paths, and every family's text encoder, come
from the test-only nodes in ``comfy_pack_tiny_families.py`` (see there for why).
Each file is loaded back and checked with ComfyUI's own ``model_detection`` before returning.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.getcwd())
sys.path.insert(0, str(Path(__file__).resolve().parent))

from comfy.cli_args import args

args.cpu = True

import comfy.model_detection
import comfy_pack_tiny_families as T
import torch
from safetensors.torch import load_file, save_file


def _save(sd: dict, path: Path, dtype) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to(dtype).contiguous() for k, v in sd.items()}, str(path))


def _detected(path: Path, prefix: str = "") -> tuple[str, dict]:
    sd = load_file(str(path))
    if prefix:
        sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    mc = comfy.model_detection.model_config_from_unet(sd, "")
    assert mc is not None, f"{path.name}: ComfyUI detects no model"
    return type(mc).__name__, comfy.model_detection.detect_unet_config(sd, "")


def _same(a: dict, b: dict) -> bool:
    return json.dumps(a, sort_keys=True, default=list) == json.dumps(b, sort_keys=True, default=list)


def main(out: str, seed: int = 0, flux_detect: bool = False) -> dict:
    torch.set_grad_enabled(False)
    root = Path(out)
    dm, ck, vae = root / "diffusion_models", root / "checkpoints", root / "vae"
    summary: dict = {}

    taesd = T.taesd16_state_dict(seed + 100)
    _save(taesd, vae / "tiny_taesd16.safetensors", torch.float32)
    _save(T.wan21_vae_state_dict(seed + 101), vae / "tiny_wan21_vae.safetensors", torch.float16)

    for name, fname in (
        ("sd3", "tiny_sd3.safetensors"),
        ("sd35", "tiny_sd35.safetensors"),
        ("wan21_t2v", "tiny_wan21_t2v.safetensors"),
    ):
        sd = T.unet_state_dict(name, seed)
        _save(sd, dm / fname, torch.float32)
        cls, cfg = _detected(dm / fname)
        assert cls == T.EXPECTED_CLASS[name], (fname, cls)
        assert _same(cfg, T.UNET_CONFIGS[name]), (fname, cfg)
        if name == "sd3":
            ckpt = {f"model.diffusion_model.{k}": v for k, v in sd.items()}
            ckpt.update({f"first_stage_model.{k}": v for k, v in taesd.items()})
            _save(ckpt, ck / fname, torch.float32)
            assert _detected(ck / fname, "model.diffusion_model.")[0] == "SD3"

    detect = [("qwen_image", "tiny_qwen_image_detect.safetensors")]
    if flux_detect:
        detect.append(("flux_dev", "tiny_flux_dev_detect.safetensors"))
    for name, fname in detect:
        cfg = T.DETECT_CONFIGS[name]
        _save(T.unet_state_dict(name, seed, config=cfg), dm / fname, torch.float16)
        cls, got = _detected(dm / fname)
        assert cls == T.EXPECTED_CLASS[name] and _same(got, cfg), (fname, cls, got)

    def entry(clip, model, vae_name, **files):
        return {
            "clip": f"SafeT2ITestTinyCLIP(family={clip!r})",
            "model_node": f"SafeT2ITestTinyModel(family={model!r})",
            "vae": vae_name,
            **files,
        }

    summary["sd3"] = entry(
        "sd3",
        "sd3",
        "tiny_taesd16.safetensors",
        diffusion_models=["tiny_sd3.safetensors"],
        checkpoints=["tiny_sd3.safetensors"],
        detected="SD3",
    )
    summary["sd35"] = entry(
        "sd3", "sd35", "tiny_taesd16.safetensors", diffusion_models=["tiny_sd35.safetensors"], detected="SD3"
    )
    summary["flux_dev"] = entry(
        "flux",
        "flux_dev",
        "tiny_taesd16.safetensors",
        diffusion_models=["tiny_flux_dev_detect.safetensors"] if flux_detect else [],
        detected="Flux",
    )
    summary["flux_schnell"] = entry(
        "flux", "flux_schnell", "tiny_taesd16.safetensors", diffusion_models=[], detected="FluxSchnell"
    )
    summary["qwen_image"] = entry(
        "qwen_image",
        "qwen_image",
        "tiny_wan21_vae.safetensors",
        diffusion_models=["tiny_qwen_image_detect.safetensors"],
        detected="QwenImage",
    )
    summary["wan21_t2v"] = entry(
        "wan",
        "wan21_t2v",
        "tiny_wan21_vae.safetensors",
        diffusion_models=["tiny_wan21_t2v.safetensors"],
        detected="WAN21_T2V",
    )
    return summary


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--flux-detect", action="store_true", help="also write the 400M-parameter Flux detection file"
    )
    a = ap.parse_args()
    print(json.dumps(main(a.out, a.seed, a.flux_detect)))
