"""The operator's learned cost model in the webui (setting ``safet2i_cost_model``): checked together
with NudeNet on every image, unsafe when either flags; a broken choice blocks the images.

The cost model is trained here on the lab world (``safet2i train``'s API, a small budget): images
with red objects are its "unsafe" class. NudeNet sees nothing in either picture, so a censored
image can only come from the cost model."""

from __future__ import annotations

import sys

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def cost_sidecar(tmp_path_factory):
    from safet2i.train import TrainConfig, from_world, train_cost_model

    folder = tmp_path_factory.mktemp("filters")
    model = train_cost_model(from_world(256, size=32, seed=2), from_world(64, split="heldout", size=32, seed=2),
                             TrainConfig(epochs=3, seed=1, size=32))
    assert model.metrics["auroc"] >= 0.95, model.metrics
    model.export(folder / "world-cost.onnx")
    (folder / "not-a-sidecar.json").write_text("[1, 2]")
    return folder


@pytest.fixture
def pictures():
    from safet2i.lab import World, WorldConfig

    world = World(WorldConfig(size=64, seed=5))
    red = next(s for s in (world.sample(i, "direct") for i in range(20)) if s.attributes["size"] == "large")
    return red.image, world.sample(0, "benign").image


@pytest.mark.parametrize("variant", ["a1111-1.10", "forge"])
def test_the_cost_model_flags_what_nudenet_does_not(start, cost_sidecar, pictures, monkeypatch, variant):
    webui = start(variant)
    filtering = sys.modules["safet2i_a1111.filtering"]
    monkeypatch.setattr(filtering, "FILTER_DIR", cost_sidecar)
    assert filtering.cost_model_choices() == ["None", "world-cost.json"]
    red, benign = pictures
    webui.register("red shapes", red)
    webui.register("other shapes", benign)
    args = webui.ui_args(filter_policy="strict-5", filter_action="fill")
    _, plain = webui.txt2img(["red shapes", "other shapes"], batch_size=2, steps=2, width=64, height=64, args=args)
    assert [t.endswith("SafeT2I verdict: safe") for t in plain.infotexts[1:]] == [True, True]   # NudeNet alone

    webui.shared.opts.safet2i_cost_model = "world-cost.json"
    _, out = webui.txt2img(["red shapes", "other shapes"], batch_size=2, steps=2, width=64, height=64, args=args)
    verdicts = [t.rsplit("SafeT2I verdict: ", 1)[1].strip('"') for t in out.infotexts[1:]]
    assert verdicts[0].startswith("censored (cost") and verdicts[1] == "safe", verdicts
    assert not np.array_equal(np.asarray(out.images[1]), red)        # the censored picture left, not the raw one
    np.testing.assert_array_equal(np.asarray(out.images[2]), np.asarray(plain.images[2]))


@pytest.mark.parametrize("choice", ["../world-cost.json", "missing.json", "world-cost.onnx"])
def test_a_broken_cost_model_choice_blocks_the_images(start, cost_sidecar, pictures, monkeypatch, choice):
    webui = start("a1111-1.10")
    monkeypatch.setattr(sys.modules["safet2i_a1111.filtering"], "FILTER_DIR", cost_sidecar)
    webui.register("other shapes", pictures[1])
    webui.shared.opts.safet2i_cost_model = choice
    _, out = webui.txt2img("other shapes", steps=2, width=64, height=64, args=webui.ui_args())
    assert out.infotexts[-1].endswith("SafeT2I verdict: error"), out.infotexts
    assert np.asarray(out.images[-1]).std() < 20                     # the placeholder, not the picture


def test_the_setting_is_offered_as_a_dropdown_and_kept_from_the_api(start, cost_sidecar, monkeypatch):
    webui = start("a1111-1.10")
    monkeypatch.setattr(sys.modules["safet2i_a1111.filtering"], "FILTER_DIR", cost_sidecar)
    info = webui.shared.opts.data_labels["safet2i_cost_model"]
    assert info.default == "None" and info.restrict_api is True
    assert info.component_args() == {"choices": ["None", "world-cost.json"]}
