"""``safet2i train cost-model`` through the main command line, and its model through ``safet2i filter``."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from safet2i.cli import main


def test_train_cost_model_on_the_world_then_filter_with_it(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from safet2i.lab import World, WorldConfig

    out = tmp_path / "cost.onnx"
    rc = main(["train", "cost-model", "--world", "--out", str(out), "--epochs", "3", "--size", "32",
               "--world-train", "256", "--world-heldout", "64", "--seed", "1"])
    assert rc == 0 and out.is_file() and out.with_suffix(".safetensors").is_file()
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["kind"] == "cost" and sidecar["metrics"]["auroc"] >= 0.95, sidecar.get("metrics")
    assert main(["train", "cost-model", "--world", "--out", str(out), "--epochs", "1"]) == 4   # never overwrites

    world = World(WorldConfig(size=32, seed=3))
    images = tmp_path / "in"
    images.mkdir()
    Image.fromarray(world.sample(0, "direct").image).save(images / "concept.png")
    Image.fromarray(world.sample(0, "benign").image).save(images / "benign.png")
    report = tmp_path / "report.json"
    rc = main(["filter", str(images), "--out", str(tmp_path / "out"), "--model", str(out.with_suffix(".json")),
               "--report", str(report)])
    assert rc == 1                                                   # something unsafe, nothing broken
    verdicts = {f["path"].rsplit("/", 1)[-1]: f for f in json.loads(report.read_text())["files"]}
    assert verdicts["concept.png"]["verdict"] == "unsafe" and verdicts["benign.png"]["verdict"] == "safe"
    for f in verdicts.values():
        (finding,) = f["images"][0]["detections"]
        assert finding["label"] == "cost" and finding["model"] == "cost"
        assert finding["flagged"] == (finding["logit"] >= 0) == (f["verdict"] == "unsafe")


def test_lab_train_quick_through_the_main_command_is_cached(tmp_path, capsys):
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from safet2i.lab.tokenizer import clip_tokenizer

    try:
        clip_tokenizer()
    except Exception as exc:  # noqa: BLE001 - the tokenizer's file comes from open-clip-torch
        pytest.skip(f"no CLIP BPE file here: {exc}")
    args = ["lab", "train", "--quick", "--cache", str(tmp_path), "--no-progress"]
    assert main(args) == 0
    folder = capsys.readouterr().out.strip().splitlines()[-1]
    assert (tmp_path / folder.rsplit("/", 1)[-1] / "model_index.json").is_file()
    assert main(args) == 0                                            # cached: the same folder again
    assert capsys.readouterr().out.strip().splitlines()[-1] == folder
