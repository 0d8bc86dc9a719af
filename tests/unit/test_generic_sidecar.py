"""A user's own ONNX classifier, described only by a sidecar, against a float64 reference."""

from __future__ import annotations

import json

import numpy as np
import pytest

from safet2i.filter import SafetyFilter, load_model

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

W = np.array([[-2.0, 1.0], [-3.0, 1.5], [0.5, 0.25]], np.float32)  # mean RGB -> 2 logits


@pytest.fixture
def tiny_classifier(tmp_path):
    """NCHW [N,3,8,8] -> per-channel mean -> MatMul W -> logits [N,2] (activation in sidecar)."""
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["x", "axes"], ["m"], keepdims=0),
            helper.make_node("MatMul", ["m", "w"], ["logits"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 2])],
        initializer=[
            helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3]),
            helper.make_tensor("w", TensorProto.FLOAT, [3, 2], W.flatten().tolist()),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "tiny.onnx")
    sidecar = {
        "schema": 1, "name": "tiny", "kind": "classifier",
        "model": {"file": "tiny.onnx"},
        "input": {"size": 8, "geometry": "stretch", "layout": "NCHW", "colour": "BGR",
                  "scale": 1 / 255, "mean": [0.5, 0.4, 0.3], "std": [0.25, 0.5, 0.2]},
        "output": {"labels": ["ok", "bad"], "activation": "softmax"},
        "thresholds": {"bad": 0.7},
    }
    (tmp_path / "tiny.json").write_text(json.dumps(sidecar))
    return tmp_path / "tiny.json"


def reference(img: np.ndarray) -> np.ndarray:
    import cv2

    x = cv2.resize(img, (8, 8), interpolation=cv2.INTER_LINEAR).astype(np.float64)[..., ::-1]  # BGR
    x = (x / 255 - np.array([0.5, 0.4, 0.3])) / np.array([0.25, 0.5, 0.2])
    logits = x.mean(axis=(0, 1)) @ W.astype(np.float64)
    e = np.exp(logits - logits.max())
    return e / e.sum()


def test_generic_classifier_matches_float64_reference(tiny_classifier, benign_set):
    model = load_model(str(tiny_classifier))
    imgs = [benign_set["astronaut"], benign_set["coffee"], np.full((5, 9, 3), 250, np.uint8)]
    got = model.detect(imgs)
    for img, dets in zip(imgs, got):
        scores = {d.label: d.score for d in dets}
        want = reference(img)
        assert scores["ok"] == pytest.approx(want[0], abs=1e-5)
        assert scores["bad"] == pytest.approx(want[1], abs=1e-5)
        assert all(d.box is None for d in dets)


def test_generic_classifier_drives_the_verdict_and_whole_image_mask(tiny_classifier):
    bright = np.full((40, 60, 3), 250, np.uint8)   # reference: bad ~= 1.0 -> unsafe at 0.7
    dark = np.full((40, 60, 3), 5, np.uint8)
    assert reference(bright)[1] > 0.7 > reference(dark)[1]
    flt = SafetyFilter([str(tiny_classifier)], "strict-5", "fill", colour=(0.0, 1.0, 0.0))
    res = flt.run([bright, dark])
    assert res.is_safe == [False, True]
    assert res.masks[0].min() == 1.0 and res.masks[1].max() == 0.0
    np.testing.assert_allclose(res.images[0][..., 1], 1.0)
    np.testing.assert_allclose(res.images[1], dark / 255.0, atol=1e-6)


def test_onnx_file_path_finds_its_sidecar(tiny_classifier):
    assert load_model(str(tiny_classifier.with_suffix(".onnx"))).spec.name == "tiny"
