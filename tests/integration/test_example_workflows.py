"""Every shared workflow in example_workflows/ loads, converts and runs in a real ComfyUI.

The files name the real models users have (SD1.5, DUO's release); the test points them at the
tiny checkpoint and a tiny DUO-layout LoRA, shrinks size and steps, runs them, and checks our
nodes' outputs and reports.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from .test_comfy_lora import duo_file
from .workflow import ui_to_api

pytestmark = pytest.mark.integration

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "example_workflows").glob("*.json"))
REQUIRED = {"safet2i_output_filter", "safet2i_full_stack_txt2img", "safet2i_guidance_comparison",
            "safet2i_steering_report", "safet2i_lora_coverage"}
SIZE, STEPS = 64, 6


def test_the_required_example_workflows_exist():
    assert REQUIRED <= {p.stem for p in EXAMPLES}


def test_server_lists_them_as_templates_with_thumbnails(comfy):
    import urllib.request

    assert sorted(comfy.get("/workflow_templates")["safet2i"]) == sorted(p.stem for p in EXAMPLES)
    for p in EXAMPLES:  # the frontend's template browser loads <name>.jpg next to the json
        thumb = p.with_suffix(".jpg")
        assert thumb.is_file() and thumb.stat().st_size < 200_000, thumb
        with urllib.request.urlopen(f"{comfy.url}/api/workflow_templates/safet2i/{thumb.name}", timeout=10) as r:
            assert r.status == 200 and r.read() == thumb.read_bytes()


@pytest.fixture(scope="module")
def prepared(comfy, tiny_checkpoint, astronaut_input):
    duo_file(comfy.base / "loras" / "duo_tiny.safetensors")
    return {"ckpt": tiny_checkpoint, "image": astronaut_input, "lora": "duo_tiny.safetensors"}


def to_test_prompt(wf: dict, object_info: dict, prepared: dict) -> dict:
    prompt = ui_to_api(wf, object_info)
    for node in prompt.values():
        t, inputs = node["class_type"], node["inputs"]
        if t == "LoadImage":
            inputs["image"] = prepared["image"]
        elif t == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = prepared["ckpt"]
        elif t == "SafeT2ILoadSafetyLoRA":
            inputs["lora_name"] = prepared["lora"]
        elif t == "EmptyLatentImage":
            inputs.update(width=SIZE, height=SIZE)
        elif t in ("KSampler", "KSamplerAdvanced"):
            inputs["steps"] = STEPS
    return prompt


def saved(comfy, entry, node_id) -> list[np.ndarray]:
    from PIL import Image

    return [np.asarray(Image.open(comfy.output_dir / im["subfolder"] / im["filename"])).astype(int)
            for im in entry["outputs"][node_id]["images"]]


def text(entry, node_id) -> str:
    return entry["outputs"][node_id]["text"][0]


def by_type(wf, typ) -> list[str]:
    return [str(n["id"]) for n in wf["nodes"] if n["type"] == typ]


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_workflow_runs(path, comfy, prepared):
    wf = json.loads(path.read_text())
    assert wf.get("version") == 0.4 and "nodes" in wf and "links" in wf  # UI format (template browser)
    for node in wf["nodes"]:
        if node["type"] == "MarkdownNote":
            continue
        assert node["properties"].get("cnr_id") in ("safet2i", "comfy-core") and node["properties"].get("ver")
    entry = comfy.run(to_test_prompt(wf, comfy.get("/object_info"), prepared))
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    assert any(o.get("images") for o in entry["outputs"].values())
    CHECKS.get(path.stem, lambda *a: None)(comfy, wf, entry)


def check_full_stack(comfy, wf, entry):
    lora_report, steer_report, filter_report = (json.loads(text(entry, i)) for i in ("13", "14", "16"))
    assert lora_report["matched"] == lora_report["targets"] == lora_report["applied"] == 16
    assert steer_report["chunks"] and all("t_prime" in c for c in steer_report["chunks"])
    assert filter_report["images"] and len(filter_report["images"]) == 1
    assert "SLD" in "\n".join(entry["outputs"]["15"]["text"])
    assert saved(comfy, entry, "12")[0].shape[:2] == (SIZE, SIZE)


def check_guidance_comparison(comfy, wf, entry):
    (grid,) = saved(comfy, entry, "33")
    assert grid.shape[:2] == (SIZE, 4 * SIZE + 3 * 8)
    panels = [grid[:, k * (SIZE + 8): k * (SIZE + 8) + SIZE] for k in range(4)]
    for k, name in ((1, "SLD"), (2, "SP-Guard-style"), (3, "Detect-and-Guide-style")):
        assert np.abs(panels[k] - panels[0]).max() > 0, f"{name} panel identical to plain CFG"
    reports = "\n".join("\n".join(entry["outputs"][i]["text"]) for i in ("34", "35", "36"))
    assert "SLD" in reports and "SP-Guard" in reports


def check_steering(comfy, wf, entry):
    rep = json.loads(text(entry, "12"))
    assert {"chunks", "steered_fraction"} <= set(rep)
    assert all({"triggers", "beta"} <= set(c) for c in rep["chunks"])
    (pair,) = saved(comfy, entry, "11")
    assert pair.shape[:2] == (SIZE, 2 * SIZE + 8)


def check_lora(comfy, wf, entry):
    rep = json.loads(text(entry, "3"))
    assert rep["unmatched"] == [] and rep["matched"] == rep["applied"] == 16
    assert all(w["status"] == "matched" for w in rep["weights"])


def check_filter(comfy, wf, entry):
    (fid,) = by_type(wf, "SafeT2IImageFilter")
    shown = "\n".join(entry["outputs"][fid]["text"])
    assert "safe" in shown.lower()                       # the verdict shown on the node
    (save,) = by_type(wf, "SaveImage")
    assert saved(comfy, entry, save)[0].shape[:2] == (512, 512)   # the astronaut, passed through


CHECKS = {"safet2i_full_stack_txt2img": check_full_stack, "safet2i_guidance_comparison": check_guidance_comparison,
          "safet2i_steering_report": check_steering, "safet2i_lora_coverage": check_lora,
          "safet2i_output_filter": check_filter}


def test_converter_rejects_what_it_cannot_convert(comfy):
    from .workflow import ui_to_api as convert

    info = comfy.get("/object_info")
    wf = json.loads(EXAMPLES[0].read_text())
    with pytest.raises(ValueError, match="subgraphs"):
        convert({**wf, "definitions": {"subgraphs": [{"id": "x"}]}}, info)
    bad = json.loads(json.dumps(wf))
    bad["nodes"][0]["type"] = "PrimitiveNode"
    with pytest.raises(ValueError, match="PrimitiveNode"):
        convert(bad, info)
    bad = json.loads(json.dumps(wf))
    bad["nodes"][0]["type"] = "NoSuchNode"
    with pytest.raises(ValueError, match="unknown"):
        convert(bad, info)
    bad = json.loads(json.dumps(wf))
    next(n for n in bad["nodes"] if n["type"] == "KSampler")["widgets_values"] = [42]
    with pytest.raises(ValueError, match="no widget value"):
        convert(bad, info)
