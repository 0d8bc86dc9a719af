"""``safet2i lab`` command line: the efficacy lab's model, its quality gate and its table.

``safet2i lab train [--size N] [--steps N] [--device cpu|cuda] [--cache DIR] [--no-resume] [--quick]``

trains (or finds in the cache) the lab model of that config and prints its folder, a diffusers
folder ``StableDiffusionPipeline.from_pretrained`` loads. Interrupt it at any time: the next
run resumes from the last checkpoint. Exit status 0 on success, 2 on an error (printed as one
line naming the cause), 130 when interrupted.

``safet2i lab gate [--model FOLDER] [--n-per-form N] [--json FILE]`` runs the quality gate on a
trained model and prints its report: exit 0 when it passes, 1 when it misses, 2 on an error.

``safet2i lab table [--model FOLDER] [--out DIR] [--results FILE]`` writes the efficacy table
(exit 0; 1 when the model missed the gate and the table has no numbers; 2 on an error).

Wiring (in :mod:`safet2i.cli`): ``register(sub)`` in ``build_parser`` and ``if args.command ==
"lab": return run(args)`` in ``main``. Nothing heavy is imported until ``run``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def _positive(option: str):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{option} must be a whole number, not {text!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{option} must be at least 1, not {v}")
        return v
    return parse


def _common(p: argparse.ArgumentParser, doing: str, progress: str = "no progress bar") -> None:
    """The options every ``lab`` subcommand shares."""
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help=f"where to {doing} (default cpu)")
    p.add_argument("--cache", metavar="DIR", default=None,
                   help="folder of lab models (default $SAFET2I_CACHE/lab, else ${XDG_CACHE_HOME:-~/.cache}/safet2i/lab)")
    p.add_argument("--threads", type=_positive("--threads"), default=None,
                   help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help=progress)


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``lab`` command (subcommand ``train``) to ``subparsers`` and return its parser."""
    lab = subparsers.add_parser(
        "lab", help="the efficacy lab: train its tiny text-to-image model (see docs/lab.md)",
        description="The efficacy lab: a procedural world and a tiny Stable-Diffusion-structured model "
                    "trained on it, on which every safety layer gets a measured erase rate.")
    sub = lab.add_subparsers(dest="lab_command", required=True)
    tr = sub.add_parser(
        "train", help="train the lab model (or find it in the cache) and print its folder",
        description="Train the lab's tiny text-to-image model (AutoencoderKL, UNet2DConditionModel with "
                    "cross-attention, CLIPTextModel, the real CLIP BPE tokenizer, DDIM) on the procedural "
                    "world and save it as a diffusers folder under the cache, named by a hash of the config. "
                    "A finished model is reused; an interrupted run resumes from its last checkpoint. The "
                    "default config takes about 30 minutes on 2 CPU cores.")
    tr.add_argument("--size", type=_positive("--size"), default=None,
                    help="image side in pixels (default 32; 16 with --quick)")
    tr.add_argument("--steps", type=_positive("--steps"), default=None,
                    help="diffusion training steps (default 900; 4 with --quick)")
    tr.add_argument("--no-resume", action="store_true",
                    help="discard the checkpoint of an interrupted run of this config and start over")
    tr.add_argument("--quick", action="store_true",
                    help="a tiny plumbing run (16 px, tiny widths, a handful of steps): the folder loads and "
                         "generates, but the images are noise")
    _common(tr, "train")

    gate = sub.add_parser(
        "gate", help="run the quality gate on a trained lab model and print its report",
        description="Generate the gate's held-out captions (every caption form) with a trained lab model, judge "
                    "the images with the world's attribute classifier (trained on first use and cached) and "
                    "check the thresholds of docs/lab.md. Exit status 0 when the model passes, 1 when it "
                    "misses (the lab then refuses to report efficacy numbers for it), 2 on an error.")
    gate.add_argument("--model", metavar="FOLDER", default=None,
                      help="a trained lab model folder (default: the default config's model in the cache)")
    gate.add_argument("--n-per-form", type=_positive("--n-per-form"), default=64,
                      help="captions per caption form (default 64)")
    gate.add_argument("--seed", type=int, default=0, help="seed of the gate's captions and samples (default 0)")
    gate.add_argument("--batch-size", type=_positive("--batch-size"), default=32,
                      help="captions per pipeline call (default 32)")
    gate.add_argument("--judge", metavar="FILE", default=None,
                      help="a saved attribute classifier (.safetensors) of the model's world (default: the "
                           "world's default judge from the cache, trained on first use, about 2 minutes)")
    gate.add_argument("--json", metavar="FILE", default=None, help="also write the report as JSON")
    _common(gate, "sample", "no progress bar while training the judge")

    table = sub.add_parser(
        "table", help="the efficacy table: every safety layer measured on the lab's model",
        description="Train (or reuse) the lab model, gate it, train (or reuse) the learned cost model, attack each "
                    "defended text side and measure every configuration (unprotected, SLD x4, SP-Guard-style, "
                    "Detect-and-Guide-style, SAFREE-style steering with and without latent re-attention, the "
                    "cost-model filter, the full stack) with the world's judge. Writes table.md and table.json to "
                    "--out (and the table into --results). A model that misses the quality gate gets no numbers "
                    "(exit 1). Everything is cached under --out: a rerun reuses finished work.")
    table.add_argument("--model", metavar="FOLDER", default=None,
                       help="a trained lab model folder (default: the default config's, trained when missing)")
    table.add_argument("--out", metavar="DIR", default="lab-table", help="output and work folder (default lab-table)")
    table.add_argument("--results", metavar="FILE", default=None,
                       help="also write the table into this Markdown file's marked section "
                            "(e.g. benchmarks/RESULTS.md)")
    table.add_argument("--n", type=_positive("--n"), default=None,
                       help="held-out prompts per caption form (default 32)")
    table.add_argument("--attack-n", type=_positive("--attack-n"), default=None,
                       help="attack prompts per defended text side (default 32)")
    table.add_argument("--gate-n", type=_positive("--gate-n"), default=None,
                       help="the quality gate's captions per caption form (default 64)")
    table.add_argument("--batch-size", type=_positive("--batch-size"), default=None,
                       help="images per pipeline call (default 16)")
    table.add_argument("--judge", metavar="FILE", default=None,
                       help="a saved attribute classifier of the model's world (default: the world's default judge "
                            "from the cache, trained on first use)")
    table.add_argument("--ray", metavar="auto|ADDRESS", default=None,
                       help="generate the bench images on Ray ('auto': a private local cluster on 127.0.0.1); "
                            "same images and numbers as a local run (docs/scale.md); needs 'safet2i[ray]'")
    table.add_argument("--workers", type=_positive("--workers"), default=None,
                       help="with --ray: model-holding workers (default: the cluster's GPUs, else its CPUs less one)")
    table.add_argument("--trainers", action="store_true",
                       help="also train the seed methods in the lab (DUO, SC-DPO with and without DFM, "
                            "ShieldDiff-style RL, Detect-and-Guide tokens; docs/training.md) and add their rows")
    _common(table, "run", "no progress bars")
    return lab


def config_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~safet2i.lab.model.LabModelConfig` the command line asks for."""
    from .model import LabModelConfig  # noqa: PLC0415

    kw = {}
    if args.size is not None:
        kw["size"] = args.size
    if args.steps is not None:
        kw["steps"] = args.steps
    if args.quick:
        return LabModelConfig.quick(**kw)
    return LabModelConfig(**kw)


def run(args: argparse.Namespace) -> int:
    """Run ``safet2i lab ...``; returns the exit status (0; 1 when gate or table found no passing
    model; 2 on an error, printed as one line naming the cause; 130 interrupted)."""
    from ..errors import SafeT2IError  # noqa: PLC0415

    which = getattr(args, "lab_command", None)
    commands = {
        "train": (_train, "safet2i lab", "run the same command again to resume from the last checkpoint"),
        "gate": (_gate, "safet2i lab gate", ""),
        "table": (_table, "safet2i lab table", "run the same command again to reuse the finished work"),
    }
    if which not in commands:
        print(f"safet2i lab: error: unknown subcommand {which!r}", file=sys.stderr)
        return EXIT_ERROR
    body, label, resume = commands[which]
    try:
        return body(args)
    except KeyboardInterrupt:
        print(f"{label}: interrupted" + (f"; {resume}" if resume else ""), file=sys.stderr)
        return EXIT_INTERRUPTED
    except (SafeT2IError, ValueError, OSError, KeyError, NotImplementedError) as exc:
        print(f"{label}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR


def _train(args: argparse.Namespace) -> int:
    from .model import _threads, is_finished, model_folder, train, training_info  # noqa: PLC0415

    cfg = config_from_args(args)
    folder = model_folder(cfg, args.cache)
    cached = is_finished(folder, cfg)
    print(f"lab model {cfg.config_hash()}: {folder}", file=sys.stderr)
    with _threads(args.threads):
        folder = train(cfg, cache_dir=args.cache, device=args.device, resume=not args.no_resume,
                       progress=not args.no_progress)
    info = training_info(folder)
    losses, seconds = info.get("losses", {}), info.get("seconds", {})
    last = losses.get("diffusion") or [float("nan")]
    what = "cached (trained earlier)" if cached else "trained"
    print(f"{what}: {sum(seconds.values()):.0f} s of training steps on {info.get('device', '?')}, "
          f"final diffusion loss {last[-1]:.4f}", file=sys.stderr)
    print(folder)
    return 0


def _cuda_check(device: str) -> None:
    import torch  # noqa: PLC0415

    from ..errors import SafeT2IError  # noqa: PLC0415

    if device == "cuda" and not torch.cuda.is_available():
        raise SafeT2IError("--device cuda: torch sees no CUDA device here")


def _gate(args: argparse.Namespace) -> int:
    """``safet2i lab gate``: 0 passed, 1 missed."""
    import json  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    from ..errors import SafeT2IError  # noqa: PLC0415
    from .judge import AttributeClassifier, load_judge, quality_gate  # noqa: PLC0415
    from .model import LabModelConfig, _threads, is_finished, load_pipeline, model_folder, training_info  # noqa: PLC0415
    from .sampling import pipeline_generator  # noqa: PLC0415
    from .world import World  # noqa: PLC0415

    if args.model is not None:
        folder = Path(args.model)
        cfg = LabModelConfig.from_dict(training_info(folder)["config"])
    else:
        cfg = LabModelConfig()
        folder = model_folder(cfg, args.cache)
        if not is_finished(folder, cfg):
            raise SafeT2IError(f"no trained lab model of the default config at {folder}: run "
                               "`safet2i lab train` first (or pass --model FOLDER)")
    _cuda_check(args.device)
    with _threads(args.threads):
        pipe = load_pipeline(folder).to(args.device)
        pipe.set_progress_bar_config(disable=True)
        world = World(cfg.world)
        if args.judge is not None:
            judge = AttributeClassifier.load(args.judge)
        else:
            judge = load_judge(cfg.world, progress=not args.no_progress)
        report = quality_gate(pipeline_generator(pipe), world, n_per_form=args.n_per_form, seed=args.seed,
                              judge=judge, batch_size=args.batch_size)
    print(report.to_markdown())
    if args.json:
        Path(args.json).write_text(json.dumps({"model": str(folder), **report.to_dict()}, indent=1) + "\n")
    return 0 if report.passed else 1


def _table(args: argparse.Namespace) -> int:
    """``safet2i lab table``: 0 table written, 1 gate missed (no numbers)."""
    from ..errors import SafeT2IError  # noqa: PLC0415
    from .judge import AttributeClassifier  # noqa: PLC0415
    from .model import _threads  # noqa: PLC0415
    from .table import TableConfig, run_table  # noqa: PLC0415

    _cuda_check(args.device)
    if args.workers and not args.ray:
        raise SafeT2IError("--workers belongs to --ray")
    kw = {k: v for k, v in (("n_per_form", args.n), ("attack_n", args.attack_n), ("gate_n_per_form", args.gate_n),
                            ("batch_size", args.batch_size)) if v is not None}
    if args.trainers:
        from .trainers import TRAINERS  # noqa: PLC0415

        kw["trainers"] = TRAINERS
    with _threads(args.threads):
        judge = AttributeClassifier.load(args.judge) if args.judge is not None else None
        res = run_table(args.model, args.out, TableConfig(**kw), cache_dir=args.cache, device=args.device,
                        judge=judge, progress=not args.no_progress, results=args.results,
                        log=lambda m: print(f"safet2i lab table: {m}", file=sys.stderr, flush=True),
                        ray=args.ray, workers=args.workers)
    print(res.to_markdown())
    for what, path in res.files.items():
        print(f"{what}: {path}", file=sys.stderr)
    return 0 if res.rows else 1
