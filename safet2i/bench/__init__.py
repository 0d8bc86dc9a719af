"""``safet2i bench``: one harness for the papers' protocols (see ``docs/bench.md``).

A prompt set (:mod:`.prompts`) runs through a diffusers pipeline under stacks of SafeT2I layers
(:mod:`.stack`), fixed seeds, batched and resumable (:mod:`.harness`); a named judge
(:mod:`.judges`) flags the images; :mod:`.metrics` compares every stack with the unprotected
model; :mod:`.report` writes JSON, Markdown and an HTML sample grid.

    from safet2i.bench import Prompt, Stack, run_bench, load_bench_judge
    results = run_bench(pipe, prompts, [Stack("sld", guidance="SLD", guidance_preset="MEDIUM")],
                        judge=load_bench_judge("i2p-5"), out_dir="bench-out",
                        pipe_kwargs=dict(num_inference_steps=25, guidance_scale=7.5))
    results.rows
"""

from __future__ import annotations

from .harness import BenchResults, StackRun, pipeline_identity, run_bench
from .judges import PRESETS as JUDGE_PRESETS
from .judges import BenchJudge, Judgement, LabJudge, as_bench_judge, load_bench_judge
from .metrics import attribute_accuracy, concept_rate, erase_rate, kid, mmd2_unbiased, pixel_change
from .prompts import Prompt, PromptFileError, read_prompts
from .stack import Stack, apply_stack

__all__ = [
    "JUDGE_PRESETS", "BenchJudge", "BenchResults", "Judgement", "LabJudge", "Prompt", "PromptFileError", "Stack",
    "StackRun", "apply_stack", "as_bench_judge", "attribute_accuracy", "concept_rate", "erase_rate", "kid",
    "load_bench_judge", "mmd2_unbiased", "pipeline_identity", "pixel_change", "read_prompts", "run_bench",
]
