"""``safet2i bench``: run a prompt set through a local SD1.x/SDXL checkpoint, unprotected and with
a stack of SafeT2I layers chosen by flags, judge the images and write the reports
(``docs/bench.md``).

    safet2i bench --model PATH --prompts CSV --judge PRESET [--limit N] [--lora FILE[:S]]...
                  [--weights FILE]... [--steering PRESET | --steering-concepts "a; b"] [--reattention]
                  [--guidance METHOD[:PRESET]] [--concept TEXT] [--filter POLICY] [--cost-model FILE]
                  [--steps N] [--guidance-scale G] [--batch-size N] [--device D] [--out DIR] [--no-resume]
                  [--ray auto|ADDRESS [--workers N]]

Exit status 0 on success, 2 on an error (one line naming the cause), 130 when interrupted (run the
same command again to resume). Wiring (in :mod:`safet2i.cli`): ``register(sub)`` in
``build_parser`` and ``if args.command == "bench": return run(args)`` in ``main``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130

#: Short names accepted for the guidance methods (case-insensitive), besides their own names.
GUIDANCE_ALIASES = {"sld": "SLD", "spguard": "SP-Guard-style", "sp-guard": "SP-Guard-style",
                    "dag": "Detect-and-Guide-style", "detect-and-guide": "Detect-and-Guide-style"}


def _number(option: str, kind=float, low: float | None = None):
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{option} must be a number, not {text!r}") from None
        if low is not None and v < low:
            raise argparse.ArgumentTypeError(f"{option} must be at least {low:g}, not {text}")
        return v
    return parse


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``bench`` command to ``subparsers`` and return its parser."""
    from .judges import PRESETS  # noqa: PLC0415  (no torch)

    b = subparsers.add_parser(
        "bench", help="measure safety layers on a prompt set with a local SD1.x/SDXL checkpoint (docs/bench.md)",
        description="Run a prompt set (CSV: prompt, optional case_number, evaluation_seed, categories, form) "
                    "through a local diffusers pipeline, unprotected and with the SafeT2I layers chosen by the "
                    "flags, fixed seeds, batched and resumable; judge the images with a named detector preset and "
                    "write results.json, results.md and samples.html. Local files only: nothing is downloaded.")
    b.add_argument("--model", required=True, help="a diffusers folder, or a single-file SD1.x/SDXL .safetensors")
    b.add_argument("--config", default=None,
                   help="for a single-file checkpoint: a local diffusers folder of the same architecture whose "
                        "configs are used (from_single_file config=)")
    b.add_argument("--prompts", required=True, help="the prompt CSV")
    b.add_argument("--judge", required=True, choices=list(PRESETS), help="the judge preset")
    b.add_argument("--judge-file", default=None, help="--judge lab: a lab judge .safetensors (default: the cached one)")
    b.add_argument("--nudenet-v2", default=None,
                   help="--judge safree-nudenet: the NudeNet v2 classifier_model.onnx (not installed with any wheel)")
    b.add_argument("--limit", type=_number("--limit", int, 1), default=None, help="the first N prompts only")
    b.add_argument("--name", default="protected", help="name of the protected stack in the reports")
    b.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                   help="a safety LoRA merged with a strength (default 1); repeatable")
    b.add_argument("--weights", action="append", default=[], metavar="FILE",
                   help="full safety weights (UNet or text encoder .safetensors); repeatable")
    b.add_argument("--steering", default=None, metavar="PRESET", help="SAFREE steering with a concept preset "
                                                                       "(e.g. nudity)")
    b.add_argument("--steering-concepts", default=None, metavar="'A; B; ...'",
                   help="SAFREE steering with a custom concept list, separated by ';'")
    b.add_argument("--steering-config", choices=("custom", "paper"), default="custom",
                   help="paper: SAFREE's own configuration (nudity list, concepts as negative prompt)")
    b.add_argument("--alpha", type=_number("--alpha", float, 0.0), default=0.01, help="steering alpha (0.01)")
    b.add_argument("--reattention", action="store_true", help="add SAFREE's latent re-attention (needs steering)")
    b.add_argument("--guidance", default=None, metavar="METHOD[:PRESET]",
                   help="safety guidance: SLD[:WEAK|MEDIUM|STRONG|MAX], spguard, dag")
    b.add_argument("--concept", default=None, help="the guidance concept text (default: SLD's safety concept)")
    b.add_argument("--guidance-tokens", default=None, metavar="FILE",
                   help="--guidance dag: optimised guideline tokens (safet2i train dag-tokens) instead of the "
                        "concept's raw tokens")
    b.add_argument("--filter", default=None, metavar="POLICY",
                   help="the output filter with this policy preset (strict-5, broad-9, face-only) on NudeNet")
    b.add_argument("--cost-model", default=None, metavar="FILE", help="a cost-model .onnx (sidecar .json beside it) "
                                                                      "in the output filter")
    b.add_argument("--filter-action", default="blur", help="what the filter does to a flagged image (default blur)")
    b.add_argument("--steps", type=_number("--steps", int, 1), default=50, help="sampling steps (50)")
    b.add_argument("--guidance-scale", type=_number("--guidance-scale", float, 0.0), default=7.5,
                   help="classifier-free guidance scale (7.5)")
    b.add_argument("--height", type=_number("--height", int, 8), default=None)
    b.add_argument("--width", type=_number("--width", int, 8), default=None)
    b.add_argument("--batch-size", type=_number("--batch-size", int, 1), default=4, help="images per call (4)")
    b.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (auto: cuda when available)")
    b.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
                   help="auto: float16 on cuda, float32 on cpu")
    b.add_argument("--out", default="bench-out", help="output folder (bench-out)")
    b.add_argument("--no-resume", action="store_true", help="generate every image again")
    b.add_argument("--samples", type=_number("--samples", int, 0), default=4, help="prompts in the HTML grid (4)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument("--ray", metavar="auto|ADDRESS", default=None,
                   help="generate on Ray: 'auto' starts a local cluster on 127.0.0.1, else a cluster address; one "
                        "pipeline load per worker, same images and report as a local run (docs/scale.md); "
                        "needs pip install 'safet2i[ray]'")
    b.add_argument("--workers", type=_number("--workers", int, 1), default=None,
                   help="with --ray: pipeline-holding workers (default: the cluster's GPUs, else its CPUs less one)")
    return b


def parse_lora(text: str) -> tuple[str, float]:
    """``FILE[:STRENGTH]`` -> (file, strength)."""
    path, sep, tail = text.rpartition(":")
    if sep and path:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return text, 1.0


def parse_guidance(text: str) -> tuple[str, str]:
    """``METHOD[:PRESET]`` -> (method name of safet2i.guidance.METHODS, preset)."""
    from ..errors import SafeT2IError  # noqa: PLC0415
    from ..guidance import METHODS, SLD_PRESETS  # noqa: PLC0415

    name, _, preset = text.partition(":")
    name = name.strip()
    by_lower = {m.lower(): m for m in METHODS}
    method = by_lower.get(name.lower()) or GUIDANCE_ALIASES.get(name.lower())
    if method is None:
        raise SafeT2IError(f"--guidance: unknown method {name!r}; use one of {', '.join(METHODS)} (or sld, spguard, dag)")
    preset = (preset or "MEDIUM").strip().upper()
    if method == "SLD" and preset not in SLD_PRESETS:
        raise SafeT2IError(f"--guidance: unknown SLD preset {preset!r}; use one of {', '.join(SLD_PRESETS)}")
    return method, preset


def _device_dtype(args):
    return resolve_device(args.device, args.dtype)


def resolve_device(device: str, dtype: str):
    """``(device, torch dtype)`` for ``--device``/``--dtype`` on this machine (auto: CUDA when
    available; float16 on CUDA, float32 on CPU)."""
    import torch  # noqa: PLC0415

    from ..errors import SafeT2IError  # noqa: PLC0415

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SafeT2IError(f"--device {device}: CUDA is not available here")
    name = dtype if dtype != "auto" else ("float16" if device.startswith("cuda") else "float32")
    return device, getattr(torch, name)


def worker_pipeline(model: str, config: str | None, device: str, dtype: str) -> Any:
    """``--ray``'s pipeline factory: run in each worker, so ``--device auto`` means the worker's GPU."""
    return load_pipeline(model, config, *resolve_device(device, dtype))


def load_pipeline(model: str, config: str | None, device: str, dtype) -> Any:
    """A local SD1.x/SD2.x/SDXL text-to-image pipeline from a diffusers folder or a single-file
    ``.safetensors`` checkpoint; local files only, safetensors weights only."""
    from ..errors import SafeT2IError  # noqa: PLC0415

    try:
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline  # noqa: PLC0415
    except ImportError as exc:
        raise SafeT2IError("safet2i bench needs diffusers and transformers (pip install diffusers transformers)") from exc
    p = Path(model)
    if p.is_dir():
        index = p / "model_index.json"
        if not index.is_file():
            raise SafeT2IError(f"--model {p}: a folder without model_index.json is not a diffusers pipeline")
        try:
            cls_name = json.loads(index.read_text(encoding="utf-8")).get("_class_name", "")
        except (OSError, ValueError) as exc:
            raise SafeT2IError(f"--model {p}: model_index.json cannot be read ({exc})") from exc
        xl = "XL" in cls_name
        kw = {} if xl else {"safety_checker": None, "requires_safety_checker": False}
        try:
            pipe = (StableDiffusionXLPipeline if xl else StableDiffusionPipeline).from_pretrained(
                str(p), local_files_only=True, use_safetensors=True, torch_dtype=dtype, **kw)
        except (OSError, ValueError, EnvironmentError) as exc:
            raise SafeT2IError(f"--model {p}: cannot load the pipeline from local safetensors files: "
                               f"{str(exc).splitlines()[0]}") from exc
    elif p.is_file():
        if p.suffix.lower() != ".safetensors":
            raise SafeT2IError(f"--model {p}: single-file checkpoints must be .safetensors (convert a pickled one "
                               "with `safet2i convert`)")
        from safetensors import safe_open  # noqa: PLC0415

        try:
            with safe_open(str(p), framework="pt") as fh:
                xl = any(k.startswith("conditioner.embedders.1.") for k in fh.keys())
        except Exception as exc:  # noqa: BLE001 - safetensors' own error types
            raise SafeT2IError(f"--model {p}: not a readable .safetensors file ({exc})") from exc
        cls = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
        # Without config= diffusers looks for the model's configs in the Hugging Face cache and, when
        # they are not there, downloads them despite local_files_only=True: find them in the cache
        # here and hand diffusers the local folder, or stop.
        kw = {"config": config if config else _cached_single_file_config(p)}
        try:
            pipe = cls.from_single_file(str(p), local_files_only=True, torch_dtype=dtype, **kw)
        except Exception as exc:  # noqa: BLE001 - diffusers raises many types here
            hint = "" if config else (" (without network access diffusers needs the model's configs: pass --config "
                                      "DIR, a local diffusers folder of the same architecture)")
            raise SafeT2IError(f"--model {p}: cannot load the single-file checkpoint: "
                               f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}{hint}") from exc
        if not xl and getattr(pipe, "safety_checker", None) is not None:
            pipe.safety_checker = None
    else:
        raise SafeT2IError(f"--model {p}: no such file or folder")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _cached_single_file_config(path: Path) -> str:
    """The local Hugging Face cache folder of the diffusers configs diffusers would choose for the
    single-file checkpoint ``path`` (its own detection, on the few tensors it inspects); a
    :class:`SafeT2IError` asking for ``--config`` when they are not cached. Nothing is downloaded."""
    from collections.abc import Mapping  # noqa: PLC0415

    from safetensors import safe_open  # noqa: PLC0415

    from ..errors import SafeT2IError  # noqa: PLC0415

    class _Lazy(Mapping):  # diffusers' detection reads a few keys' shapes: load only those
        def __init__(self, fh):
            self.fh, self.names = fh, set(fh.keys())

        def __getitem__(self, key):
            if key not in self.names:
                raise KeyError(key)
            return self.fh.get_tensor(key)

        def __iter__(self):
            return iter(self.names)

        def __len__(self):
            return len(self.names)

    hint = ("without network access diffusers needs the model's configs: pass --config DIR, a local diffusers "
            "folder of the same architecture")
    try:
        from diffusers.loaders.single_file_utils import fetch_diffusers_config  # noqa: PLC0415
        from huggingface_hub import snapshot_download  # noqa: PLC0415

        with safe_open(str(path), framework="pt") as fh:
            repo = fetch_diffusers_config(_Lazy(fh))["pretrained_model_name_or_path"]
    except Exception as exc:  # noqa: BLE001 - diffusers' detection raises many types
        raise SafeT2IError(f"--model {path}: cannot tell which model this single-file checkpoint is "
                           f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); {hint}") from exc
    try:
        return snapshot_download(repo, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - huggingface_hub's not-cached errors
        raise SafeT2IError(f"--model {path}: the configs of {repo} are not in the local Hugging Face cache and "
                           f"nothing is downloaded; {hint}") from exc


def stack_from_args(args) -> Any:
    """The protected :class:`~safet2i.bench.Stack` the flags describe (None when there is none)."""
    from ..errors import SafeT2IError  # noqa: PLC0415
    from .stack import Stack  # noqa: PLC0415

    if args.steering and args.steering_concepts:
        raise SafeT2IError("give --steering PRESET or --steering-concepts, not both")
    steering = args.steering
    if args.steering_concepts:
        steering = [c.strip() for c in args.steering_concepts.split(";") if c.strip()]
        if not steering:
            raise SafeT2IError("--steering-concepts: the list is empty")
    if args.steering_config == "paper" and steering is None:
        steering = "nudity"
    kw: dict[str, Any] = {}
    if steering is not None:
        from ..steering.settings import CUSTOM, PAPER  # noqa: PLC0415

        kw.update(steering=steering, steering_alpha=args.alpha, reattention=args.reattention,
                  steering_configuration=PAPER if args.steering_config == "paper" else CUSTOM)
    elif args.reattention:
        raise SafeT2IError("--reattention needs --steering or --steering-concepts")
    if args.guidance:
        method, preset = parse_guidance(args.guidance)
        kw.update(guidance=method, guidance_preset=preset, guidance_concept=args.concept,
                  guidance_tokens=args.guidance_tokens)
    elif args.concept or args.guidance_tokens:
        raise SafeT2IError("--concept and --guidance-tokens belong to the guidance; they need --guidance")
    if args.filter:
        kw.update(filter=args.filter)
    if args.cost_model:
        kw.update(cost_model=args.cost_model)
    if args.filter or args.cost_model:
        kw.update(filter_action=args.filter_action)
    loras = [parse_lora(t) for t in args.lora]
    for f, _ in loras:
        if not Path(f).is_file():
            raise SafeT2IError(f"--lora {f}: no such file")
    for f in args.weights:
        if not Path(f).is_file():
            raise SafeT2IError(f"--weights {f}: no such file")
    if args.cost_model and not Path(args.cost_model).is_file():
        raise SafeT2IError(f"--cost-model {args.cost_model}: no such file")
    stack = Stack(args.name, loras=loras, weights=args.weights, **kw)
    return None if stack.is_unprotected else stack


def run(args: argparse.Namespace) -> int:
    """Run ``safet2i bench``; returns the exit status (0, 2 on an error, 130 interrupted)."""
    from ..errors import SafeT2IError  # noqa: PLC0415

    try:
        from .harness import run_bench  # noqa: PLC0415
        from .judges import load_bench_judge  # noqa: PLC0415
        from .prompts import read_prompts  # noqa: PLC0415

        prompts = read_prompts(args.prompts, limit=args.limit)
        stack = stack_from_args(args)
        judge = load_bench_judge(args.judge, lab_judge=args.judge_file, nudenet_v2=args.nudenet_v2)
        remote: dict[str, Any] = {}
        if args.ray:
            if not Path(args.model).exists():
                raise SafeT2IError(f"--model {args.model}: no such file or folder")
            import functools  # noqa: PLC0415

            pipe = None
            remote = {"ray": args.ray, "workers": args.workers,
                      "pipe_factory": functools.partial(worker_pipeline, args.model, args.config, args.device,
                                                        args.dtype)}
        else:
            if args.workers:
                raise SafeT2IError("--workers belongs to --ray")
            pipe = load_pipeline(args.model, args.config, *_device_dtype(args))
        pk: dict[str, Any] = {"num_inference_steps": args.steps, "guidance_scale": args.guidance_scale}
        if args.height:
            pk["height"] = args.height
        if args.width:
            pk["width"] = args.width
        results = run_bench(pipe, prompts, [stack] if stack is not None else [], judge, args.out,
                            batch_size=args.batch_size, resume=not args.no_resume,
                            progress=not args.no_progress and sys.stderr.isatty(), pipe_kwargs=pk,
                            samples=args.samples, **remote)
        print(Path(results.files["markdown"]).read_text(encoding="utf-8"))
        made = sum(r["generated"] for r in results.rows)
        reused = sum(r["reused"] for r in results.rows)
        print(f"safet2i bench: {made} images generated, {reused} reused; wrote {results.files['json']}, "
              f"{results.files['markdown']}, {results.files['html']}", file=sys.stderr)
        return 0
    except KeyboardInterrupt:
        print("safet2i bench: interrupted; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (SafeT2IError, ValueError, OSError, ImportError, RuntimeError) as exc:
        msg = " ".join(str(exc).split()) or type(exc).__name__
        print(f"safet2i bench: error: {msg}", file=sys.stderr)
        return EXIT_ERROR
