"""The seed methods' trainers run in the lab (issue: trainers measured in the efficacy lab).

Each function trains one method on the lab model with data from the lab world only (never any
NSFW data), timing the run and sampling its resident memory, and returns a :class:`LabRun`
with the output file. The choices that adapt a method to the lab are documented here:

* **DUO**: unsafe prompts are ``direct`` concept captions of the train split ("two large red
  squares ..."); each safe prompt is the same caption with the concept word replaced by a
  benign colour (the lab's "dressed" for "naked"). The judge is the lab judge's concept head.
  Images are sampled with the lab's sampler (DDIM 25, CFG 3: the model's regime) and SDEdit
  keeps DUO's strength 0.75 at the same CFG.
* **SC-DPO**: harmful prompts cycle the four concept forms, clean prompts are benign captions
  (train split); r is the lab judge's attribute agreement with the prompt's attributes (the
  share it recognises, the concept value not counted: the cost judges that), C the lab's
  learned cost model: the rewards every trainer shares (:mod:`safet2i.train.shielddiff`).
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .world import ATTRIBUTES, BACKGROUNDS, World


@dataclass
class LabRun:
    """One trainer run in the lab: its output file(s), seconds, peak resident memory (MiB,
    sampled) and the trainer's summary."""
    method: str
    files: list[str]
    seconds: float
    peak_rss_mib: float | None
    rss_increase_mib: float | None
    summary: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "files": self.files, "seconds": round(self.seconds, 1),
                "peak_rss_mib": self.peak_rss_mib, "rss_increase_mib": self.rss_increase_mib,
                "summary": self.summary}


def _rss_mib() -> float | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


class MemorySampler:
    """Samples this process's resident memory every ``interval`` seconds (Linux ``/proc``;
    None elsewhere): ``peak`` and ``baseline`` in MiB."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.baseline, self.peak = interval, _rss_mib(), _rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            v = _rss_mib()
            if v is not None and (self.peak is None or v > self.peak):
                self.peak = v

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        v = _rss_mib()
        if v is not None and (self.peak is None or v > self.peak):
            self.peak = v


def timed(method: str, fn: Callable[[], Any]) -> tuple[Any, LabRun]:
    """Run ``fn`` and measure it: ``(its result, LabRun without files)``."""
    with MemorySampler() as mem:
        t0 = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - t0
    inc = None if mem.peak is None or mem.baseline is None else round(mem.peak - mem.baseline, 1)
    return result, LabRun(method, [], seconds, None if mem.peak is None else round(mem.peak, 1), inc)


# ------------------------------------------------------------------------------ prompts

def duo_prompts(world: World, n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """``n`` direct concept captions (train split) and their safe counterparts (the concept
    word replaced by a benign colour that is not the image's background)."""
    concept = world.config.concept
    benign = [c for c in ATTRIBUTES["colour"] if c != concept]
    unsafe, safe = [], []
    for i in range(n):
        s = world.sample(seed * 100_003 + i, "direct", "train")
        choices = [c for c in benign if c != s.attributes["background"] and c not in BACKGROUNDS]
        colour = choices[i % len(choices)]
        unsafe.append(s.caption)
        safe.append(re.sub(rf"\b{re.escape(concept)}\b", colour, s.caption))
    return unsafe, safe


def scdpo_prompts(world: World, n_harmful: int, n_clean: int, seed: int = 0
                  ) -> tuple[list[str], list[str], dict[str, dict[str, Any]]]:
    """Harmful prompts (the four concept forms in turn), clean prompts (benign) of the train
    split, and every prompt's attributes (what the reward compares with)."""
    forms = ("direct", "synonym", "indirect", "misspelled")
    attrs: dict[str, dict[str, Any]] = {}
    harmful, clean = [], []
    for i in range(n_harmful):
        s = world.sample(seed * 100_003 + 50_000 + i, forms[i % 4], "train")
        harmful.append(s.caption)
        attrs[s.caption] = dict(s.attributes)
    for i in range(n_clean):
        s = world.sample(seed * 100_003 + 60_000 + i, "benign", "train")
        clean.append(s.caption)
        attrs[s.caption] = dict(s.attributes)
    return harmful, clean, attrs


# ------------------------------------------------------------------------------ scorers

def concept_judge(judge: Any) -> Callable[[np.ndarray], np.ndarray]:
    """The lab judge's concept head as ``images -> bool [N]`` (True: the concept is shown)."""
    return lambda images: np.asarray(judge.judge_images(images)["concept"], bool)


def sc_dpo_scorers(judge: Any, cost_model: str | os.PathLike, attributes: dict[str, dict[str, Any]]):
    """SC-DPO's ``(reward, cost)`` in the lab, the rewards every trainer shares
    (:mod:`safet2i.train.shielddiff`): r the lab judge's attribute agreement with the prompt's
    attributes (the concept value not counted: the cost judges it), C the learned cost model."""
    from ..train import shielddiff as sd  # noqa: PLC0415
    from ..train.dpo import from_reward  # noqa: PLC0415

    return (from_reward(sd.lab_alignment_reward(judge, attributes=attributes)),
            from_reward(sd.cost_model_reward(cost_model, transform="negative-cost"), -1.0))


# ------------------------------------------------------------------------------ runs

def lab_duo(pipe: Any, world: World, judge: Any, out: str | Path, *, n_pairs: int = 64, config: Any = None,
            seed: int = 0, steps: int = 25, guidance_scale: float = 3.0, progress: bool = True,
            device: str = "cpu") -> LabRun:
    """DUO in the lab: pairs (module docstring), then :func:`safet2i.train.dpo.train_duo`."""
    from ..train import dpo  # noqa: PLC0415

    def run():
        unsafe, safe = duo_prompts(world, n_pairs, seed)
        pairs = dpo.make_duo_pairs(pipe, unsafe, safe, concept_judge(judge), n=n_pairs, seed=seed, steps=steps,
                                   guidance_scale=guidance_scale, sdedit_guidance_scale=guidance_scale,
                                   progress=progress)
        return dpo.train_duo(pipe, pairs, config or dpo.DuoConfig(), out=out, device=device, base_model="lab",
                             arch="lab", progress=progress, overwrite=True)

    res, lr = timed("DUO", run)
    lr.files, lr.summary = [str(f) for f in res.files], res.summary
    return lr


def lab_sc_dpo(pipe: Any, world: World, judge: Any, cost_model: str | Path, out: str | Path, *,
               dfm: bool = True, n_harmful: int = 32, n_clean: int = 32, config: Any = None, seed: int = 0,
               progress: bool = True, device: str = "cpu") -> LabRun:
    """SC-DPO in the lab (module docstring), with or without DFM."""
    import dataclasses  # noqa: PLC0415

    from ..train import dpo  # noqa: PLC0415

    cfg = config or dpo.ScDpoConfig(guidance_scale=3.0)
    if not dfm:
        cfg = dataclasses.replace(cfg, dfm_gamma=0.0)
    harmful, clean, attrs = scdpo_prompts(world, n_harmful, n_clean, seed)

    reward, cost = sc_dpo_scorers(judge, cost_model, attrs)

    def run():
        return dpo.train_sc_dpo(pipe, harmful, clean, cfg, reward=reward, cost=cost, out=out, device=device, base_model="lab", arch="lab",
                                data_note=f"lab world {world.config}", progress=progress, overwrite=True)

    res, lr = timed("SC-DPO" if dfm else "SC-DPO (no DFM)", run)
    lr.files, lr.summary = [str(f) for f in res.files], res.summary
    return lr
