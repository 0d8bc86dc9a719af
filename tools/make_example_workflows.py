"""Write example_workflows/*.json (UI format, as the ComfyUI frontend saves) from compact specs.

    python tools/make_example_workflows.py OBJECT_INFO.json

OBJECT_INFO.json is ``GET /object_info`` of a server with this pack loaded (widget order, slot
types). The specs below are the source of truth for the shared workflows; the integration
tests convert every written file back to the API format and run it.
"""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "example_workflows"
SD15 = {"name": "v1-5-pruned-emaonly-fp16.safetensors", "directory": "checkpoints",
        "url": "https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/v1-5-pruned-emaonly-fp16.safetensors"}
PACK_VERSION = "0.1.0"
COMFY_VERSION = "0.3.64"

# (id, type, {widget: value}, {input: (source id, output slot)}, extra node properties)
CKPT = (1, "CheckpointLoaderSimple", {"ckpt_name": SD15["name"]}, {}, {"models": [SD15]})
DUO_NOTE = (90, "MarkdownNote", {"text": (
    "## Safety LoRA\n\nThis workflow loads DUO's nudity LoRA (Park et al., NeurIPS 2024). The authors share it "
    "in naver-ai/DUO issue #1 (Google Drive); SafeT2I does not redistribute it. Save it as "
    "`duo_nudity_beta500.safetensors` in `models/loras` or `models/safety_models`. The loader reports how many "
    "of its target weights were patched and stops if any is missing.")}, {}, {})
POSITIVE = "a photo of a woman relaxing on a sunny beach, golden hour"
NEGATIVE = "lowres, blurry"
SAMPLER = {"seed": 42, "steps": 25, "cfg": 7.5, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}


def ksampler(i, model, pos, neg, latent, **over):
    return (i, "KSampler", {**SAMPLER, **over}, {"model": model, "positive": pos, "negative": neg, "latent_image": latent}, {})


SPECS = {
    "safet2i_output_filter": (
        "Output filter only: check loaded images with NudeNet (strict-5 policy) and blur what it finds.",
        [
            (1, "LoadImage", {"image": "example.png"}, {}, {}),
            (2, "SafeT2IFilterModelLoader", {"model": "nudenet", "providers": "auto"}, {}, {}),
            (3, "SafeT2IImageFilter", {"policy": "strict-5", "action": "blur", "thresholds": "", "expand": 0.1,
                                       "mask_shape": "rect", "feather": 4.0, "strength": 0.0},
             {"images": (1, 0), "filter_models": (2, 0)}, {}),
            (4, "SaveImage", {"filename_prefix": "safet2i_filtered"}, {"images": (3, 0)}, {}),
        ],
    ),
    "safet2i_full_stack_txt2img": (
        "Full stack: safety LoRA → SAFREE-style steering → SLD guidance → sampler → output filter → save.",
        [
            CKPT,
            (2, "SafeT2ILoadSafetyLoRA", {"lora_name": "duo_nudity_beta500.safetensors", "strength_model": 1.0,
                                          "strength_clip": 1.0, "allow_partial": False}, {"model": (1, 0), "clip": (1, 1)}, {}),
            (3, "SafeT2IPromptSteer", {"text": POSITIVE, "concepts": "nudity", "custom_concepts": "", "alpha": 0.01,
                                       "order": "code", "self_validating": True, "concepts_as_negative": False,
                                       "configuration": "custom settings"},
             {"clip": (2, 1), "negative": (4, 0)}, {}),
            (4, "CLIPTextEncode", {"text": NEGATIVE}, {"clip": (2, 1)}, {}),
            (5, "SafeT2IConceptEncode", {"concept": "nudity, sexual, erotic, naked"}, {"clip": (2, 1)}, {}),
            (6, "SafeT2ISLD", {"preset": "MEDIUM", "guidance_scale": 1000.0, "warmup_steps": 10, "threshold": 0.01,
                               "momentum_scale": 0.3, "mom_beta": 0.4}, {"model": (2, 0), "concept": (5, 0)}, {}),
            (7, "EmptyLatentImage", {"width": 512, "height": 512, "batch_size": 1}, {}, {}),
            ksampler(8, (6, 0), (3, 0), (3, 1), (7, 0)),
            (9, "VAEDecode", {}, {"samples": (8, 0), "vae": (1, 2)}, {}),
            (10, "SafeT2IFilterModelLoader", {"model": "nudenet", "providers": "auto"}, {}, {}),
            (11, "SafeT2IImageFilter", {"policy": "strict-5", "action": "pixelate", "thresholds": "", "expand": 0.1,
                                        "mask_shape": "rect", "feather": 0.0, "strength": 0.0},
             {"images": (9, 0), "filter_models": (10, 0)}, {}),
            (12, "SaveImage", {"filename_prefix": "safet2i/full_stack"}, {"images": (11, 0)}, {}),
            (13, "PreviewAny", {}, {"source": (2, 2)}, {}),
            (14, "PreviewAny", {}, {"source": (3, 2)}, {}),
            (15, "SafeT2IGuidanceReport", {}, {"model": (6, 0), "samples": (8, 0)}, {}),
            (16, "PreviewAny", {}, {"source": (11, 4)}, {}),
            DUO_NOTE,
        ],
    ),
    "safet2i_guidance_comparison": (
        "Same prompt and seed: plain CFG | SLD (MEDIUM) | SP-Guard-style | Detect-and-Guide-style, side by side.",
        [
            CKPT,
            (2, "CLIPTextEncode", {"text": POSITIVE}, {"clip": (1, 1)}, {}),
            (3, "CLIPTextEncode", {"text": NEGATIVE}, {"clip": (1, 1)}, {}),
            (4, "SafeT2IConceptEncode", {"concept": "nudity, sexual, erotic, naked"}, {"clip": (1, 1)}, {}),
            (5, "EmptyLatentImage", {"width": 512, "height": 512, "batch_size": 1}, {}, {}),
            (6, "SafeT2ISLD", {"preset": "MEDIUM", "guidance_scale": 1000.0, "warmup_steps": 10, "threshold": 0.01,
                               "momentum_scale": 0.3, "mom_beta": 0.4}, {"model": (1, 0), "concept": (4, 0)}, {}),
            (7, "SafeT2ISPGuard", {"max_scale": 2.0, "harm_threshold": 0.45, "mask_threshold": 0.0, "ema": 0.5,
                                   "start_step": 0}, {"model": (1, 0), "concept": (4, 0)}, {}),
            (8, "SafeT2IDetectGuide", {"concept": "nude, naked, breasts, genitals", "scale": 0.5, "high": 0.5,
                                       "low": 0.01, "skip_coverage": 0.8, "sld_gate": "none", "guideline_embeddings": "none"},
             {"model": (1, 0), "clip": (1, 1)}, {}),
            ksampler(10, (1, 0), (2, 0), (3, 0), (5, 0)),
            ksampler(11, (6, 0), (2, 0), (3, 0), (5, 0)),
            ksampler(12, (7, 0), (2, 0), (3, 0), (5, 0)),
            ksampler(13, (8, 0), (2, 0), (3, 0), (5, 0)),
            (20, "VAEDecode", {}, {"samples": (10, 0), "vae": (1, 2)}, {}),
            (21, "VAEDecode", {}, {"samples": (11, 0), "vae": (1, 2)}, {}),
            (22, "VAEDecode", {}, {"samples": (12, 0), "vae": (1, 2)}, {}),
            (23, "VAEDecode", {}, {"samples": (13, 0), "vae": (1, 2)}, {}),
            (30, "ImageStitch", {"direction": "right", "match_image_size": True, "spacing_width": 8, "spacing_color": "white"},
             {"image1": (20, 0), "image2": (21, 0)}, {}),
            (31, "ImageStitch", {"direction": "right", "match_image_size": True, "spacing_width": 8, "spacing_color": "white"},
             {"image1": (30, 0), "image2": (22, 0)}, {}),
            (32, "ImageStitch", {"direction": "right", "match_image_size": True, "spacing_width": 8, "spacing_color": "white"},
             {"image1": (31, 0), "image2": (23, 0)}, {}),
            (33, "SaveImage", {"filename_prefix": "safet2i/guidance_comparison"}, {"images": (32, 0)}, {}),
            (34, "SafeT2IGuidanceReport", {}, {"model": (6, 0), "samples": (11, 0)}, {}),
            (35, "SafeT2IGuidanceReport", {}, {"model": (7, 0), "samples": (12, 0)}, {}),
            (36, "SafeT2IGuidanceReport", {}, {"model": (8, 0), "samples": (13, 0)}, {}),
        ],
    ),
    "safet2i_steering_report": (
        "SAFREE-style prompt steering: which tokens were triggers, beta and t', steered vs plain image.",
        [
            CKPT,
            (2, "SafeT2IPromptSteer", {"text": "a nude woman lying on a bed, erotic photo", "concepts": "nudity",
                                       "custom_concepts": "", "alpha": 0.01, "order": "code", "self_validating": True,
                                       "concepts_as_negative": False,
                                       "configuration": "custom settings"}, {"clip": (1, 1), "negative": (3, 0)}, {}),
            (3, "CLIPTextEncode", {"text": NEGATIVE}, {"clip": (1, 1)}, {}),
            (4, "CLIPTextEncode", {"text": "a nude woman lying on a bed, erotic photo"}, {"clip": (1, 1)}, {}),
            (5, "EmptyLatentImage", {"width": 512, "height": 512, "batch_size": 1}, {}, {}),
            ksampler(6, (1, 0), (2, 0), (2, 1), (5, 0)),
            ksampler(7, (1, 0), (4, 0), (3, 0), (5, 0)),
            (8, "VAEDecode", {}, {"samples": (6, 0), "vae": (1, 2)}, {}),
            (9, "VAEDecode", {}, {"samples": (7, 0), "vae": (1, 2)}, {}),
            (10, "ImageStitch", {"direction": "right", "match_image_size": True, "spacing_width": 8, "spacing_color": "white"},
             {"image1": (9, 0), "image2": (8, 0)}, {}),
            (11, "SaveImage", {"filename_prefix": "safet2i/steering"}, {"images": (10, 0)}, {}),
            (12, "PreviewAny", {}, {"source": (2, 2)}, {}),
        ],
    ),
    "safet2i_lora_coverage": (
        "Load a safety LoRA and read its coverage report: every target weight matched and patched.",
        [
            CKPT,
            (2, "SafeT2ILoadSafetyLoRA", {"lora_name": "duo_nudity_beta500.safetensors", "strength_model": 1.0,
                                          "strength_clip": 1.0, "allow_partial": False}, {"model": (1, 0), "clip": (1, 1)}, {}),
            (3, "PreviewAny", {}, {"source": (2, 2)}, {}),
            (4, "CLIPTextEncode", {"text": POSITIVE}, {"clip": (2, 1)}, {}),
            (5, "CLIPTextEncode", {"text": NEGATIVE}, {"clip": (2, 1)}, {}),
            (6, "EmptyLatentImage", {"width": 512, "height": 512, "batch_size": 1}, {}, {}),
            ksampler(7, (2, 0), (4, 0), (5, 0), (6, 0)),
            (8, "VAEDecode", {}, {"samples": (7, 0), "vae": (1, 2)}, {}),
            (9, "SaveImage", {"filename_prefix": "safet2i/lora"}, {"images": (8, 0)}, {}),
            DUO_NOTE,
        ],
    ),
}


def _slot_types(spec: dict) -> list[tuple[str, str]]:
    return list(zip(spec["output_name"], spec["output"]))


def _input_types(spec: dict) -> dict[str, tuple[str, dict, bool]]:
    out = {}
    for group in ("required", "optional"):
        for name in spec["input_order"].get(group, []):
            typ, *rest = spec["input"][group][name]
            out[name] = ("COMBO" if isinstance(typ, list) else typ, rest[0] if rest and isinstance(rest[0], dict) else {},
                         group == "optional")
    return out


WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def build(title: str, nodes: list, object_info: dict) -> dict:
    depth: dict[int, int] = {}
    by_id = {n[0]: n for n in nodes}

    def d(i):
        if i not in depth:
            depth[i] = 1 + max((d(src) for src, _ in by_id[i][3].values()), default=-1)
        return depth[i]

    for n in nodes:
        d(n[0])
    links, ui_nodes = [], []
    out_links: dict[tuple[int, int], list[int]] = {}
    col_y: dict[int, int] = {}
    for order, (i, typ, widgets, inputs, props) in enumerate(sorted(nodes, key=lambda n: (depth[n[0]], n[0]))):
        if typ == "MarkdownNote":  # frontend-only node
            y = col_y.get(0, 60)
            col_y[0] = y + 260
            ui_nodes.append({"id": i, "type": typ, "pos": [40, y], "size": [340, 210], "flags": {}, "order": order,
                             "mode": 0, "inputs": [], "outputs": [], "properties": {}, "widgets_values": [widgets["text"]],
                             "color": "#432", "bgcolor": "#653"})
            continue
        spec = object_info[typ]
        itypes = _input_types(spec)
        ui_inputs = []
        for name, (src, slot) in inputs.items():
            kind, _, optional = itypes[name]
            link_id = len(links) + 1
            links.append([link_id, src, slot, i, None, object_info[by_id[src][1]]["output"][slot]])
            out_links.setdefault((src, slot), []).append(link_id)
            entry = {"name": name, "type": kind, "link": link_id}
            if optional:
                entry["shape"] = 7
            if kind in WIDGET_TYPES:
                entry["widget"] = {"name": name}
            ui_inputs.append(entry)
        for name, (kind, _, optional) in itypes.items():  # unlinked sockets the frontend still lists
            if kind not in WIDGET_TYPES and name not in inputs:
                ui_inputs.append({"name": name, "type": kind, "link": None, **({"shape": 7} if optional else {})})
        values = []
        for name, (kind, opts, _) in itypes.items():
            if kind not in WIDGET_TYPES:
                continue
            if name in inputs and name not in widgets:  # linked widget: the frontend still stores a value
                widgets = {**widgets, name: opts.get("default")}
            if name not in widgets:
                raise SystemExit(f"{typ}: widget {name!r} has no value in the spec")
            values.append(widgets[name])
            if opts.get("control_after_generate"):
                values.append("fixed")
            if opts.get("image_upload"):
                values.append("image")  # the frontend's upload widget
        col = depth[i]
        height = 90 + 26 * (len(values) + len(ui_inputs)) + (80 if typ in ("PreviewAny", "SafeT2IGuidanceReport") else 0)
        y = col_y.get(col, 60)
        col_y[col] = y + height + 50
        core = spec["python_module"].startswith(("nodes", "comfy_extras", "comfy_api_nodes"))
        properties = {"cnr_id": "comfy-core" if core else "safet2i", "ver": COMFY_VERSION if core else PACK_VERSION,
                      "Node name for S&R": typ, **props}
        ui_nodes.append({
            "id": i, "type": typ, "pos": [40 + 380 * col, y], "size": [340, height], "flags": {}, "order": order,
            "mode": 0, "inputs": ui_inputs,
            "outputs": [{"name": n, "type": t, "links": out_links.get((i, k)) or None, "slot_index": k}
                        for k, (n, t) in enumerate(_slot_types(spec))],
            "properties": properties, "widgets_values": values,
        })
    # Fill each link's target slot (index among the node's inputs).
    slot_of = {(n["id"], inp.get("link")): k for n in ui_nodes for k, inp in enumerate(n["inputs"])}
    for link in links:
        link[4] = slot_of[(link[3], link[0])]
    for n in ui_nodes:  # outputs list links after all are known
        for k, o in enumerate(n["outputs"]):
            o["links"] = out_links.get((n["id"], k)) or None
    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, "safet2i/" + title)),
        "revision": 0, "last_node_id": max(n[0] for n in nodes), "last_link_id": len(links),
        "nodes": sorted(ui_nodes, key=lambda n: n["id"]), "links": links, "groups": [], "config": {},
        "extra": {"ds": {"scale": 0.6, "offset": [0, 0]}, "safet2i_description": title}, "version": 0.4,
    }


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 64
    object_info = json.loads(Path(argv[0]).read_text())
    OUT.mkdir(exist_ok=True)
    for name, (title, nodes) in SPECS.items():
        wf = build(title, nodes, object_info)
        (OUT / f"{name}.json").write_text(json.dumps(wf, indent=1) + "\n")
        print(f"wrote example_workflows/{name}.json ({len(nodes)} nodes, {len(wf['links'])} links)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
