"""``safet2i lab`` command line: train the efficacy lab's tiny text-to-image model.

``safet2i lab train [--size N] [--steps N] [--device cpu|cuda] [--cache DIR] [--no-resume] [--quick]``

trains (or finds in the cache) the lab model of that config and prints its folder, a diffusers
folder ``StableDiffusionPipeline.from_pretrained`` loads. Interrupt it at any time: the next
run resumes from the last checkpoint. Exit status 0 on success, 2 on an error (printed as one
line naming the cause), 130 when interrupted.

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
    tr.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to train (default cpu)")
    tr.add_argument("--cache", metavar="DIR", default=None,
                    help="folder of lab models (default $SAFET2I_CACHE/lab, else "
                         "${XDG_CACHE_HOME:-~/.cache}/safet2i/lab)")
    tr.add_argument("--no-resume", action="store_true",
                    help="discard the checkpoint of an interrupted run of this config and start over")
    tr.add_argument("--quick", action="store_true",
                    help="a tiny plumbing run (16 px, tiny widths, a handful of steps): the folder loads and "
                         "generates, but the images are noise")
    tr.add_argument("--threads", type=_positive("--threads"), default=None,
                    help="torch CPU threads (default: torch's choice)")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")
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
    """Run ``safet2i lab ...``; returns the exit status (0, 2 on an error, 130 interrupted)."""
    from ..errors import SafeT2IError  # noqa: PLC0415

    if getattr(args, "lab_command", None) != "train":
        which = getattr(args, "lab_command", None)
        print(f"safet2i lab: error: unknown subcommand {which!r}", file=sys.stderr)
        return EXIT_ERROR
    try:
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
    except KeyboardInterrupt:
        print("safet2i lab: interrupted; run the same command again to resume from the last checkpoint",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except (SafeT2IError, ValueError, OSError, NotImplementedError) as exc:
        print(f"safet2i lab: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
