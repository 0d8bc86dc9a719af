"""``run_bench``: a prompt set through a pipeline under several stacks, judged and compared.

The unprotected stack always runs first (it is added when the caller did not pass one) and is
the reference: erase rates, KID and pixel change of every other stack are measured against its
images of the same prompts and seeds.

On disk (``out_dir``)::

    runs/<stack name>-<run key>/records.jsonl   one JSON line per finished image
    runs/<stack name>-<run key>/<id>-<hash>.png  the image (after the stack's filter)
    results.json, results.md, samples.html        the reports (:mod:`.report`)

The run key is a hash of the stack's settings and files (:meth:`Stack.key`), the pipeline's
identity (:func:`pipeline_identity`: class, component configs and a sample of every weight
tensor) and the pipeline arguments; each record is keyed by its prompt's id, text and seed.
With ``resume`` an image whose record and PNG exist under the same run key is not generated
again; a changed stack, pipeline or argument is another run key, so nothing stale is reused.
Images are generated with one CPU generator per image (its prompt's seed), so an image does not
depend on which batch it was generated in (up to the floating-point differences batched kernels
may have). With ``ray=`` the same calls run on Ray actors (:mod:`.distributed`); this process
writes the records, judges and reports as in a local run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SafeT2IError
from . import metrics
from .judges import BenchJudge, Judgement, as_bench_judge
from .prompts import Prompt, check_prompts
from .stack import Stack, apply_stack

RECORDS = "records.jsonl"
_FORMAT = "safet2i.bench/1"


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))


def _sha(text: str, n: int = 16) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def pipeline_identity(pipe) -> dict[str, Any]:
    """What identifies a pipeline's output: its class, the configs of its components, its dtype
    and a digest of every weight tensor's name, shape, dtype and 64 strided values (cheap on SD
    sized models, and it tells two random initialisations or two checkpoints apart)."""
    import torch  # noqa: PLC0415

    comps = {}
    h = hashlib.sha256()
    for name in ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler"):
        comp = getattr(pipe, name, None)
        if comp is None:
            continue
        cfg = getattr(comp, "config", None)
        cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg or {})
        cfg.pop("transformers_version", None)
        cfg.pop("_diffusers_version", None)
        comps[name] = {"class": type(comp).__name__, "config": _sha(_canonical(cfg), 16)}
        if isinstance(comp, torch.nn.Module):
            with torch.no_grad():
                for pname, p in comp.state_dict().items():
                    flat = p.detach().reshape(-1)
                    step = max(1, flat.numel() // 64)
                    sample = flat[::step][:64].to("cpu", torch.float64).numpy()
                    h.update(f"{name}.{pname}:{tuple(p.shape)}:{p.dtype}".encode())
                    h.update(sample.tobytes())
    return {"class": type(pipe).__name__, "components": comps, "weights": h.hexdigest()[:24],
            "name_or_path": str(getattr(getattr(pipe, "config", {}), "get", lambda *_: None)("_name_or_path") or "")}


def prompt_key(p: Prompt) -> str:
    return _sha(_canonical(p.identity()), 16)


def _safe(text: str, n: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)[:n] or "_"


# --------------------------------------------------------------------------- results


@dataclass
class StackRun:
    """One stack's images and verdicts, in prompt order."""

    stack: Stack
    run_key: str
    folder: Path
    records: list[dict[str, Any]]
    images: np.ndarray
    judgement: Judgement
    generated: int = 0
    reused: int = 0

    @property
    def seconds_per_image(self) -> float | None:
        s = [r["seconds"] for r in self.records if r.get("seconds") is not None]
        return float(np.mean(s)) if s else None


@dataclass
class BenchResults:
    """What :func:`run_bench` measured. ``rows``: one dict per stack (the reference first)::

        {"stack", "layers", "run_key", "n", "reference" (bool), "generated", "reused",
         "concept_rate": {group: rate}, "erase_rate": {group: rate or None},
         "mean_score": {group: mean judge score}, "other_rates": {flag name: {group: rate}},
         "attribute_accuracy": {group: mean accuracy} or None,
         "kid": {group: {"mean", "std", "subsets", "subset_size"}} or None,
         "pixel_change": {group: {"mad", "psnr", "identical", "lpips", "metric"}} or None,
         "seconds_per_image", "filter_flagged" (fraction, stacks with a filter)}

    Groups are the prompts' forms in first-seen order, and ``"all"``."""

    out_dir: Path
    prompts: list[Prompt]
    runs: list[StackRun]
    rows: list[dict[str, Any]]
    judge: dict[str, Any]
    pipeline: dict[str, Any]
    pipe_kwargs: dict[str, Any]
    groups: list[str]
    pixel_metric: str
    files: dict[str, str] = field(default_factory=dict)

    def row(self, stack_name: str) -> dict[str, Any]:
        for r in self.rows:
            if r["stack"] == stack_name:
                return r
        raise KeyError(stack_name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "judge": self.judge,
            "pipeline": self.pipeline,
            "pipe_kwargs": self.pipe_kwargs,
            "groups": self.groups,
            "pixel_metric": self.pixel_metric,
            "prompts": len(self.prompts),
            "rows": self.rows,
            "images": {run.stack.name: [{"id": r["id"], "seed": r["seed"], "png": str(run.folder / r["png"]),
                                         "concept": bool(c), "score": float(s), "info": r.get("info", {})}
                                        for r, c, s in zip(run.records, run.judgement.concept, run.judgement.score)]
                       for run in self.runs},
        }


# --------------------------------------------------------------------------- running


def _read_records(path: Path) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return out
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by an interruption: that image is generated again
        if isinstance(rec, dict) and isinstance(rec.get("key"), str) and (path.parent / str(rec.get("png"))).is_file():
            out[rec["key"]] = rec
    return out


def _save_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image  # noqa: PLC0415

    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(image).save(tmp, format="PNG")
    os.replace(tmp, path)


def _load_png(path: Path) -> np.ndarray:
    from PIL import Image  # noqa: PLC0415

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _order(stacks: Sequence[Stack]) -> list[Stack]:
    stacks = list(stacks)
    for s in stacks:
        if not isinstance(s, Stack):
            raise SafeT2IError(f"run_bench: stacks must be safet2i.bench.Stack objects, got {type(s).__name__}")
    refs = [s for s in stacks if s.is_unprotected]
    ref = refs[0] if refs else Stack("unprotected")
    ordered = [ref] + [s for s in stacks if s is not ref]
    names = [s.name for s in ordered]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SafeT2IError(f"run_bench: stack names must be unique, repeated: {', '.join(dup)}")
    return ordered


@dataclass
class _Work:
    """One stack's work in a run: what is done (its records), what is left (``todo``)."""

    stack: Stack
    run_key: str
    folder: Path
    keys: list[str]
    done: dict[str, dict[str, Any]]
    todo: list[tuple[Prompt, str]]
    fresh: dict[str, np.ndarray] = field(default_factory=dict)
    fh: Any = None

    def chunks(self, batch_size: int) -> list[list[tuple[Prompt, str]]]:
        """The generation calls, the same in a local and a distributed run (so are the images)."""
        return [self.todo[i:i + batch_size] for i in range(0, len(self.todo), batch_size)]

    def write(self, chunk: list[tuple[Prompt, str]], images, infos, seconds: float) -> None:
        """Save one call's images and append their records (flushed: an interruption loses at
        most the call in flight)."""
        if self.fh is None:
            self.fh = (self.folder / RECORDS).open("a", encoding="utf-8")
        dt = seconds / max(1, len(chunk))
        for (p, k), img, info in zip(chunk, images, infos):
            png = f"{_safe(p.id)}-{k[:8]}.png"
            _save_png(self.folder / png, img)
            rec = {"key": k, "id": p.id, "seed": p.seed, "text": p.text, "png": png,
                   "seconds": round(dt, 6), "info": info}
            self.fh.write(json.dumps(rec) + "\n")
            self.done[k] = rec
            self.fresh[k] = np.ascontiguousarray(img)   # as a PNG loads: metrics sum in the same order
        self.fh.flush()

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None

    def result(self) -> tuple[list[dict], np.ndarray]:
        records = [self.done[k] for k in self.keys]
        images = np.stack([self.fresh[k] if k in self.fresh else _load_png(self.folder / self.done[k]["png"])
                           for k in self.keys])
        return records, images


def _prepare(stack: Stack, prompts: list[Prompt], run_key: str, folder: Path, resume: bool) -> _Work:
    folder.mkdir(parents=True, exist_ok=True)
    rec_path = folder / RECORDS
    if not resume and rec_path.exists():
        rec_path.unlink()
    done = _read_records(rec_path) if resume else {}
    keys = [prompt_key(p) for p in prompts]
    todo = [(p, k) for p, k in zip(prompts, keys) if k not in done]
    return _Work(stack, run_key, folder, keys, done, todo)


def _generate_here(pipe, works: list[_Work], batch_size: int, bar, pipe_kwargs: dict, providers) -> None:
    for w in works:
        if not w.todo:
            continue
        if bar is not None:
            bar.set_description(f"bench {w.stack.name}")
        try:
            with apply_stack(pipe, w.stack, providers=providers) as generate:
                for chunk in w.chunks(batch_size):
                    t0 = time.perf_counter()
                    images, infos = generate([p.text for p, _ in chunk], [p.seed for p, _ in chunk], **pipe_kwargs)
                    w.write(chunk, images, infos, time.perf_counter() - t0)
                    if bar is not None:
                        bar.update(len(chunk))
        finally:
            w.close()


def _groups(prompts: list[Prompt]) -> tuple[list[str], dict[str, np.ndarray]]:
    order = list(dict.fromkeys(p.group for p in prompts))
    idx = {g: np.asarray([i for i, p in enumerate(prompts) if p.group == g]) for g in order}
    if order != ["all"]:
        idx["all"] = np.arange(len(prompts))
        order.append("all")
    return order, idx


def _rows(runs: list[StackRun], prompts: list[Prompt], groups: list[str], idx: dict[str, np.ndarray],
          kid_subsets: int, kid_subset_size: int, use_lpips: bool) -> list[dict[str, Any]]:
    ref = runs[0]
    ref_rates = {g: metrics.concept_rate(ref.judgement.concept[idx[g]]) for g in groups}
    rows = []
    for n, run in enumerate(runs):
        j = run.judgement
        rates = {g: metrics.concept_rate(j.concept[idx[g]]) for g in groups}
        row: dict[str, Any] = {
            "stack": run.stack.name, "layers": run.stack.describe(), "run_key": run.run_key,
            "n": len(run.records), "reference": n == 0, "generated": run.generated, "reused": run.reused,
            "concept_rate": rates,
            "erase_rate": {g: metrics.erase_rate(rates[g], ref_rates[g]) for g in groups},
            "mean_score": {g: float(np.mean(j.score[idx[g]])) for g in groups},
            "other_rates": {name: {g: metrics.concept_rate(np.asarray(f, bool)[idx[g]]) for g in groups}
                            for name, f in (j.flags or {}).items()},
            "attribute_accuracy": None, "kid": None, "pixel_change": None,
            "seconds_per_image": run.seconds_per_image,
        }
        if j.attributes is not None:
            acc = {}
            for g in groups:
                sel = [i for i in idx[g] if prompts[i].attributes]
                if sel:
                    acc[g] = metrics.attribute_accuracy([j.attributes[i] for i in sel],
                                                        [dict(prompts[i].attributes) for i in sel])["mean"]
            row["attribute_accuracy"] = acc or None
        if n > 0:
            if j.features is not None and ref.judgement.features is not None:
                fx, fy = metrics.unit_features(j.features), metrics.unit_features(ref.judgement.features)
                row["kid"] = {g: metrics.kid(fx[idx[g]], fy[idx[g]], kid_subsets, kid_subset_size, paired=True)
                              for g in groups if len(idx[g]) >= 2}
            if run.images.shape == ref.images.shape:
                row["pixel_change"] = {g: metrics.pixel_change(run.images[idx[g]], ref.images[idx[g]], use_lpips)
                                       for g in groups}
        if run.stack.has_filter:
            flags = [bool(r.get("info", {}).get("filter", {}).get("unsafe")) for r in run.records]
            row["filter_flagged"] = float(np.mean(flags))
        rows.append(row)
    return rows


def run_bench(pipe, prompts: Sequence[Prompt], stacks: Sequence[Stack], judge: Any, out_dir: str | os.PathLike,
              batch_size: int = 8, resume: bool = True, progress: bool = True, *, pipe_kwargs: dict | None = None,
              samples: int = 4, kid_subsets: int = 100, kid_subset_size: int = 1000, use_lpips: bool | None = None,
              write_reports: bool = True, providers=None, ray: str | None = None, workers: int | None = None,
              pipe_factory=None) -> BenchResults:
    """Run every stack (the unprotected one first) on ``prompts`` with ``pipe``, judge the images
    with ``judge`` (a :class:`~.judges.BenchJudge`, a preset name, or a lab AttributeClassifier)
    and compare (module docstring; rows: :class:`BenchResults`). ``pipe_kwargs`` go to every
    pipeline call (``num_inference_steps``, ``guidance_scale``, ...). ``samples``: prompts per
    stack in the HTML grid. Returns the results; with ``write_reports`` also writes
    ``results.json``, ``results.md`` and ``samples.html`` to ``out_dir``.

    ``ray`` (``"auto"`` or a cluster address): the images are generated on a Ray cluster by
    ``workers`` actors (default: one per GPU, else the CPUs less one), each loading the pipeline
    once with ``pipe_factory`` (a picklable callable returning it; ``pipe`` may then be None),
    the same calls as a local run (:mod:`.distributed`); records, judging and reports stay here."""
    prompts = check_prompts(prompts)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise SafeT2IError(f"run_bench: batch_size must be a positive integer, got {batch_size!r}")
    judge = as_bench_judge(judge)
    stacks = _order(stacks)
    pk = dict(pipe_kwargs or {})
    try:
        json.dumps(pk)
    except TypeError as exc:
        raise SafeT2IError(f"run_bench: pipe_kwargs must be plain JSON values (numbers, strings), not {exc}") from exc
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if ray is None and pipe is None:
        raise SafeT2IError("run_bench: pipe is None (a pipeline is needed, or ray= with pipe_factory=)")
    if ray is not None and pipe_factory is None:
        raise SafeT2IError("run_bench(ray=...) needs pipe_factory: a picklable callable that loads the "
                           "pipeline in each worker")
    cluster = contextlib.ExitStack()
    remote = None
    if use_lpips is None:
        use_lpips, lp_reason = metrics.lpips_available()
    else:
        lp_reason = "asked for" if use_lpips else "switched off"
    bar = None
    if progress:
        from tqdm import tqdm  # noqa: PLC0415

        bar = tqdm(total=len(prompts) * len(stacks), unit="img", desc="bench", leave=False)
    runs: list[StackRun] = []
    works: list[_Work] = []
    try:
        if ray is not None:
            from .distributed import RayGenerator  # noqa: PLC0415

            remote = cluster.enter_context(RayGenerator(ray, pipe_factory, workers=workers, providers=providers))
        ident = remote.identity if remote is not None else pipeline_identity(pipe)
        for stack in stacks:
            run_key = _sha(_canonical({"format": _FORMAT, "stack": stack.key(), "pipeline": ident, "kwargs": pk}))
            folder = out / "runs" / f"{_safe(stack.name)}-{run_key}"
            works.append(_prepare(stack, prompts, run_key, folder, resume))
            if bar is not None:
                bar.update(len(prompts) - len(works[-1].todo))
        if remote is not None:
            remote.generate(works, batch_size, bar, pk)
            cluster.close()         # the workers go before judging (their memory, their GPUs)
        else:
            _generate_here(pipe, works, batch_size, bar, pk, providers)
        for w in works:
            records, images = w.result()
            judgement = judge.judge(images)
            if len(judgement.concept) != len(images):
                raise SafeT2IError(f"judge {judge.name} returned {len(judgement.concept)} verdicts for {len(images)} images")
            runs.append(StackRun(w.stack, w.run_key, w.folder, records, images, judgement, len(w.fresh),
                                 len(prompts) - len(w.fresh)))
    finally:
        for w in works:
            w.close()
        cluster.close()
        if bar is not None:
            bar.close()
    groups, idx = _groups(prompts)
    rows = _rows(runs, prompts, groups, idx, kid_subsets, kid_subset_size, bool(use_lpips))
    metric = ("LPIPS (AlexNet) + mean abs diff + PSNR" if use_lpips
              else f"mean abs diff + PSNR (LPIPS not used: {lp_reason})")
    results = BenchResults(out, prompts, runs, rows, judge.describe(), ident, pk, groups, metric)
    if write_reports:
        from .report import write_reports as _write  # noqa: PLC0415

        results.files = _write(results, out, samples=samples)
    return results


__all__ = ["BenchResults", "StackRun", "pipeline_identity", "prompt_key", "run_bench"]
