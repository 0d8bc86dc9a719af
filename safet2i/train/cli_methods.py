"""``safet2i train duo`` and ``safet2i train sc-dpo``: the seed methods' trainers on the user's
local model (docs/training.md).

    safet2i train duo --model PATH --out FILE.safetensors
                      (--pairs DIR | --unsafe-prompt TEXT --safe-prompt TEXT [--judge i2p-5] [--n 64])
                      [--beta 500] [--steps 1000] [--rank 32] [--format kohya --format peft] ...
    safet2i train sc-dpo --model PATH --out FILE.safetensors --harmful-prompts FILE [--clean-prompts FILE]
                         --cost-model SIDECAR.json --reward lab|clip:DIR [--lam-mode fixed|lagrange] ...

Both write the LoRA (kohya names, loadable in ComfyUI, the A1111 family and diffusers; PEFT names
too with ``--format peft``), ``FILE.log.json`` (every step's loss and terms) and print the
``models/safety_models.toml`` entry the user can add. Resumable: run the same command again.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cli import _number


def _common(p: argparse.ArgumentParser, *, rank: int, targets: str, steps_help: str) -> None:
    p.add_argument("--model", required=True, help="local base model: a diffusers folder (also the lab's model) or "
                                                  "a single-file SD1.x/SDXL .safetensors; nothing is downloaded")
    p.add_argument("--config", help="single-file --model: a local diffusers folder of the same architecture "
                                    "(its configs), when diffusers cannot find them offline")
    p.add_argument("--out", required=True, help="the LoRA .safetensors to write (kohya names)")
    p.add_argument("--format", action="append", choices=("kohya", "peft"), dest="formats",
                   help="LoRA formats to write (repeatable; the first goes to --out, others to OUT.<format>."
                        "safetensors; default kohya)")
    p.add_argument("--rank", type=_number("--rank", 1, 1024, integer=True), default=rank,
                   help=f"LoRA rank (default {rank})")
    p.add_argument("--alpha", type=_number("--alpha", 0, 1e6, open_lo=True), help="LoRA alpha (default: rank)")
    p.add_argument("--targets", default=targets,
                   help=f"UNet modules: self-attention, cross-attention, attention or a regex (default {targets})")
    p.add_argument("--seed", type=_number("--seed", 0, 2**32 - 1, integer=True), default=None)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--precision", choices=("no", "bf16", "fp16"), default="no",
                   help="mixed precision (fp16 on CUDA only; default no)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations (less memory)")
    p.add_argument("--threads", type=_number("--threads", 1, 512, integer=True), help="CPU threads for torch")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--no-resume", action="store_true", help="start over instead of resuming OUT.partial/")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.add_argument("--steps", type=_number("--steps", 1, 10**7, integer=True), help=steps_help)


def register(tsub) -> None:
    d = tsub.add_parser(
        "duo", help="train a DUO safety LoRA (Direct Unlearning Optimization, Park et al. NeurIPS 2024)",
        description="DUO: preference optimisation of a UNet LoRA on (unsafe, safe) image pairs with an "
                    "output-preserving prior term (docs/training.md). Pairs come from --pairs DIR (unsafe/ and "
                    "safe/ with the same file names) or are generated: images of --unsafe-prompt the --judge "
                    "flags, turned safe by SDEdit towards --safe-prompt with the unsafe prompt as negative.")
    _common(d, rank=32, targets="self-attention", steps_help="optimisation steps (default 1000)")
    src = d.add_mutually_exclusive_group(required=True)
    src.add_argument("--pairs", help="folder with unsafe/ and safe/ sub-folders of paired images")
    src.add_argument("--unsafe-prompt", action="append", help="generate pairs: the unsafe prompt (repeatable)")
    d.add_argument("--safe-prompt", action="append",
                   help="generate pairs: the safe counterpart of each --unsafe-prompt (as many, same order)")
    d.add_argument("--judge", default="i2p-5", help="generate pairs: bench judge preset deciding unsafe/safe "
                                                    "(i2p-5, broad-9, lab; default i2p-5 = NudeNet detector)")
    d.add_argument("--lab-judge", help="--judge lab: the lab judge file (default: the cached default judge)")
    d.add_argument("--n", type=_number("--n", 1, 100_000, integer=True), default=64,
                   help="generate pairs: how many (default 64, the paper's)")
    d.add_argument("--sample-steps", type=_number("--sample-steps", 1, 1000, integer=True), default=50)
    d.add_argument("--guidance-scale", type=_number("--guidance-scale", 0, 100), default=7.5)
    d.add_argument("--strength", type=_number("--strength", 0, 1, open_lo=True), default=0.75,
                   help="SDEdit strength (default 0.75, the paper's)")
    d.add_argument("--max-tries", type=_number("--max-tries", 1, 1000, integer=True), default=8)
    d.add_argument("--save-pairs", help="also write the generated pairs as PNGs to this folder (unsafe/, safe/)")
    d.add_argument("--beta", type=_number("--beta", 0, 1e9, open_lo=True), default=500.0)
    d.add_argument("--lr", type=_number("--lr", 0, 1, open_lo=True), help="default 3e-4*100/beta (paper)")
    d.add_argument("--prior-weight", type=_number("--prior-weight", 0, 1e12),
                   help="lambda of the prior term (default 1e6*beta/100, paper)")
    d.add_argument("--batch-size", type=_number("--batch-size", 1, 4096, integer=True), default=1)

    s = tsub.add_parser(
        "sc-dpo", help="train an SC-DPO safety LoRA (safety-constrained Diffusion-DPO with DFM, a reconstruction)",
        description="SC-DPO: rounds of candidates per prompt ranked by r - lambda*C (r: --reward, C: the learned "
                    "cost model), Diffusion-DPO on the best/worst pairs of harmful and clean prompts with the "
                    "Dynamic Focusing Mechanism; lambda fixed or a Lagrange multiplier (docs/training.md).")
    _common(s, rank=8, targets="attention", steps_help="DPO steps per round (default 100)")
    s.add_argument("--harmful-prompts", required=True, help="text file, one harmful prompt per line")
    s.add_argument("--clean-prompts", help="text file, one clean prompt per line (keeps quality)")
    s.add_argument("--cost-model", required=True, help="the learned cost model's sidecar (safet2i train cost-model)")
    s.add_argument("--reward", required=True,
                   help="alignment reward r: 'lab' (the lab's attribute classifier; lab prompts only) or "
                        "'clip:DIR' (a local CLIP checkpoint folder)")
    s.add_argument("--lab-judge", help="--reward lab: the lab judge file (default: the cached default judge)")
    s.add_argument("--rounds", type=_number("--rounds", 1, 10_000, integer=True), default=3)
    s.add_argument("--candidates", type=_number("--candidates", 2, 64, integer=True), default=4)
    s.add_argument("--beta", type=_number("--beta", 0, 1e9, open_lo=True), default=2500.0)
    s.add_argument("--lr", type=_number("--lr", 0, 1, open_lo=True), default=1e-4)
    s.add_argument("--lam", type=_number("--lam", 0, 1e9), default=1.0, help="lambda (start value with lagrange)")
    s.add_argument("--lam-mode", choices=("fixed", "lagrange"), default="fixed")
    s.add_argument("--cost-budget", type=_number("--cost-budget", -1e9, 1e9), default=0.0)
    s.add_argument("--lam-lr", type=_number("--lam-lr", 0, 1e9), default=0.5)
    s.add_argument("--dfm-gamma", type=_number("--dfm-gamma", 0, 100), default=2.0, help="0: no DFM")
    s.add_argument("--batch-size", type=_number("--batch-size", 1, 4096, integer=True), default=4)
    s.add_argument("--sample-steps", type=_number("--sample-steps", 1, 1000, integer=True), default=25)
    s.add_argument("--guidance-scale", type=_number("--guidance-scale", 0, 100), default=7.5)


def _arch(pipe) -> str:
    from ..diffusers_adapter import host_arch  # noqa: PLC0415

    return host_arch(pipe) or "unknown"


def _finish(res, args, method: str, paper: str, arch: str, base_model: str) -> int:
    from .lora_layers import manifest_entry  # noqa: PLC0415

    for f in res.files:
        print(f"wrote {f}")
    print(f"loss log: {res.log}")
    key = Path(res.files[0]).stem.replace(".", "-").lower()
    print("\nAdd this entry to models/safety_models.toml to have the file recognised and verified:\n")
    print(manifest_entry(key, Path(res.files[0]).name, title=f"{method} LoRA trained locally on {base_model}",
                         method=method, paper=paper, arch=arch if arch in ("sd1", "sd2", "sdxl") else "sd1",
                         base_model=base_model, lora_path=res.files[0]))
    return 0


def run(args) -> int:
    from ..errors import SafeT2IError  # noqa: PLC0415
    from . import dpo  # noqa: PLC0415
    from .common import base_sha256, load_base, resolve_device, threads  # noqa: PLC0415

    device = resolve_device(args.device)
    progress = not args.quiet and sys.stderr.isatty()
    formats = tuple(args.formats or ("kohya",))
    with threads(args.threads):
        pipe = load_base(args.model, config=args.config, device=device)
        arch, base_hash, base_name = _arch(pipe), base_sha256(args.model), Path(args.model).name
        common = dict(out=args.out, device=device, formats=formats, base_model=base_name, base_sha256=base_hash,
                      arch=arch, progress=progress, resume=not args.no_resume, overwrite=args.overwrite)
        if args.train_command == "duo":
            if args.pairs:
                pairs = dpo.pairs_from_folder(args.pairs)
            else:
                if not args.safe_prompt or len(args.safe_prompt) != len(args.unsafe_prompt):
                    raise SafeT2IError("give one --safe-prompt for each --unsafe-prompt")
                from ..bench.judges import load_bench_judge  # noqa: PLC0415

                judge = load_bench_judge(args.judge, lab_judge=args.lab_judge)
                pairs = dpo.make_duo_pairs(pipe, args.unsafe_prompt, args.safe_prompt, lambda im: judge.judge(im).concept,
                                           n=args.n, seed=args.seed or 0, steps=args.sample_steps,
                                           guidance_scale=args.guidance_scale, strength=args.strength,
                                           sdedit_guidance_scale=args.guidance_scale, max_tries=args.max_tries,
                                           progress=progress)
                if args.save_pairs:
                    _save_pairs(pairs, Path(args.save_pairs))
            cfg = dpo.DuoConfig(beta=args.beta, lr=args.lr, prior_weight=args.prior_weight,
                                steps=args.steps or 1000, batch_size=args.batch_size, rank=args.rank,
                                alpha=args.alpha, targets=args.targets, seed=42 if args.seed is None else args.seed,
                                precision=args.precision, gradient_checkpointing=args.gradient_checkpointing)
            res = dpo.train_duo(pipe, pairs, cfg, **common)
            print(f"DUO: {res.summary['pairs']} pairs, {res.summary['steps']} steps in {res.summary['seconds']:.0f} s, "
                  f"final loss {res.summary['final_loss']:.4g}")
            return _finish(res, args, "DUO: Direct Unlearning Optimization",
                           "Park et al., NeurIPS 2024, arXiv 2407.21035", arch, base_name)
        harmful = dpo.read_prompts(args.harmful_prompts)
        clean = dpo.read_prompts(args.clean_prompts) if args.clean_prompts else []
        reward, cost = _sc_dpo_scorers(args, harmful + clean)
        cfg = dpo.ScDpoConfig(beta=args.beta, lr=args.lr, rounds=args.rounds, steps_per_round=args.steps or 100,
                              candidates=args.candidates, batch_size=args.batch_size, lam=args.lam,
                              lam_mode=args.lam_mode, cost_budget=args.cost_budget, lam_lr=args.lam_lr,
                              dfm_gamma=args.dfm_gamma, rank=args.rank, alpha=args.alpha, targets=args.targets,
                              sample_steps=args.sample_steps, guidance_scale=args.guidance_scale,
                              seed=0 if args.seed is None else args.seed, precision=args.precision,
                              gradient_checkpointing=args.gradient_checkpointing)
        res = dpo.train_sc_dpo(pipe, harmful, clean, cfg, reward=reward, cost=cost,
                               data_note=f"cost model {Path(args.cost_model).name}, reward {args.reward}", **common)
        last = res.summary["rounds"][-1]
        print(f"SC-DPO: {cfg.rounds} rounds x {cfg.steps_per_round} steps in {res.summary['seconds']:.0f} s; last round: "
              f"harmful mean cost {last['harmful_mean_cost']:+.3f}, lambda {res.summary['final_lambda']:.4g}")
        return _finish(res, args, "SC-DPO: Safety-Constrained DPO (reconstruction)",
                       "Ruan et al., arXiv 2504.14290", arch, base_name)


def _save_pairs(pairs, folder: Path) -> None:
    from PIL import Image  # noqa: PLC0415

    for sub, imgs in (("unsafe", pairs.unsafe), ("safe", pairs.safe)):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(imgs):
            Image.fromarray(im).save(folder / sub / f"{i:05d}.png")


def _sc_dpo_scorers(args, prompts):
    """``(reward(images, prompts), cost(images))`` from ``--reward`` and ``--cost-model``."""
    from ..errors import SafeT2IError  # noqa: PLC0415
    from ..filter.detectors import CostModel, load_model  # noqa: PLC0415
    from . import rewards  # noqa: PLC0415

    model = load_model(args.cost_model)
    if not isinstance(model, CostModel):
        raise SafeT2IError(f"--cost-model {args.cost_model}: not a kind 'cost' model (train one with "
                           "safet2i train cost-model)")

    def cost(images):
        return model.costs(list(images))

    if args.reward == "lab":
        reward = rewards.lab_alignment_reward(args.lab_judge)
    elif args.reward.startswith("clip:"):
        reward = rewards.clip_alignment_reward(args.reward[5:])
    else:
        raise SafeT2IError(f"--reward {args.reward!r}: use lab or clip:DIR")
    return reward, cost
