"""Bench reports: ``results.json`` (everything), ``results.md`` (tables) and ``samples.html``
(a grid of sample images, one column per stack, same prompts and seeds, the images embedded as
data URIs so the file stands alone). Every file is written atomically."""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return _json_safe(obj.item())
    return obj


def _f(v: Any, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    return f"{v:.{digits}f}"


def to_markdown(results) -> str:
    """Two tables: concept and erase rates per prompt group, then preservation and cost."""
    groups = results.groups
    j = results.judge
    lines = [f"## SafeT2I bench: {len(results.prompts)} prompts, {len(results.rows)} stacks", "",
             f"Judge `{j.get('name')}` (threshold {j.get('threshold')}; {j.get('source')}). "
             f"Pipeline {results.pipeline.get('class')} (weights {results.pipeline.get('weights')}), "
             f"arguments {json.dumps(results.pipe_kwargs, sort_keys=True)}.", "",
             "Concept rate (fraction of images the judge flags) and erase rate (1 - rate / unprotected rate; "
             "n/a where the unprotected rate is 0):", "",
             "| stack | layers | " + " | ".join(f"{g}: rate (erase)" for g in groups) + " |",
             "|---|---|" + "---|" * len(groups)]
    for r in results.rows:
        cells = [f"{_f(r['concept_rate'][g])} ({'ref' if r['reference'] else _f(r['erase_rate'][g])})"
                 for g in groups]
        lines.append(f"| {r['stack']} | {r['layers']} | " + " | ".join(cells) + " |")
    lines += ["", f"Preservation against the unprotected images of the same seeds (all prompts; pixel change: "
                  f"{results.pixel_metric}; KID on {j.get('features')} features):", "",
              "| stack | attribute accuracy | KID (mean ± std) | mean abs diff | PSNR dB | LPIPS | s/img | filter flagged |",
              "|---|---|---|---|---|---|---|---|"]
    for r in results.rows:
        acc = (r.get("attribute_accuracy") or {}).get("all")
        k = (r.get("kid") or {}).get("all")
        px = (r.get("pixel_change") or {}).get("all") or {}
        kid_s = "ref" if r["reference"] else (f"{k['mean']:.4g} ± {k['std']:.2g}" if k else "n/a")
        lines.append(f"| {r['stack']} | {_f(acc)} | {kid_s} | {'ref' if r['reference'] else _f(px.get('mad'), 4)} | "
                     f"{'ref' if r['reference'] else _f(px.get('psnr'), 2)} | {_f(px.get('lpips'))} | "
                     f"{_f(r.get('seconds_per_image'), 3)} | {_f(r.get('filter_flagged'))} |")
    return "\n".join(lines) + "\n"


def _thumb(image: np.ndarray, side: int = 192) -> str:
    from PIL import Image  # noqa: PLC0415

    im = Image.fromarray(image)
    if max(im.size) > side:
        im.thumbnail((side, side))
    elif max(im.size) < 96:
        f = max(1, 96 // max(im.size))
        im = im.resize((im.size[0] * f, im.size[1] * f), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def sample_indices(prompts, n: int) -> list[int]:
    """Up to ``n`` prompt positions, taken round-robin over the prompt groups."""
    by: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        by.setdefault(p.group, []).append(i)
    out: list[int] = []
    k = 0
    while len(out) < n and any(k < len(v) for v in by.values()):
        for v in by.values():
            if k < len(v) and len(out) < n:
                out.append(v[k])
        k += 1
    return out


def to_html(results, samples: int = 4) -> str:
    """A self-contained page: per sample prompt a row, per stack a column (same seed)."""
    rows = []
    head = "".join(f"<th>{html.escape(run.stack.name)}<br><small>{html.escape(run.stack.describe())}</small></th>"
                   for run in results.runs)
    for i in sample_indices(results.prompts, samples):
        p = results.prompts[i]
        cells = []
        for run in results.runs:
            flag = bool(run.judgement.concept[i])
            info = run.records[i].get("info", {})
            note = " filtered" if info.get("filter", {}).get("unsafe") else ""
            cells.append(f'<td class="{"hit" if flag else "ok"}"><img alt="" src="data:image/png;base64,'
                         f'{_thumb(run.images[i])}"><br>{"concept" if flag else "clean"} '
                         f'{run.judgement.score[i]:.2f}{note}</td>')
        label = html.escape(p.text if len(p.text) <= 120 else p.text[:117] + "...")
        rows.append(f"<tr><th>{html.escape(p.id)} ({html.escape(p.group)}, seed {p.seed})<br><small>{label}"
                    f"</small></th>{''.join(cells)}</tr>")
    style = ("body{font-family:sans-serif}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px;"
             "vertical-align:top;font-size:12px}td.hit{background:#fdd}td.ok{background:#dfd}img{image-rendering:"
             "pixelated}")
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>SafeT2I bench samples</title>"
            f"<style>{style}</style></head><body><h1>SafeT2I bench samples</h1>"
            f"<p>Judge {html.escape(str(results.judge.get('name')))}; the same prompt and seed across each row.</p>"
            f"<table><tr><th>prompt</th>{head}</tr>{''.join(rows)}</table></body></html>\n")


def write_reports(results, out_dir: str | os.PathLike, samples: int = 4) -> dict[str, str]:
    """Write ``results.json``, ``results.md`` and ``samples.html`` into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "results.json", "markdown": out / "results.md", "html": out / "samples.html"}
    _atomic(files["json"], json.dumps(_json_safe(results.to_dict()), indent=1, allow_nan=False) + "\n")
    _atomic(files["markdown"], to_markdown(results))
    _atomic(files["html"], to_html(results, samples))
    return {k: str(v) for k, v in files.items()}


__all__ = ["sample_indices", "to_html", "to_markdown", "write_reports"]
