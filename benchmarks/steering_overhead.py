"""Time of one SAFREE-style steered generation vs an unsteered one on the tiny SD1.x
model in ComfyUI, same run, concept subspace already cached (as for every prompt after the
first); prints the ratio, never asserts. Target (issue #4): <= 1.05x at 20 steps, 512 px
equivalent work per step is not available on CPU, so the default is 128 px.

    COMFYUI_PATH=/path/to/ComfyUI $COMFYUI_PYTHON benchmarks/steering_overhead.py [--steps 20] [--size 128]
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
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--checkpoint")
    args = ap.parse_args(argv)
    comfy_path = os.environ.get("COMFYUI_PATH") or sys.exit("set COMFYUI_PATH and run with ComfyUI's Python")
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
    from safet2i_pack.nodes.steering_nodes import SafeT2IPromptSteer

    model, clip = comfy.sd.load_checkpoint_guess_config(ckpt, output_vae=True, output_clip=True)[:2]
    text = "a photo of a nude woman on a sunny beach"
    neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    latent = torch.zeros(1, 4, args.size // 8, args.size // 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
    SafeT2IPromptSteer.execute(clip, text, "nudity")  # builds and caches the concept subspace

    def plain():
        pos = clip.encode_from_tokens_scheduled(clip.tokenize(text))
        comfy.sample.sample(model, noise, args.steps, 7.0, "euler", "normal", pos, neg, latent, disable_pbar=True, seed=0)

    def steered():
        pos = SafeT2IPromptSteer.execute(clip, text, "nudity", negative=neg).args[0]
        comfy.sample.sample(model, noise, args.steps, 7.0, "euler", "normal", pos, neg, latent, disable_pbar=True, seed=0)

    def encode_plain():
        clip.encode_from_tokens_scheduled(clip.tokenize(text))

    def encode_steered():
        SafeT2IPromptSteer.execute(clip, text, "nudity", negative=neg)

    pos_plain = clip.encode_from_tokens_scheduled(clip.tokenize(text))
    pos_steered = SafeT2IPromptSteer.execute(clip, text, "nudity", negative=neg).args[0]

    def sample_plain():
        comfy.sample.sample(model, noise, args.steps, 7.0, "euler", "normal", pos_plain, neg, latent, disable_pbar=True,
                            seed=0)

    def sample_steered():
        comfy.sample.sample(model, noise, args.steps, 7.0, "euler", "normal", pos_steered, neg, latent,
                            disable_pbar=True, seed=0)

    fns = {"unsteered": plain, "SAFREE-style steered": steered,
           "prompt encode only": encode_plain, "steered encode only": encode_steered,
           "sampling only, plain conditioning": sample_plain, "sampling only, steered conditioning": sample_steered}
    runs = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(args.repeats):  # interleaved, so load changes hit both alike
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            runs[name].append(time.perf_counter() - t0)
    times = {name: statistics.median(r) for name, r in runs.items()}
    base = times["unsteered"]
    print(f"tiny SD1.x, {args.size}px, {args.steps} steps, CPU, median of {args.repeats}; concept subspace cached")
    for name in ("unsteered", "SAFREE-style steered"):
        t = times[name]
        print(f"{name:22s} {t:7.3f} s   {t / base:5.2f}x {'(target <= 1.05x)' if name != 'unsteered' else ''}")
    for name in ("sampling only, plain conditioning", "sampling only, steered conditioning"):
        print(f"{name:36s} {times[name]:7.3f} s")
    extra = times["steered encode only"] - times["prompt encode only"]
    print(f"text side: plain encode {times['prompt encode only']:.3f} s, steered encode "
          f"{times['steered encode only']:.3f} s (+{extra:.3f} s = {extra / base:.1%} of an unsteered run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
