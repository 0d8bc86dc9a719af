"""The output-filter nodes in a real ComfyUI server."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytestmark = pytest.mark.integration

LOADER, FILTER = "SafeT2IFilterModelLoader", "SafeT2IImageFilter"

# Node-ID and input-order stability: workflows store both. Only append, never reorder.
EXPECTED_INPUTS = {
    LOADER: ["model", "providers", "chain"],
    FILTER: ["images", "filter_models", "policy", "action", "thresholds", "expand", "mask_shape",
             "feather", "strength"],
}
EXPECTED_OUTPUTS = {
    LOADER: ["SAFET2I_FILTER_MODELS"],
    FILTER: ["IMAGE", "MASK", "FLOAT", "BOOLEAN", "STRING"],
}


def filter_graph(image: str, action: str = "blur", policy: str = "face-only", model: str = "nudenet",
                 second: str | None = None) -> dict:
    g = {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": LOADER, "inputs": {"model": model, "providers": "auto"}},
        "3": {"class_type": FILTER, "inputs": {
            "images": ["1", 0], "filter_models": ["2", 0], "policy": policy, "action": action,
            "thresholds": "", "expand": 0.1, "mask_shape": "rect", "feather": 2.0, "strength": 0.0}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "safet2i_test"}},
    }
    if second:
        g["5"] = {"class_type": "LoadImage", "inputs": {"image": second}}
        g["6"] = {"class_type": "ImageBatch", "inputs": {"image1": ["1", 0], "image2": ["5", 0]}}
        g["3"]["inputs"]["images"] = ["6", 0]
    return g


def saved_images(comfy, entry: dict) -> list[np.ndarray]:
    from PIL import Image

    out = []
    for node_out in entry["outputs"].values():
        for im in node_out.get("images", []):
            if im.get("type") == "output":
                out.append(np.asarray(Image.open(comfy.output_dir / im["subfolder"] / im["filename"]).convert("RGB")))
    return out


def node_text(entry: dict, node: str = "3") -> str:
    return "\n".join(entry["outputs"].get(node, {}).get("text", []))


def test_pack_imports_and_nodes_are_registered(comfy):
    info = comfy.get("/object_info")
    failed = [ln for ln in comfy.log_tail(2000).splitlines()
              if ("IMPORT FAILED" in ln or "Cannot import" in ln) and "safet2i" in ln]
    assert not failed, failed
    for node, names in EXPECTED_INPUTS.items():
        assert node in info, f"{node} missing; log:\n{comfy.log_tail()}"
        spec = info[node]
        order = spec.get("input_order", {})
        got = order.get("required", []) + order.get("optional", [])
        assert got == names
        assert spec["output"] == EXPECTED_OUTPUTS[node]
        assert spec["category"] == "SafeT2I/filter"
    models = info[LOADER]["input"]["required"]["model"]
    options = models[1]["options"] if isinstance(models[1], dict) and "options" in models[1] else models[0]
    assert {"nudenet", "nudenet-reference", "opennsfw"} <= set(options)
    assert info[FILTER]["output_is_list"] == [False, False, True, False, False]


def test_filter_censors_the_face_and_reports(comfy, astronaut_input):
    import skimage.data

    entry = comfy.run(filter_graph(astronaut_input, "pixelate"))
    assert entry["status"]["status_str"] == "success", entry["status"]
    text = node_text(entry)
    assert "1 unsafe" in text and "FACE_FEMALE" in text
    (img,) = saved_images(comfy, entry)
    orig = skimage.data.astronaut()
    diff = np.abs(img.astype(int) - orig.astype(int)).max(axis=2) > 8
    ys, xs = np.nonzero(diff)
    assert diff.sum() > 2000
    assert 140 < xs.min() and xs.max() < 310 and 50 < ys.min() and ys.max() < 220


def test_whole_batch_is_checked(comfy, astronaut_input):
    # chelsea first, astronaut second: a filter checking only image[0] would miss it.
    entry = comfy.run(filter_graph("chelsea.png", "black", second=astronaut_input))
    assert entry["status"]["status_str"] == "success", entry["status"]
    text = node_text(entry)
    assert "2 image(s), 1 unsafe" in text
    assert "image 0: safe" in text and "image 1: UNSAFE" in text
    imgs = saved_images(comfy, entry)
    assert len(imgs) == 2 and imgs[1].max() == 0 and imgs[0].max() > 100


def test_block_stops_the_workflow_and_saves_nothing(comfy, astronaut_input):
    before = set(p.name for p in comfy.output_dir.rglob("*.png"))
    entry = comfy.run(filter_graph(astronaut_input, "block"))
    assert entry["status"]["status_str"] == "error"
    msgs = json.dumps(entry["status"].get("messages", []))
    assert "UnsafeContentError" in msgs or "blocked" in msgs
    assert set(p.name for p in comfy.output_dir.rglob("*.png")) == before


def test_default_policy_passes_benign_picture_unchanged(comfy, astronaut_input):
    import skimage.data

    entry = comfy.run(filter_graph(astronaut_input, "black", policy="strict-5"))
    assert entry["status"]["status_str"] == "success"
    assert "0 unsafe" in node_text(entry)
    (img,) = saved_images(comfy, entry)
    assert np.abs(img.astype(int) - skimage.data.astronaut().astype(int)).max() <= 1


def test_path_tricks_in_model_names_are_rejected(comfy, astronaut_input):
    """A workflow JSON naming a path outside the model folder must fail with a clear error
    (at validation, or at the latest when the loader runs), never load that file."""
    prompt = filter_graph(astronaut_input, model="../../../etc/passwd")
    code, resp = comfy.post_prompt(prompt)
    if code == 400:
        assert "node_errors" in resp or "error" in resp
        return
    assert code == 200
    entry = comfy.run(prompt)
    assert entry["status"]["status_str"] == "error"
    msgs = json.dumps(entry["status"].get("messages", []))
    assert "ModelLoadError" in msgs and "not a built-in model" in msgs
    assert not saved_images(comfy, entry)


def test_pack_loads_without_onnxruntime_and_the_node_says_what_to_install(tmp_path):
    """An optional dependency missing must not break the pack: nodes register, and the
    loader's error names the package (simulated by shadowing onnxruntime)."""
    from .conftest import start_server

    shadow = tmp_path / "shadow" / "onnxruntime"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named onnxruntime (simulated)')\n")
    with start_server(tmp_path / "srv", {"PYTHONPATH": str(shadow.parent)}) as srv:
        info = srv.get("/object_info")
        assert LOADER in info and FILTER in info
        import skimage.data
        from PIL import Image

        Image.fromarray(skimage.data.astronaut()).save(srv.input_dir / "a.png")
        entry = srv.run(filter_graph("a.png"))
        assert entry["status"]["status_str"] == "error"
        msgs = json.dumps(entry["status"].get("messages", []))
        assert "MissingDependencyError" in msgs and "pip install onnxruntime" in msgs
        assert not saved_images(srv, entry)
