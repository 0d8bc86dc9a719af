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
        return {"method": self.method, "files": self.files, "seconds": round(self.seconds, 3),
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
            device: str = "cpu", pair_judge: Callable[[np.ndarray], np.ndarray] | None = None) -> LabRun:
    """DUO in the lab: pairs (module docstring), then :func:`safet2i.train.dpo.train_duo`.
    ``pair_judge`` replaces the lab judge's concept head in the pair generation (plumbing tests
    on models whose images are noise)."""
    from ..train import dpo  # noqa: PLC0415

    def run():
        unsafe, safe = duo_prompts(world, n_pairs, seed)
        pairs = dpo.make_duo_pairs(pipe, unsafe, safe, pair_judge or concept_judge(judge), n=n_pairs, seed=seed, steps=steps,
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


def lab_shielddiff(pipe: Any, world: World, judge: Any, cost_model: str | Path, out: str | Path, *,
                   prompts_per_form: int = 1, overrides: dict[str, Any] | None = None, progress: bool = True,
                   device: str = "cpu") -> LabRun:
    """ShieldDiff-style RL in the lab: ``prompts_per_form`` captions of each concept form, the
    lab's sampler (:meth:`ShieldDiffConfig.for_lab`), safety reward log σ(−C) of the learned cost
    model, alignment reward the lab judge's attribute agreement (concept not counted). The
    default epochs are sized to the 20-minute CPU budget, not to convergence (docs/training.md)."""
    from ..train import shielddiff as sd  # noqa: PLC0415
    from .world import CONCEPT_FORMS  # noqa: PLC0415

    samples = [world.sample(70_000 + i, f, "train") for i in range(prompts_per_form) for f in CONCEPT_FORMS]
    prompts = [s.caption for s in samples]
    attrs = {s.caption: dict(s.attributes) for s in samples}
    cfg = sd.ShieldDiffConfig.for_lab(prompts, **{"samples_per_prompt": 4, "epochs": 3, "sample_batch_size": 16,
                                                   "train_batch_size": 8, "device": device, **(overrides or {})})

    def run():
        return sd.train_shielddiff(pipe, cfg, safety_reward=sd.cost_model_reward(cost_model),
                                   alignment_reward=sd.lab_alignment_reward(judge, attributes=attrs), out=out,
                                   progress=progress, overwrite=True)

    path, lr = timed("ShieldDiff-style RL", run)
    import json  # noqa: PLC0415

    log = json.loads(Path(path).with_suffix(".log.json").read_text(encoding="utf-8"))
    lr.files = [str(path)]
    lr.summary = {k: log.get(k) for k in ("before", "after", "seconds", "seconds_per_epoch")}
    lr.summary["epochs"] = cfg.epochs
    return lr


def lab_dag_tokens(pipe: Any, world: World, out: str | Path, *, n_unsafe: int = 5, n_safe: int = 3,
                   n_eval: int = 32, config: Any = None, seed: int = 0, progress: bool = True) -> LabRun:
    """Detect-and-Guide guideline tokens in the lab (the world's masks as the unsafe regions),
    then the IoU of the highlighted region against held-out masks, optimised vs raw tokens."""
    from ..train.dag_tokens import DagTokenConfig, evaluate_detection, lab_training_data, train_dag_tokens  # noqa: PLC0415

    images, masks, safe = lab_training_data(world, n_unsafe, n_safe, seed)
    cfg = config or DagTokenConfig(concept=world.config.concept, seed=seed)

    def run():
        return train_dag_tokens(pipe, images, masks, safe, cfg, out=out, progress=progress, resume=False,
                                overwrite=True)

    path, lr = timed("Detect-and-Guide tokens", run)
    ev_images, ev_masks, _ = lab_training_data(world, n_eval, 0, seed + 1, split="heldout")
    ev = evaluate_detection(pipe, path, ev_images, ev_masks)
    lr.files = [str(path)]
    lr.summary = {"iou_optimised": ev["optimised"], "iou_raw": ev["raw"], "eval_images": n_eval,
                  "train_images": {"unsafe": n_unsafe, "safe": n_safe}}
    return lr


def _run_key(name: str, settings: dict[str, Any], cost_model: str | Path) -> str:
    """What a lab run's result depends on besides the model and judge (they name the folder):
    the trainer, its settings (callables by name, configs by value), the cost model's bytes and
    SafeT2I's version. A record with another key is trained again."""
    import dataclasses  # noqa: PLC0415
    import hashlib  # noqa: PLC0415
    import json  # noqa: PLC0415

    from .. import __version__  # noqa: PLC0415
    from ..runtime import file_sha256  # noqa: PLC0415

    def plain(o: Any) -> Any:
        if dataclasses.is_dataclass(o) and not isinstance(o, type):
            return dataclasses.asdict(o)
        return getattr(o, "__qualname__", None) or type(o).__name__

    cost = Path(cost_model)
    files = [cost, cost.with_suffix(".onnx")] if cost.suffix == ".json" else [cost]
    text = json.dumps({"trainer": name, "settings": settings, "version": __version__,
                       "cost": [file_sha256(f) for f in files if f.is_file()]}, sort_keys=True, default=plain)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


#: The trainer runs of the lab table, in order (name -> what it yields).
TRAINERS = ("DUO", "SC-DPO", "SC-DPO (no DFM)", "ShieldDiff-style RL", "Detect-and-Guide tokens")


def run_lab_trainers(pipe: Any, world: World, judge: Any, cost_model: str | Path, folder: str | Path, *,
                     which: Sequence[str] = TRAINERS, settings: dict[str, dict[str, Any]] | None = None,
                     progress: bool = True, log: Callable[[str], None] | None = None,
                     device: str | None = None) -> dict[str, LabRun]:
    """Run the lab trainers ``which`` into ``folder`` (one JSON record per run; a run whose record
    and files exist is reused, not retrained). ``settings[name]``: keyword arguments of that
    trainer's lab function (tests pass tiny configs)."""
    import json  # noqa: PLC0415

    from ..fileio import atomic_write  # noqa: PLC0415

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    settings = settings or {}
    say = log or (lambda _m: None)
    dev = device or str(getattr(pipe, "device", "cpu"))
    fns = {
        "DUO": lambda kw: lab_duo(pipe, world, judge, folder / "duo.safetensors", progress=progress, device=dev,
                                  **kw),
        "SC-DPO": lambda kw: lab_sc_dpo(pipe, world, judge, cost_model, folder / "sc-dpo.safetensors", dfm=True,
                                        progress=progress, device=dev, **kw),
        "SC-DPO (no DFM)": lambda kw: lab_sc_dpo(pipe, world, judge, cost_model, folder / "sc-dpo-no-dfm.safetensors",
                                                 dfm=False, progress=progress, device=dev, **kw),
        "ShieldDiff-style RL": lambda kw: lab_shielddiff(pipe, world, judge, cost_model,
                                                         folder / "shielddiff.safetensors", progress=progress,
                                                         device=dev, **kw),
        "Detect-and-Guide tokens": lambda kw: lab_dag_tokens(pipe, world, folder / "dag-tokens.safetensors",
                                                             progress=progress, **kw),
    }
    out: dict[str, LabRun] = {}
    for name in which:
        if name not in fns:
            raise ValueError(f"unknown lab trainer {name!r}; use {', '.join(TRAINERS)}")
        record = folder / (re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") + ".json")
        key = _run_key(name, settings.get(name, {}), cost_model)
        if record.is_file():
            try:
                d = json.loads(record.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                d = {}
            if d.get("key") == key and all(Path(f).is_file() for f in d.get("files", [])):
                out[name] = LabRun(d["method"], d["files"], d["seconds"], d["peak_rss_mib"], d["rss_increase_mib"],
                                   d["summary"])
                continue
        say(f"training {name} in the lab")
        run = fns[name](dict(settings.get(name, {})))
        data = json.dumps({**run.to_dict(), "key": key}, indent=1, default=str).encode()
        atomic_write(record, lambda fh: fh.write(data))
        out[name] = run
    return out
