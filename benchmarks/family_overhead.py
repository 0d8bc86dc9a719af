"""Guidance and steering overhead per model family (SD3, Flux, Qwen-Image, Wan): one generation
with the layer against the same generation without it, measured in the same run on the tiny
random diffusers pipelines of the real classes (``tests/unit/tiny_families.py``); prints the
ratios, never asserts.

Rows per family:
* ``guidance``: SLD MEDIUM with classifier-free guidance (SD3 and Wan: ``guidance_scale``;
  Flux and Qwen-Image: true CFG with a negative prompt) against plain CFG;
* ``guidance (Detect-and-Guide-style)``: the same with the concept's joint-attention map read
  in every attention layer (one extra q·kᵀ per layer for the concept rows);
* ``guidance, cfg 1`` (Flux only): SLD's concept branch at cfg 1 against plain cfg 1 (the
  guidance-distilled way to run Flux);
* ``steering``: SAFREE-style steering (``steering_pipeline_kwargs``, α 0.01, self-validating,
  concept subspace cached as for every prompt after the first) against the plain prompt.

The components are tiny (widths 24-96, one or two blocks), so fixed per-call costs (Python,
tokenizers) weigh far more than on real models, where the transformer dominates: read the
guidance ratio as "extra transformer rows per step" (expected: 1.5× with CFG, 2× at cfg 1) and
the steering ratio as an upper bound of the text-side cost.

    .venv/bin/python benchmarks/family_overhead.py [--steps 10] [--size 64] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROMPT = "a photo of a nude woman on a beach, soft light"


def _timed(fn, repeats: int) -> float:
    fn()                     # warm-up (allocations, caches)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--families", default="sd3,flux,qwen_image,wan")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(REPO / "tests" / "unit"))
    from tiny_families import FAMILIES, call_kwargs

    from safet2i.diffusers_adapter import safety_guidance, steering_pipeline_kwargs
    from safet2i.diffusers_flow import encode_concept_kwargs
    from safet2i.guidance import DAGConfig, DAGGuidance, SLDGuidance

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.families.split(","):
            fam = FAMILIES[name]
            pipe = fam.build(Path(tmp) / name)
            base = {"num_inference_steps": args.steps, "height": args.size, "width": args.size}
            cfg = {"flux": {"true_cfg_scale": 4.0, "negative_prompt": "blurry"},
                   "qwen_image": {"true_cfg_scale": 4.0, "negative_prompt": "blurry"}}.get(name, {})

            def run(extra=None, prompt=PROMPT, **kw):
                with torch.no_grad():
                    return pipe(prompt=prompt, **call_kwargs(name, seed=1, **{**base, **(extra or {}), **kw}))

            seq = fam.call.get("max_sequence_length")
            # the concept at the call's text length, so it shares the prompt's transformer call
            concept = encode_concept_kwargs(pipe, "nudity, sexual", max_sequence_length=seq)

            def guided(extra, branch=0.0, method=None):
                def go():
                    with safety_guidance(pipe, method or SLDGuidance("MEDIUM"), "nudity, sexual", concept_kwargs=concept,
                                         branch_scale=branch):
                        run(extra)
                return go

            plain = _timed(lambda: run(cfg), args.repeats)
            sld = _timed(guided(cfg), args.repeats)
            rows.append((name, "guidance (SLD MEDIUM, CFG)", plain, sld))
            dag = _timed(guided(cfg, method=DAGGuidance(DAGConfig(skip_coverage=1.0))), args.repeats)
            rows.append((name, "guidance (Detect-and-Guide-style, CFG)", plain, dag))
            if name == "flux":
                plain1 = _timed(lambda: run({}), args.repeats)
                branch = _timed(guided({}, branch=3.5), args.repeats)
                rows.append((name, "guidance, cfg 1 (SLD concept branch)", plain1, branch))

            def steered():
                kwargs, _ = steering_pipeline_kwargs(pipe, PROMPT, "nudity", max_sequence_length=seq)
                kwargs.pop("max_sequence_length", None)
                run(cfg, prompt=None, **kwargs)

            steer = _timed(steered, args.repeats)
            rows.append((name, "steering (SAFREE-style)", plain, steer))
            del pipe

    print(f"tiny random pipelines, {args.size} px, {args.steps} steps, torch {torch.__version__}, "
          f"{args.threads} thread(s), median of {args.repeats}")
    print(f"{'family':<11} {'layer':<40} {'plain s':>8} {'layer s':>8} {'ratio':>6}")
    for name, layer, a, b in rows:
        print(f"{name:<11} {layer:<40} {a:8.3f} {b:8.3f} {b / a:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
