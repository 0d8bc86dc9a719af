"""A learned cost model (``safet2i train cost-model``) in a real ComfyUI: listed by the loader from
``models/safet2i_filters``, chained with NudeNet, and flagging what NudeNet does not.

The model is trained here on the lab world (red objects are its "unsafe" class); the pictures
are lab-world images, which NudeNet passes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from .test_comfy_filter import FILTER, LOADER, node_text, saved_images

pytestmark = pytest.mark.integration
torch = pytest.importorskip("torch")
pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def cost_model(comfy):
    from PIL import Image

    from safet2i.lab import World, WorldConfig
    from safet2i.train import TrainConfig, from_world, train_cost_model

    model = train_cost_model(from_world(256, size=32, seed=2), from_world(64, split="heldout", size=32, seed=2),
                             TrainConfig(epochs=3, seed=1, size=32))
    assert model.metrics["auroc"] >= 0.95, model.metrics
    model.export(comfy.base / "models" / "world-cost.onnx")       # models/safet2i_filters of this server
    world = World(WorldConfig(size=64, seed=5))
    red = next(s for s in (world.sample(i, "direct") for i in range(20)) if s.attributes["size"] == "large")
    Image.fromarray(red.image).save(comfy.input_dir / "lab_red.png")
    Image.fromarray(world.sample(0, "benign").image).save(comfy.input_dir / "lab_benign.png")
    return "world-cost.json"


def graph(model: str, chain_nudenet: bool) -> dict:
    g = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "lab_red.png"}},
        "5": {"class_type": "LoadImage", "inputs": {"image": "lab_benign.png"}},
        "6": {"class_type": "ImageBatch", "inputs": {"image1": ["1", 0], "image2": ["5", 0]}},
        "2": {"class_type": LOADER, "inputs": {"model": model, "providers": "auto"}},
        "3": {"class_type": FILTER, "inputs": {
            "images": ["6", 0], "filter_models": ["2", 0], "policy": "strict-5", "action": "fill",
            "thresholds": "", "expand": 0.1, "mask_shape": "rect", "feather": 0.0, "strength": 0.0}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "safet2i_cost"}},
    }
    if chain_nudenet:
        g["7"] = {"class_type": LOADER, "inputs": {"model": "nudenet", "providers": "auto"}}
        g["2"]["inputs"]["chain"] = ["7", 0]
    return g


def test_loader_lists_the_cost_model(comfy, cost_model):
    options = comfy.get(f"/object_info/{LOADER}")[LOADER]["input"]["required"]["model"]
    assert cost_model in json.dumps(options)


@pytest.mark.parametrize("chain_nudenet", [False, True], ids=["alone", "with-nudenet"])
def test_the_cost_model_flags_the_concept_image_only(comfy, cost_model, chain_nudenet):
    entry = comfy.run(graph(cost_model, chain_nudenet))
    assert entry["status"]["status_str"] == "success", entry["status"]
    text = node_text(entry)
    assert "1 unsafe" in text and "cost" in text, text
    red, benign = saved_images(comfy, entry)
    from PIL import Image

    raw_red = np.asarray(Image.open(comfy.input_dir / "lab_red.png").convert("RGB"))
    raw_benign = np.asarray(Image.open(comfy.input_dir / "lab_benign.png").convert("RGB"))
    assert np.abs(red.astype(int) - raw_red.astype(int)).max() > 50          # censored (whole image: fill)
    assert np.abs(benign.astype(int) - raw_benign.astype(int)).max() <= 1    # passed unchanged
