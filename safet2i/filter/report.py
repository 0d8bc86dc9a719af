"""JSON and HTML reports of a filter run.

The HTML report embeds thumbnails of the *filtered* images only: an unsafe original is
never written into a report.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json

import numpy as np

from .. import __version__


def unpinned_models(filter_description: dict) -> list[dict]:
    """The models of a ``SafetyFilter.describe()`` that no sidecar sha256 pins (a model
    description without ``pinned`` counts as unpinned)."""
    return [m for m in filter_description.get("models", []) if m.get("pinned") is not True]


def pin_warnings(filter_description: dict) -> list[str]:
    """One line per unpinned model, for every report and node output."""
    return [
        f"WARNING: model {m.get('name')} is UNPINNED: its sidecar {m.get('sidecar') or '?'} has no "
        f"sha256, so its file was used unverified (sha256 of the bytes loaded: {m.get('sha256') or '?'})."
        for m in unpinned_models(filter_description)
    ]


def build_report(filter_description: dict, files: list[dict], skipped: list[dict] | None = None) -> dict:
    """``files``: one dict per input (``path``, ``output``, ``verdict`` in
    safe/unsafe/blocked/error, ``cost``, ``error``, ``images`` = per-frame verdict dicts).
    ``errors`` counts every file with an error, including an unsafe one whose output could
    not be written; ``skipped``: entries of the input folders not filtered, with reasons."""
    skipped = list(skipped or [])
    return {
        "safet2i": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "filter": filter_description,
        "summary": {
            "files": len(files),
            "images": sum(len(f.get("images", [])) for f in files),
            "safe": sum(f["verdict"] == "safe" for f in files),
            "unsafe": sum(f["verdict"] in ("unsafe", "blocked") for f in files),
            "errors": sum(bool(f.get("error")) for f in files),
            "skipped": len(skipped),
        },
        # Names of the models no sidecar sha256 pins (also flagged per model in filter.models).
        "unpinned_models": [m.get("name") for m in unpinned_models(filter_description)],
        "files": files,
        "skipped": skipped,
    }


def _text(text: str) -> str:
    """Undecodable file-name bytes (surrogate escapes) shown as replacement characters."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _write(path_or_fh, text: str) -> None:
    """Write ``text`` as UTF-8 to a path or to an open binary file."""
    data = _text(text).encode("utf-8")
    if hasattr(path_or_fh, "write"):
        path_or_fh.write(data)
    else:
        with open(path_or_fh, "wb") as fh:
            fh.write(data)


def write_json(report: dict, path) -> None:
    """``path``: a file path or an open binary file."""
    _write(path, json.dumps(report, indent=2, ensure_ascii=False) + "\n")   # names: replacement characters


def thumbnail_data_uri(img_u8: np.ndarray, size: int = 192) -> str:
    from PIL import Image  # noqa: PLC0415

    im = Image.fromarray(img_u8)
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;width:100%}td,th{border-bottom:1px solid #ddd;padding:6px;vertical-align:top;text-align:left}
.safe{color:#17672d;font-weight:600}.unsafe,.blocked{color:#a4161a;font-weight:600}.error{color:#8a5a00;font-weight:600}
img{max-width:192px;max-height:192px;border:1px solid #ccc}.muted{color:#777;font-size:90%}code{font-size:90%}
"""


def write_html(report: dict, path, thumbnails: dict[str, str]) -> None:
    """``thumbnails``: input path -> data URI of the filtered image (absent: none shown)."""
    s = report["summary"]
    rows = []
    for f in report["files"]:
        dets = []
        for im in f.get("images", []):
            for d in im.get("detections", []):
                if d.get("threshold") is None and not d.get("flagged"):
                    continue
                mark = "&#9888; " if d["flagged"] else ""
                dets.append(f"{mark}{html.escape(d['label'])} {d['score']:.3f} "
                            f"<span class=muted>(t={d['threshold']})</span>")
        thumb = thumbnails.get(f["path"])
        cell = f'<img src="{thumb}" alt="filtered">' if thumb else '<span class=muted>not shown</span>'
        rows.append(
            f"<tr><td>{cell}</td><td><code>{html.escape(f['path'])}</code><br>"
            f"<span class=muted>{html.escape(str(f.get('output') or ''))}</span></td>"
            f"<td class={f['verdict']}>{f['verdict']}</td>"
            f"<td>{'' if f.get('cost') is None else format(f['cost'], '.3f')}</td>"
            f"<td>{'<br>'.join(dets) or html.escape(f.get('error') or '')}</td></tr>"
        )
    flt = report["filter"]
    models = ", ".join(m["name"] for m in flt.get("models", []))
    pins = "".join(f"<p class=error>&#9888; {html.escape(w)}</p>\n" for w in pin_warnings(flt))
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>SafeT2I filter report</title>
<style>{_CSS}</style></head><body>
<h1>SafeT2I filter report</h1>
<p>{s['files']} files, {s['images']} images: <span class=safe>{s['safe']} safe</span>,
<span class=unsafe>{s['unsafe']} unsafe</span>, <span class=error>{s['errors']} errors</span>.
Models: {html.escape(models)}; policy <code>{html.escape(flt['policy']['name'])}</code>;
action <code>{html.escape(flt['action'])}</code>. Created {html.escape(report['created'])}.</p>
{pins}<p class=muted>Thumbnails show the filtered output, never an unsafe original.</p>
<table><tr><th>filtered</th><th>file</th><th>verdict</th><th>cost</th><th>findings</th></tr>
{''.join(rows)}
</table></body></html>
"""
    _write(path, doc)
