"""``safet2i train duo|sc-dpo|shielddiff|dag-tokens``: the seed methods' trainers on the user's
local model (docs/training.md).

    safet2i train duo --model PATH --out FILE.safetensors
                      (--pairs DIR | --unsafe-prompt TEXT --safe-prompt TEXT [--judge i2p-5] [--n 64])
                      [--beta 500] [--steps 1000] [--rank 32] [--format kohya --format peft] ...
    safet2i train sc-dpo --model PATH --out FILE.safetensors --harmful-prompts FILE [--clean-prompts FILE]
                         --cost-model SIDECAR.json --reward lab|clip:DIR [--lam-mode fixed|lagrange] ...
    safet2i train shielddiff --model PATH --out FILE.safetensors (--prompts FILE | --lab-prompts N)
                         (--cost-model SIDECAR.json | --detector nudenet) [--reward lab|clip:DIR|none] ...
    safet2i train dag-tokens --model PATH --out TOKENS.safetensors (--unsafe DIR [--safe DIR] | --lab) ...

The LoRA trainers write the LoRA (kohya names, loadable in ComfyUI, the A1111 family and diffusers; PEFT names
too with ``--format peft``), ``FILE.log.json`` (every step's loss and terms) and print the
``models/safety_models.toml`` entry the user can add. Resumable: run the same command again.
"""

from __future__ import annotations

import argparse
import contextlib
import json
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

    g = tsub.add_parser(
        "dag-tokens", help="optimise Detect-and-Guide guideline tokens (Stage 1, Li et al. CVPR 2025)",
        description="Optimise the guideline tokens' rows of the concept's conditioning so that their "
                    "cross-attention map matches unsafe-region masks (BCE + leak outside the mask + attention on "
                    "safe images). The output file replaces the raw concept tokens in SafeT2I's Detect-and-Guide-"
                    "style guidance (ComfyUI: guideline_tokens; diffusers: dag_tokens_kwargs). docs/training.md")
    g.add_argument("--model", required=True, help="local base model (diffusers folder or single-file .safetensors)")
    g.add_argument("--config", help="single-file --model: a local diffusers folder of the same architecture")
    g.add_argument("--out", required=True, help="the tokens .safetensors to write")
    gsrc = g.add_mutually_exclusive_group(required=True)
    gsrc.add_argument("--unsafe", help="folder of unsafe images, each NAME.png with its mask NAME.mask.png")
    gsrc.add_argument("--lab", action="store_true", help="the lab world's images and masks (--model a lab model)")
    g.add_argument("--safe", help="folder of safe images (attention on them is penalised)")
    g.add_argument("--size", type=_number("--size", 8, 4096, integer=True), help="resize images to SIZE x SIZE")
    g.add_argument("--concept", help="the guideline text (default 'nude person'; --lab: the world's concept)")
    g.add_argument("--lab-unsafe", type=_number("--lab-unsafe", 1, 10_000, integer=True), default=5)
    g.add_argument("--lab-safe", type=_number("--lab-safe", 0, 10_000, integer=True), default=3)
    g.add_argument("--steps", type=_number("--steps", 1, 10**7, integer=True),
                   help="optimisation steps (default 100 per training image)")
    g.add_argument("--lr", type=_number("--lr", 0, 1e6, open_lo=True), default=200.0)
    g.add_argument("--neg-weight", type=_number("--neg-weight", 0, 1e6), default=1.0)
    g.add_argument("--seed", type=_number("--seed", 0, 2**32 - 1, integer=True), default=0)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    g.add_argument("--precision", choices=("no", "bf16", "fp16"), default="no")
    g.add_argument("--threads", type=_number("--threads", 1, 512, integer=True))
    g.add_argument("--evaluate", action="store_true", help="report the IoU of the highlighted region against "
                                                          "the masks, optimised vs raw tokens")
    g.add_argument("--overwrite", action="store_true")
    g.add_argument("--no-resume", action="store_true")
    g.add_argument("--quiet", "-q", action="store_true")
    register_shielddiff(tsub)


def register_shielddiff(tsub) -> None:
    """``safet2i train shielddiff``."""
    from .shielddiff import COST_TRANSFORMS, REDUCTIONS  # noqa: PLC0415

    r = tsub.add_parser(
        "shielddiff", help="train a ShieldDiff-style safety LoRA by RL (DDPO-style PPO; Han et al. 2024)",
        description="ShieldDiff-style RL: each epoch samples K DDIM (eta 1) trajectories per prompt with the "
                    "current UNet LoRA, scores them with a safety reward (--cost-model or --detector) plus an "
                    "alignment reward (--reward lab|clip:DIR|none), normalises the rewards per prompt and "
                    "updates the LoRA with the PPO-clip loss on the stored transitions (docs/training.md). "
                    "Defaults are the public DDPO code's (ShieldDiff's own values are not public).")
    _common(r, rank=4, targets="attention",
            steps_help="DDIM steps per trajectory (default 50; the lab's 25 with --lab-prompts)")
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", help="text file, one (unsafe) prompt per line")
    src.add_argument("--lab-prompts", type=_number("--lab-prompts", 1, 10_000, integer=True),
                     help="N captions of each concept form (direct, synonym, indirect, misspelled) of the lab "
                          "world of --lab-judge (train split)")
    safety = r.add_mutually_exclusive_group(required=True)
    safety.add_argument("--cost-model", help="safety reward: a learned cost model's sidecar (safet2i train "
                                             "cost-model)")
    safety.add_argument("--detector", action="append",
                        help="safety reward: a filter model (built-in name such as nudenet, or a sidecar; "
                             "repeatable); reward 1 - the filter's graded cost under --policy")
    r.add_argument("--policy", default="strict-5", help="--detector: the filter policy (default strict-5)")
    r.add_argument("--cost-transform", choices=COST_TRANSFORMS, default="log-probability",
                   help="--cost-model: log-probability = log sigmoid(-C) (default), probability = sigmoid(-C), "
                        "negative-cost = -C")
    r.add_argument("--reward", default="lab",
                   help="alignment reward: 'lab' (the lab's attribute classifier; lab captions only), "
                        "'clip:DIR' (a local CLIP checkpoint folder) or 'none' (default lab)")
    r.add_argument("--lab-judge", help="the lab judge file (default: the cached default judge)")
    r.add_argument("--soft-alignment", action="store_true",
                   help="--reward lab: mean probability of each named attribute instead of the share recognised")
    r.add_argument("--epochs", type=_number("--epochs", 1, 10**6, integer=True), default=100)
    r.add_argument("--samples-per-prompt", "-k", type=_number("--samples-per-prompt", 2, 4096, integer=True),
                   default=8, help="trajectories per prompt and epoch (K, default 8)")
    r.add_argument("--guidance-scale", type=_number("--guidance-scale", 0, 100),
                   help="CFG scale (default 5; the lab's 3 with --lab-prompts)")
    r.add_argument("--eta", type=_number("--eta", 0, 1, open_lo=True), default=1.0)
    r.add_argument("--negative-prompt", default="")
    r.add_argument("--lr", type=_number("--lr", 0, 1, open_lo=True), default=3e-4)
    r.add_argument("--clip-range", type=_number("--clip-range", 0, 10, open_lo=True), default=1e-4)
    r.add_argument("--adv-clip", type=_number("--adv-clip", 0, 1e9, open_lo=True), default=5.0)
    r.add_argument("--inner-epochs", type=_number("--inner-epochs", 1, 1000, integer=True), default=1)
    r.add_argument("--timestep-fraction", type=_number("--timestep-fraction", 0, 1, open_lo=True), default=1.0)
    r.add_argument("--train-batch-size", type=_number("--train-batch-size", 1, 4096, integer=True), default=8,
                   help="trajectories per optimiser step (default 8)")
    r.add_argument("--sample-batch-size", type=_number("--sample-batch-size", 1, 4096, integer=True), default=8,
                   help="trajectories per UNet batch (default 8)")
    r.add_argument("--safety-weight", type=_number("--safety-weight", 0, 1e6), default=1.0)
    r.add_argument("--alignment-weight", type=_number("--alignment-weight", 0, 1e6), default=1.0)
    r.add_argument("--logprob", choices=REDUCTIONS, default="mean",
                   help="log-densities in the PPO ratio: mean over latent dimensions (DDPO, default) or sum")


def _run_shielddiff(args, progress: bool) -> int:
    import dataclasses  # noqa: PLC0415
    import json  # noqa: PLC0415

    from ..errors import SafeT2IError  # noqa: PLC0415
    from . import shielddiff as sd  # noqa: PLC0415
    from .common import load_base, resolve_device, threads  # noqa: PLC0415
    from .dpo import read_prompts  # noqa: PLC0415

    device = resolve_device(args.device)
    formats = tuple(args.formats or ("kohya",))
    with threads(args.threads):
        pipe = load_base(args.model, config=args.config, device=device)
        judge, attributes = None, {}
        if args.lab_prompts or args.reward == "lab":
            from ..lab.judge import AttributeClassifier, load_judge  # noqa: PLC0415

            judge = AttributeClassifier.load(args.lab_judge) if args.lab_judge else load_judge(train=False)
        if args.lab_prompts:
            from ..lab.world import CONCEPT_FORMS, World  # noqa: PLC0415

            world = World(judge.config.world)
            samples = [world.sample(i, form, "train") for i in range(args.lab_prompts) for form in CONCEPT_FORMS]
            prompts = [s.caption for s in samples]
            attributes = {s.caption: s.attributes for s in samples}
            config = sd.ShieldDiffConfig.for_lab(prompts)
        else:
            prompts = read_prompts(args.prompts)
            config = sd.ShieldDiffConfig(prompts=tuple(prompts))
        if args.cost_model:
            safety = sd.cost_model_reward(args.cost_model, transform=args.cost_transform)
        else:
            safety = sd.detector_reward(args.detector, args.policy)
        if args.reward == "lab":
            align = sd.lab_alignment_reward(judge, soft=args.soft_alignment, attributes=attributes)
        elif args.reward.startswith("clip:"):
            align = sd.clip_alignment_reward(args.reward[5:], device=device)
        elif args.reward == "none":
            align = None
        else:
            raise SafeT2IError(f"--reward {args.reward!r}: use lab, clip:DIR or none")
        over = dict(samples_per_prompt=args.samples_per_prompt, eta=args.eta, negative_prompt=args.negative_prompt,
                    rank=args.rank, alpha=args.alpha, targets=args.targets, lr=args.lr, clip_range=args.clip_range,
                    adv_clip_max=args.adv_clip, inner_epochs=args.inner_epochs, epochs=args.epochs,
                    sample_batch_size=args.sample_batch_size, train_batch_size=args.train_batch_size,
                    timestep_fraction=args.timestep_fraction, logprob_reduction=args.logprob,
                    reward_weights=(args.safety_weight, args.alignment_weight if align is not None else 0.0),
                    seed=0 if args.seed is None else args.seed, device=device, mixed_precision=args.precision,
                    gradient_checkpointing=args.gradient_checkpointing)
        if args.steps:
            over["steps"] = args.steps
        if args.guidance_scale is not None:
            over["guidance_scale"] = args.guidance_scale
        config = dataclasses.replace(config, **over)
        out = sd.train_shielddiff(pipe, config, safety_reward=safety, alignment_reward=align, out=args.out,
                                  progress=progress, resume=not args.no_resume, base_model=args.model,
                                  formats=formats, overwrite=args.overwrite)
    log_path = Path(out).with_suffix(".log.json")
    log = json.loads(log_path.read_text(encoding="utf-8"))
    before, after = log.get("before") or {}, log.get("after") or {}

    def show(stats: dict) -> str:
        return ", ".join(f"{k} {stats[k + '_mean']:.4g}" for k in ("reward", "safety", "alignment")
                         if k + "_mean" in stats)

    print(f"ShieldDiff-style RL: {config.epochs} epochs x {len(prompts)} prompts x K={config.samples_per_prompt} in "
          f"{log.get('seconds', 0):.0f} s ({log.get('seconds_per_epoch') or 0:.0f} s per epoch)")
    print(f"mean rewards before: {show(before)}")
    if after:
        print(f"mean rewards after:  {show(after)} (same noise as before)")
    files = [Path(out) if fmt == formats[0] else Path(out).with_name(Path(out).stem + f".{fmt}.safetensors")
             for fmt in formats]
    from types import SimpleNamespace  # noqa: PLC0415

    return _finish(SimpleNamespace(files=files, log=log_path), args, "ShieldDiff-style RL (DDPO-style PPO, reconstruction)",
                   "Han, Mohamed, Li, arXiv 2410.05309", _arch(pipe), Path(args.model).name)


def _arch(pipe) -> str:
    from ..diffusers_adapter import host_arch  # noqa: PLC0415

    return host_arch(pipe) or "unknown"


def _finish(res, args, method: str, paper: str, arch: str, base_model: str) -> int:
    from .lora_layers import manifest_entry  # noqa: PLC0415

    for f in res.files:
        print(f"wrote {f}")
    print(f"loss log: {res.log}")
    if arch not in ("sd1", "sd2", "sdxl"):
        print(f"(no models/safety_models.toml entry: the manifest describes SD1.x/SD2.x/SDXL files, and this base "
              f"model's architecture is {arch})")
        return 0
    key = Path(res.files[0]).stem.replace(".", "-").lower()
    print("\nAdd this entry to models/safety_models.toml to have the file recognised and verified:\n")
    print(manifest_entry(key, Path(res.files[0]).name, title=f"{method} LoRA trained locally on {base_model}",
                         method=method, paper=paper, arch=arch,
                         base_model=base_model, lora_path=res.files[0]))
    return 0


def _run_dag_tokens(args, progress: bool) -> int:
    from ..errors import SafeT2IError  # noqa: PLC0415
    from .common import load_base, resolve_device, threads  # noqa: PLC0415
    from .dag_tokens import (  # noqa: PLC0415
        DagTokenConfig,
        evaluate_detection,
        folder_training_data,
        lab_training_data,
        train_dag_tokens,
    )

    out = Path(args.out)
    for p in (out, out.with_name(out.stem + ".loss.json")):
        if p.exists() and not args.overwrite:
            raise SafeT2IError(f"{p} exists; pass --overwrite to replace it")
    device = resolve_device(args.device)
    with threads(args.threads):
        pipe = load_base(args.model, config=args.config, device=device)
        if args.lab:
            from ..lab.model import LabModelConfig, training_info  # noqa: PLC0415
            from ..lab.world import World  # noqa: PLC0415

            world = World(LabModelConfig.from_dict(training_info(args.model)["config"]).world)
            images, masks, safe = lab_training_data(world, args.lab_unsafe, args.lab_safe, args.seed)
            concept = args.concept or world.config.concept
        else:
            images, masks, safe = folder_training_data(args.unsafe, args.safe, size=args.size)
            concept = args.concept or "nude person"
        cfg = DagTokenConfig(concept=concept, steps=args.steps, lr=args.lr, neg_weight=args.neg_weight,
                             seed=args.seed, precision=args.precision)
        path = train_dag_tokens(pipe, images, masks, safe, cfg, out=out, progress=progress,
                                resume=not args.no_resume, base_model=None if args.lab else args.model,
                                overwrite=args.overwrite)
        print(f"wrote {path}")
        if args.evaluate:
            ev = evaluate_detection(pipe, path, images, masks)
            print(f"IoU of the highlighted region against the masks (training images): optimised "
                  f"{ev['optimised']:.3f}, raw concept tokens {ev['raw']:.3f}")
    print("use it: ComfyUI: copy it to models/safety_models and pick it as guideline_tokens on SafeT2I "
          "Detect-and-Guide-style Guidance; diffusers: safety_guidance(pipe, DAGGuidance(), "
          "**dag_tokens_kwargs(pipe, path))")
    return 0


def run(args) -> int:
    from ..errors import SafeT2IError  # noqa: PLC0415
    from . import dpo  # noqa: PLC0415
    from .common import base_sha256, load_base, resolve_device, threads  # noqa: PLC0415

    progress = not args.quiet and sys.stderr.isatty()
    if args.train_command == "dag-tokens":
        return _run_dag_tokens(args, progress)
    if args.train_command == "shielddiff":
        return _run_shielddiff(args, progress)
    device = resolve_device(args.device)
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

                from .common import output_paths  # noqa: PLC0415

                output_paths(args.out, formats, args.overwrite)    # an existing output: refused before any work
                # generated pairs are kept beside the checkpoint: a resumed run trains on the same pairs
                cache = Path(args.out).with_name(Path(args.out).name + ".partial") / "duo-pairs.safetensors"
                resuming = cache.is_file() and not args.no_resume
                if args.save_pairs and not resuming:  # a resumed run's PNGs are its own, written before
                    _check_pairs_folder(Path(args.save_pairs), args.overwrite)
                pairs = dpo.load_duo_pairs(cache) if resuming else None
                if pairs is None:
                    judge = load_bench_judge(args.judge, lab_judge=args.lab_judge)
                    pairs = dpo.make_duo_pairs(pipe, args.unsafe_prompt, args.safe_prompt,
                                               lambda im: judge.judge(im).concept, n=args.n, seed=args.seed or 0,
                                               steps=args.sample_steps, guidance_scale=args.guidance_scale,
                                               strength=args.strength, sdedit_guidance_scale=args.guidance_scale,
                                               max_tries=args.max_tries, progress=progress)
                    dpo.save_duo_pairs(pairs, cache)
                if args.save_pairs:
                    _save_pairs(pairs, Path(args.save_pairs))
            cfg = dpo.DuoConfig(beta=args.beta, lr=args.lr, prior_weight=args.prior_weight,
                                steps=args.steps or 1000, batch_size=args.batch_size, rank=args.rank,
                                alpha=args.alpha, targets=args.targets, seed=42 if args.seed is None else args.seed,
                                precision=args.precision, gradient_checkpointing=args.gradient_checkpointing)
            res = dpo.train_duo(pipe, pairs, cfg, **common)
            if not args.pairs:
                cache.unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    cache.parent.rmdir()
            print(f"DUO: {res.summary['pairs']} pairs, {res.summary['steps']} steps in {res.summary['seconds']:.0f} s, "
                  f"final loss {res.summary['final_loss']:.4g}")
            return _finish(res, args, "DUO: Direct Unlearning Optimization",
                           "Park et al., NeurIPS 2024, arXiv 2407.21035", arch, base_name)
        harmful = dpo.read_prompts(args.harmful_prompts)
        clean = dpo.read_prompts(args.clean_prompts) if args.clean_prompts else []
        reward, cost = _sc_dpo_scorers(args, device)
        cfg = dpo.ScDpoConfig(beta=args.beta, lr=args.lr, rounds=args.rounds, steps_per_round=args.steps or 100,
                              candidates=args.candidates, batch_size=args.batch_size, lam=args.lam,
                              lam_mode=args.lam_mode, cost_budget=args.cost_budget, lam_lr=args.lam_lr,
                              dfm_gamma=args.dfm_gamma, rank=args.rank, alpha=args.alpha, targets=args.targets,
                              sample_steps=args.sample_steps, guidance_scale=args.guidance_scale,
                              seed=0 if args.seed is None else args.seed, precision=args.precision,
                              gradient_checkpointing=args.gradient_checkpointing)
        res = dpo.train_sc_dpo(pipe, harmful, clean, cfg, reward=reward, cost=cost,
                               data_note=json.dumps({"cost": _describe(cost), "reward": _describe(reward)},
                                                    sort_keys=True, default=str), **common)
        last = res.summary["rounds"][-1]
        print(f"SC-DPO: {cfg.rounds} rounds x {cfg.steps_per_round} steps in {res.summary['seconds']:.0f} s; last round: "
              f"harmful mean cost {last['harmful_mean_cost']:+.3f}, lambda {res.summary['final_lambda']:.4g}")
        return _finish(res, args, "SC-DPO: Safety-Constrained DPO (reconstruction)",
                       "Ruan et al., arXiv 2504.14290", arch, base_name)


def _check_pairs_folder(folder: Path, overwrite: bool) -> None:
    """--save-pairs writes unsafe/NNNNN.png and safe/NNNNN.png: refuse a folder that already
    has PNGs there (an earlier run's pairs) unless --overwrite."""
    from ..errors import SafeT2IError  # noqa: PLC0415

    old = [p for sub in ("unsafe", "safe") for p in sorted((folder / sub).glob("*.png"))] if folder.is_dir() else []
    if old and not overwrite:
        raise SafeT2IError(f"--save-pairs {folder}: it already holds {len(old)} pair images (e.g. {old[0]}); "
                           "choose an empty folder or pass --overwrite")


def _save_pairs(pairs, folder: Path) -> None:
    import re  # noqa: PLC0415

    from PIL import Image  # noqa: PLC0415

    for sub, imgs in (("unsafe", pairs.unsafe), ("safe", pairs.safe)):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        for old in (folder / sub).glob("*.png"):  # an earlier run's pairs (allowed by --overwrite): never mixed
            if re.fullmatch(r"\d{5}\.png", old.name):
                old.unlink()
        for i, im in enumerate(imgs):
            Image.fromarray(im).save(folder / sub / f"{i:05d}.png")


def _describe(scorer) -> object:
    """What a scorer is (model file and sha256), for the run's identity."""
    from .shielddiff import describe_reward  # noqa: PLC0415

    return describe_reward(getattr(scorer, "reward", None))


def _sc_dpo_scorers(args, device: str):
    """``(reward(images, prompts), cost(images))`` from ``--reward`` and ``--cost-model`` (the
    rewards of :mod:`safet2i.train.shielddiff`, on uint8 images)."""
    from ..errors import SafeT2IError  # noqa: PLC0415
    from . import shielddiff as sd  # noqa: PLC0415
    from .dpo import from_reward  # noqa: PLC0415

    cost = from_reward(sd.cost_model_reward(args.cost_model, transform="negative-cost"), -1.0)
    if args.reward == "lab":
        reward = sd.lab_alignment_reward(args.lab_judge)
    elif args.reward.startswith("clip:"):
        reward = sd.clip_alignment_reward(args.reward[5:], device=device)
    else:
        raise SafeT2IError(f"--reward {args.reward!r}: use lab or clip:DIR")
    return from_reward(reward), cost
