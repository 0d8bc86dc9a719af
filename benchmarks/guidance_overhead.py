"""Wall time of a ComfyUI sampling run with each safety-guidance method vs plain CFG:
same tiny SD1.x checkpoint, same seed, same run; prints ratios, never asserts.

Targets (issue #3): SLD and SP-Guard-style <= 1.5x plain CFG (three conditionings in one
UNet batch instead of two), Detect-and-Guide-style <= 1.6x, on the tiny model on CPU.

Run with ComfyUI's interpreter:
    COMFYUI_PATH=/path/to/ComfyUI $COMFYUI_PYTHON benchmarks/guidance_overhead.py [--size 128] [--steps 10]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--checkpoint", help="an SD1.x checkpoint (default: a tiny random one is made)")
    args = ap.parse_args(argv)
    comfy_path = os.environ.get("COMFYUI_PATH")
    if not comfy_path:
        sys.exit("set COMFYUI_PATH to a ComfyUI checkout and run with its Python")
    sys.path.insert(0, comfy_path)
    os.chdir(comfy_path)
    from comfy.cli_args import args as comfy_args

    comfy_args.cpu = True
    import torch

    import comfy.sample
    import comfy.sd

    ckpt = args.checkpoint
    if not ckpt:
        ckpt = str(Path(tempfile.mkdtemp()) / "tiny_sd15.safetensors")
        subprocess.run([sys.executable, str(REPO / "tests/integration/make_tiny_sd15.py"), ckpt], check=True)
    spec = importlib.util.spec_from_file_location("safet2i_pack", REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["safet2i_pack"] = pack
    spec.loader.exec_module(pack)
    from safet2i_pack.nodes import guidance_nodes as gn

    model, clip, _vae = comfy.sd.load_checkpoint_guess_config(ckpt, output_vae=True, output_clip=True)[:3]

    def enc(text):
        return clip.encode_from_tokens_scheduled(clip.tokenize(text))

    pos, neg, concept = enc("a photo of a person"), enc("blurry"), enc("nudity, sexual")
    variants = {
        "plain CFG": model,
        "SLD (MAX)": gn.SafeT2ISLD.execute(model, concept, "MAX").args[0],
        "SP-Guard-style": gn.SafeT2ISPGuard.execute(model, concept).args[0],
        "Detect-and-Guide-style": gn.SafeT2IDetectGuide.execute(model, clip, "nudity, sexual").args[0],
    }
    latent = torch.zeros(args.batch, 4, args.size // 8, args.size // 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))

    def sample(m):
        return comfy.sample.sample(m, noise, args.steps, 7.0, "euler", "normal", pos, neg, latent,
                                   disable_pbar=True, seed=0)

    times = {}
    for name, m in variants.items():
        sample(m)  # warm-up
        runs = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            sample(m)
            runs.append(time.perf_counter() - t0)
        times[name] = statistics.median(runs)
    base = times["plain CFG"]
    print(f"tiny SD1.x, {args.size}px, batch {args.batch}, {args.steps} steps, CPU, median of {args.repeats}")
    for name, t in times.items():
        target = {"plain CFG": "", "Detect-and-Guide-style": "(target <= 1.6x)"}.get(name, "(target <= 1.5x)")
        print(f"{name:24s} {t:7.3f} s   {t / base:5.2f}x {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
