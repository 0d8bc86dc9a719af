"""``safet2i`` command line.

``safet2i filter PATHS... --out DIR``   check images and write filtered copies
``safet2i audit INPUTS... --out DIR --table T.parquet [--ray auto|ADDRESS]``  resumable audit (docs/scale.md)
``safet2i samples DIR``                 export benign sample pictures (for demos)
``safet2i models``                      list the built-in filter models and their status
``safet2i lora inspect FILE [--base B]``  key format, family, architecture, rank, targets, coverage
``safet2i lora convert FILE --to kohya``  write a file stock ComfyUI and A1111 load fully
``safet2i convert FILE``                pickled checkpoint → .safetensors (weights_only load)
``safet2i train cost-model ...``        train the learned safety cost model, export ONNX (docs/cost-model.md)
``safet2i lab train ...``               train the efficacy lab's tiny text-to-image model (docs/lab.md)

Exit status of ``filter`` (bit flags): 0 all safe, 1 something unsafe, 2 something could
not be read, checked or written, 3 both; 8 (added to those) a report could not be written;
4 the filter itself could not run; 64 bad command line.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

import numpy as np

from . import __version__
from .errors import SafeT2IError

from .filter.files import EXIT_BROKEN, EXIT_FATAL, EXIT_REPORT, EXIT_UNSAFE, EXIT_USAGE  # noqa: F401  (documented codes)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _colour(text: str) -> tuple[float, float, float]:
    t = text.strip().lstrip("#")
    try:
        if len(t) == 6:
            return tuple(int(t[i:i + 2], 16) / 255.0 for i in (0, 2, 4))
        vals = [float(v) for v in text.split(",")]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--colour must be #rrggbb or r,g,b: {text}") from exc
    if len(vals) != 3:
        raise argparse.ArgumentTypeError(f"--colour must be #rrggbb or r,g,b: {text}")
    if not all(np.isfinite(v) and 0 <= v <= 255 for v in vals):
        raise argparse.ArgumentTypeError(f"--colour values must be in 0..1 or 0..255, not {text}")
    return tuple(v / 255.0 if max(vals) > 1 else v for v in vals)


def _bounded(option: str, lo: float, hi: float, *, integer: bool = False, lo_open: bool = False):
    """An argparse type: a finite number in [lo, hi] (``lo_open``: lo excluded), named in errors."""
    def parse(text: str):
        try:
            v = int(text) if integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{option} must be {'a whole' if integer else 'a'} number, not {text!r}")
        if not np.isfinite(v) or v < lo or v > hi or (lo_open and v == lo):
            low = f"more than {lo:g}" if lo_open else f"at least {lo:g}"
            raise argparse.ArgumentTypeError(f"{option} must be {low} and at most {hi:g}, not {text}")
        return v
    return parse


class _Architectures:
    """``--base`` choices: every architecture ``safet2i.lora`` knows (``safet2i.lora.arch.titles()``:
    SD1.x/SD2.x/SDXL UNets, then the Flux.1, SD3/SD3.5, Qwen-Image and Wan transformers), read only
    when ``--base`` is parsed or help is printed, so building the parser imports no torch."""

    @staticmethod
    def _names() -> list[str]:
        from .lora.arch import titles  # noqa: PLC0415

        return list(titles())

    def __contains__(self, name) -> bool:
        return name in self._names()

    def __iter__(self):
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())


_ARCHS = _Architectures()


def _filter_options(p) -> None:
    """The filter's and the censoring's options, the same for ``filter`` and ``audit``."""
    from .filter import ACTIONS, BUILTIN, DEFAULT_POLICY, PRESETS

    p.add_argument("--action", choices=ACTIONS, default="blur", help="what to do with unsafe images (default: blur)")
    p.add_argument("--policy", default=DEFAULT_POLICY,
                   help=f"class set: {', '.join(PRESETS)}, custom, or a policy .json (default: {DEFAULT_POLICY})")
    p.add_argument("--threshold", action="append", default=[], metavar="LABEL=SCORE",
                   help="per-label threshold override, repeatable (e.g. FEET_EXPOSED=0.8)")
    p.add_argument("--model", action="append", default=None,
                   help=f"model: {', '.join(BUILTIN)} or a sidecar .json path; repeatable (default: nudenet)")
    p.add_argument("--expand", type=_bounded("--expand", 0, 2), default=None,
                   help="grow flagged boxes by this fraction per side (0..2)")
    p.add_argument("--shape", choices=("rect", "ellipse"), default=None, help="mask shape")
    p.add_argument("--feather", type=_bounded("--feather", 0, 1024), default=0.0,
                   help="soften mask edges by this many pixels (0..1024)")
    p.add_argument("--strength", type=_bounded("--strength", 0, 4096, lo_open=True), default=None,
                   help="blur sigma / pixelate block size in pixels (automatic by default; never below the "
                        "minimum for the region's size)")
    p.add_argument("--colour", "--color", type=_colour, default=(0.0, 0.0, 0.0), help="fill colour (#rrggbb)")
    p.add_argument("--providers", default=None, help="onnxruntime providers: auto, cpu, cuda, tensorrt, ...")
    p.add_argument("--batch-size", type=_bounded("--batch-size", 1, 1024, integer=True), default=16,
                   help="images per network batch (1..1024, default 16)")


def filter_from_args(args):
    """The :class:`SafetyFilter` the options of :func:`_filter_options` describe."""
    from .filter.files import build_filter

    return build_filter(vars(args))


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="safet2i", description="SafeT2I safety tools for text-to-image diffusion.")
    p.add_argument("--version", action="version", version=f"safet2i {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    f = sub.add_parser("filter", help="check images with the output filter and write filtered copies")
    f.add_argument("paths", nargs="+", help="image files and/or folders (searched recursively)")
    f.add_argument("--out", required=True, help="folder for the filtered copies (never an input's own file)")
    _filter_options(f)
    f.add_argument("--max-file-pixels", type=_bounded("--max-file-pixels", 1, 10**11, integer=True), default=None,
                   help="decoded-pixel budget per file over all its frames (default 300000000, or "
                        "SAFET2I_MAX_FILE_PIXELS); a file over it is a per-file error")
    f.add_argument("--report", help="write a JSON report here (never over an input; an existing file only "
                                     "with --overwrite)")
    f.add_argument("--html", help="write an HTML report with filtered thumbnails here (same rules as --report)")
    f.add_argument("--overwrite", action="store_true",
                   help="replace existing files in --out and existing report files (never an input)")
    f.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary")

    a = sub.add_parser(
        "audit", help="check many images (folders, file lists, Parquet, tar shards) into a verdict table; "
                      "resumable; in-process or on a Ray cluster (docs/scale.md)")
    a.add_argument("inputs", nargs="+", help="folders, file lists (.txt/.lst: one path a line), Parquet tables "
                                             "(path/bytes columns), WebDataset .tar shards, image files")
    a.add_argument("--out", required=True, help="folder for the censored copies (nothing in it is ever replaced)")
    a.add_argument("--table", required=True, help="Parquet table of per-image verdicts (merged with an earlier "
                                                  "run's: a re-run skips what is done)")
    a.add_argument("--ray", metavar="auto|ADDRESS", default=None,
                   help="run on Ray: 'auto' starts a local cluster on 127.0.0.1, else a cluster address "
                        "(ray://host:10001 or host:6379); needs pip install 'safet2i[ray]'")
    a.add_argument("--workers", type=_bounded("--workers", 1, 100000, integer=True), default=None,
                   help="model-holding actors with --ray (default: the cluster's GPUs, else its CPUs less one)")
    _filter_options(a)
    a.add_argument("--report", help="write the JSON summary here (as safet2i filter's)")
    a.add_argument("--html", help="write the HTML summary here (thumbnails of the copies only)")
    a.add_argument("--overwrite", action="store_true", help="replace existing report files (never a copy)")
    a.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary")

    s = sub.add_parser("samples", help="export benign sample pictures of people (needs scikit-image)")
    s.add_argument("dir")

    sub.add_parser("models", help="list built-in filter models and whether they are installed")

    lo = sub.add_parser("lora", help="inspect or convert safety LoRA files")
    lsub = lo.add_subparsers(dest="lora_command", required=True, parser_class=_Parser)
    li = lsub.add_parser("inspect", help="key format, base architecture, rank, targets and coverage")
    li.add_argument("file")
    li.add_argument("--base", choices=_ARCHS, metavar="ARCH",
                    help="also list coverage against this architecture and what a loader on such a model "
                         "decides (arch_check, load_check); one of: %(choices)s")
    li.add_argument("--json", action="store_true", help="print JSON")
    lc = lsub.add_parser(
        "convert", help="rewrite a LoRA with kohya keys (alpha written explicitly), after the loaders' checks",
        description="Rewrite a LoRA with kohya keys (alpha written explicitly), refusing what the loaders refuse, "
                    "with their messages: a file the manifest knows must match its entry (sha256, contents) and fit "
                    "its base architecture; with --base (or the base of a known release) the file must fit that "
                    "model completely (made-for check, full coverage, min_coverage); degenerate LoRAs (rank 0, "
                    "all-zero tensors, scale 0 or negative, NaN/inf) are refused. An unknown file is converted when "
                    "it fits a known architecture completely by shape; one that fits none needs --allow-unknown and "
                    "is marked UNVERIFIED (printed and in the output's metadata safet2i_check).")
    lc.add_argument("file")
    lc.add_argument("--to", choices=["kohya"], required=True)
    lc.add_argument("--base", choices=_ARCHS, metavar="ARCH",
                    help="check the file against this architecture as a loader would (default: a known "
                         "release's own base); for a transformer, also the one whose native names are written. "
                         "One of: %(choices)s")
    lc.add_argument("--allow-unknown", action="store_true",
                    help="convert a file nothing vouches for (not in the manifest, no known architecture fits it); "
                         "the output is marked UNVERIFIED. Never overrides a refusal.")
    lc.add_argument("--out", help="output file (default: FILE with a .kohya.safetensors suffix)")
    lc.add_argument("--overwrite", action="store_true")

    cv = sub.add_parser(
        "convert", help="convert a pickled .ckpt/.pt/.bin to .safetensors without running its code",
        description="Load a pickled checkpoint with torch.load(weights_only=True) (tensors and plain containers "
                    "only; a pickle that needs code is refused, naming the global) and write its tensors to "
                    ".safetensors under dotted names of their paths (a.0.b). Colliding names and tensors safetensors "
                    "cannot store are errors; non-tensor entries (numbers, strings, the entries beside a "
                    "state_dict) are skipped and listed.")
    cv.add_argument("file")
    cv.add_argument("--out", help="output file (default: FILE with a .safetensors suffix; "
                                  "FILE.converted.safetensors for a pickle named .safetensors)")
    cv.add_argument("--overwrite", action="store_true")

    from .train.cli import register as register_train  # noqa: PLC0415  (torch only when it runs)
    register_train(sub)
    from .lab.cli import register as register_lab  # noqa: PLC0415
    register_lab(sub)
    from .bench.cli import register as register_bench  # noqa: PLC0415
    register_bench(sub)
    return p


# --------------------------------------------------------------------------- lora / convert

def run_lora(args) -> int:
    import json  # noqa: PLC0415

    from .lora import convert_lora, inspect_lora  # noqa: PLC0415

    if args.lora_command == "inspect":
        info = inspect_lora(args.file, args.base)
        if args.json:
            print(json.dumps(info, indent=2))
            return 0
        for k in ("file", "sha256", "formats", "families", "architectures", "fit", "components", "targets",
                  "ranks", "scales", "alpha_from", "adapter_config", "dora", "manifest", "manifest_check",
                  "manifest_hint", "identified_as", "modules", "arch_check", "load_check"):
            if k not in info:
                continue
            v = info[k]
            if isinstance(v, list):
                v = ", ".join(map(str, v))
            elif isinstance(v, dict):
                v = ", ".join(f"{a}: {b}" for a, b in v.items())
            print(f"{k:15s} {v}")
        if "coverage" in info:
            c = info["coverage"]
            print(f"{'coverage':15s} {c['matched']}/{c['targets']} on {c['host']}")
            for u in c["unmatched"][:20]:
                print(f"{'':15s} unmatched {u['key']}: {u['reason']}")
        return 0
    rep = convert_lora(args.file, args.out, args.to, base=args.base, allow_unknown=args.allow_unknown,
                       overwrite=args.overwrite)
    print(f"wrote {rep['out']} ({rep['targets']} target weights, kohya keys, alpha explicit)")
    print(rep["note"] if rep["check"] == "UNVERIFIED" else f"checked: {rep['note']}")
    return 0


def run_convert(args) -> int:
    from .lora.files import convert_pickle_report  # noqa: PLC0415

    rep = convert_pickle_report(args.file, args.out, overwrite=args.overwrite)
    n = len(rep.tensors)
    print(f"wrote {rep.path} ({n} tensor{'s' * (n != 1)}; loaded with torch.load(weights_only=True), no code run)")
    if rep.skipped:
        print(f"not stored ({len(rep.skipped)} entries that are not tensors; also listed in the file's metadata "
              "safet2i_skipped):")
        for item in rep.skipped:
            print(f"  {item}")
    return 0


# --------------------------------------------------------------------------- filter


def run_filter(args) -> int:
    from .filter.files import FileFilter, atomic_write, guard_destination
    from .filter.files import collect as collect_files
    from .filter.report import build_report, write_html, write_json

    flt = filter_from_args(args)
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        if any(os.path.samefile(out_dir, p) for p in args.paths if os.path.exists(p)):
            raise SafeT2IError(f"--out {out_dir} is one of the input files")
        raise SafeT2IError(f"--out {out_dir} exists and is not a folder")
    items, skipped = collect_files(args.paths, exclude=[out_dir] if out_dir.is_dir() else [])
    inputs = set()
    for f, _ in items:
        try:
            st = os.stat(f)
            inputs.add((st.st_dev, st.st_ino))
        except OSError:
            pass
    reports = {}
    for opt in ("report", "html"):
        if getattr(args, opt):
            reports[opt] = guard_destination(Path(getattr(args, opt)), args.overwrite, inputs, f"--{opt}")
    if len(set(reports.values())) < len(reports):
        raise SafeT2IError("--report and --html name the same file")
    out_dir.mkdir(parents=True, exist_ok=True)

    try:
        from tqdm import tqdm  # noqa: PLC0415
        bar = tqdm(total=len(items), unit="file", disable=args.quiet or not sys.stderr.isatty(), desc="filter")
    except ImportError:  # pragma: no cover
        bar = None
    run = FileFilter(flt, out_dir, overwrite=args.overwrite, inputs=inputs, batch_size=args.batch_size,
                     max_file_pixels=args.max_file_pixels, thumbnails=bool(args.html),
                     progress=bar.update if bar is not None else None)
    for p in reports.values():
        run.claim(p)  # a report inside --out: no output takes its name
    try:
        status = run.run(items)
    finally:
        if bar is not None:
            bar.close()
    files = run.files

    report = build_report(flt.describe(), files, skipped)
    for opt, p in reports.items():
        try:
            if opt == "report":
                atomic_write(p, lambda fh: write_json(report, fh))
            else:
                atomic_write(p, lambda fh: write_html(report, fh, run.thumbs))
        except (OSError, ValueError) as exc:
            print(f"safet2i: error: cannot write the {opt} {p}: {getattr(exc, 'strerror', None) or exc}",
                  file=sys.stderr)
            status |= EXIT_REPORT
    if not args.quiet:
        s = report["summary"]
        print(f"safet2i: {s['files']} files, {s['safe']} safe, {s['unsafe']} unsafe, {s['errors']} errors, "
              f"{s['skipped']} skipped -> {out_dir}", file=sys.stderr)
        for f in files:
            if f.get("error"):
                print(f"  error: {_printable(f['error'])}", file=sys.stderr)
    return status


def _printable(text: str) -> str:
    """A message with undecodable file-name bytes shown as replacement characters."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


# --------------------------------------------------------------------------- samples / models


def sample_pictures() -> dict[str, np.ndarray]:
    """Benign pictures of people (and a control) that ship inside pip packages."""
    try:
        import skimage.data as d  # noqa: PLC0415
    except ImportError as exc:
        raise SafeT2IError("`safet2i samples` needs scikit-image: python -m pip install scikit-image") from exc
    pics = {"astronaut": d.astronaut(), "camera": d.camera(), "coffee": d.coffee(), "chelsea": d.chelsea()}
    try:
        import matplotlib.cbook as cb  # noqa: PLC0415
        with cb.get_sample_data("grace_hopper.jpg") as fh:
            from PIL import Image  # noqa: PLC0415

            pics["grace_hopper"] = np.asarray(Image.open(fh).convert("RGB"))
    except Exception:  # noqa: BLE001 - matplotlib is optional for this
        pass
    return pics


def run_samples(args) -> int:
    from PIL import Image  # noqa: PLC0415

    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, arr in sample_pictures().items():
        Image.fromarray(arr).save(out / f"{name}.png")
    print(f"safet2i: wrote sample pictures to {out}", file=sys.stderr)
    return 0


def run_models(args) -> int:
    from .filter.detectors import BUILTIN, BUILTIN_DIR, ModelSpec

    for name, (file, mode) in BUILTIN.items():
        try:
            spec = ModelSpec.from_file(BUILTIN_DIR / file)
            state = "installed" if spec.path.is_file() else f"missing file {spec.path}"
            print(f"{name:20s} {spec.kind:10s} {state}  [{spec.licence.split(' (')[0]}] {spec.title}")
        except SafeT2IError as exc:
            print(f"{name:20s} {'':10s} not available: {exc}")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    # No raw RuntimeWarning / DecompressionBombWarning text: every numeric or size problem is
    # checked explicitly and reported as a per-file message naming the file and the cause.
    warnings.filterwarnings("ignore", category=RuntimeWarning)
    args = build_parser().parse_args(argv)
    try:
        if args.command == "filter":
            return run_filter(args)
        if args.command == "audit":
            from .audit import run_audit  # noqa: PLC0415
            return run_audit(args)
        if args.command == "samples":
            return run_samples(args)
        if args.command == "lora":
            return run_lora(args)
        if args.command == "convert":
            return run_convert(args)
        if args.command == "train":
            from .train.cli import run as run_train  # noqa: PLC0415
            return run_train(args)
        if args.command == "lab":
            from .lab.cli import run as run_lab  # noqa: PLC0415
            return run_lab(args)
        if args.command == "bench":
            from .bench.cli import run as run_bench  # noqa: PLC0415
            return run_bench(args)
        return run_models(args)
    except (SafeT2IError, ValueError, OSError) as exc:  # a crash must not read as exit 1 "unsafe"
        print(f"safet2i: error: {_printable(str(exc))}", file=sys.stderr)
        return EXIT_FATAL
    except MemoryError:
        print("safet2i: error: out of memory; lower SAFET2I_MAX_FILE_PIXELS or --batch-size", file=sys.stderr)
        return EXIT_FATAL


if __name__ == "__main__":
    sys.exit(main())
