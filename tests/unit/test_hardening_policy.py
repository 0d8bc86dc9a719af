"""Issue 14, class 3: no policy mistake turns the filter off.

(a) A threshold label no loaded model can emit (typo, wrong case) is a ``PolicyError``
    naming it, the closest valid label and all valid ones, in the Python API and the
    ComfyUI node; so is a policy under which nothing could ever be flagged.
(b) Censoring too weak to hide what was found is never reported as censored: strengths
    have minimums relative to each region's size, and censored images are re-checked and
    escalated (fill, then placeholder) while they still trip a model.

"Unsafe" is a benign face (skimage astronaut, FACE_FEMALE ~0.8) under ``face-only``; the
valid labels are read from the sidecar JSON directly, not from the library.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from safet2i.errors import ModelLoadError, PolicyError, SafeT2IError, UnsafeContentError
from safet2i.filter import Detection, ModelSpec, OnnxModel, Policy, SafetyFilter, get_policy
from safet2i.filter import censor as censor_mod
from safet2i.filter.censor import censor, min_strength, placeholder

REPO = Path(__file__).resolve().parents[2]
SIDECARS = REPO / "safet2i" / "data" / "filters"
NUDENET_LABELS = json.loads((SIDECARS / "nudenet-320n.json").read_text())["output"]["labels"]


@pytest.fixture(scope="module")
def face(benign_set) -> np.ndarray:
    return benign_set["astronaut"]


@pytest.fixture(scope="module")
def judge_filter():
    """A plain face-only checker, independent of the filter under test."""
    return SafetyFilter(["nudenet"], "face-only", "pass")


def face_score(judge_filter, img: np.ndarray) -> float:
    """The best FACE_* score in ``img`` (float 0..1 or uint8)."""
    u8 = img if img.dtype == np.uint8 else np.rint(np.clip(img, 0, 1) * 255).astype(np.uint8)
    v = judge_filter.check([u8])[0]
    return max((f.detection.score for f in v.findings if f.detection.label.startswith("FACE")), default=0.0)


class FakeModel(OnnxModel):
    """A model without ONNX: ``rule(image_u8) -> list[Detection]``."""

    def __init__(self, name="fake", labels=("X",), thresholds=None, rule=None):
        self.spec = ModelSpec(name=name, kind="detector", path=Path(f"{name}.onnx"), sidecar=Path(f"{name}.json"),
                              sha256="0" * 64, labels=list(labels), input={}, output={},
                              thresholds=dict(thresholds or {}))
        self.mode, self.batch_size, self.name, self.colour, self.pinned = "rgb", 16, name, "RGB", True
        self.rule = rule or (lambda img: [])
        self.calls: list[int] = []

    def detect(self, images):
        self.calls.append(len(images))
        return [self.rule(img) for img in images]

    def describe(self):
        return {"name": self.name, "kind": "detector", "pinned": True, "sha256": self.spec.sha256}


def always(box=(10, 10, 30, 30), label="X"):
    return lambda img: [Detection(label, 0.9, box, "fake")]


def while_textured(box=(10, 10, 30, 30), label="X"):
    """Flags the box while it is not one flat colour (a fill hides it, a blur does not)."""
    x, y, w, h = box
    return lambda img: [Detection(label, 0.9, box, "fake")] if np.ptp(img[y:y + h, x:x + w]) > 0 else []


# =========================================================================== (a) labels

TYPOS = [
    ("custom", "female_breast_exposed=0.5", "female_breast_exposed", "FEMALE_BREAST_EXPOSED"),
    ("strict-5", {"FEMALE_BREAST_EXPOSD": 0.5}, "FEMALE_BREAST_EXPOSD", "FEMALE_BREAST_EXPOSED"),
    ("face-only", "FACE_FEMALLE=0.4", "FACE_FEMALLE", "FACE_FEMALE"),
    ("broad-9", "Feet_Exposed=0.7", "Feet_Exposed", "FEET_EXPOSED"),
]


@pytest.mark.parametrize("policy, overrides, bad, suggestion", TYPOS)
def test_a_label_no_model_emits_is_an_error_naming_it_and_the_valid_ones(policy, overrides, bad, suggestion):
    with pytest.raises(PolicyError) as e:
        SafetyFilter(["nudenet"], get_policy(policy, overrides), "blur")
    msg = str(e.value)
    assert repr(bad) in msg and f"Did you mean {suggestion!r}" in msg
    assert all(label in msg for label in NUDENET_LABELS)         # every valid label is listed
    assert "nudenet" in msg


def test_the_same_labels_spelt_right_are_accepted():
    for policy, overrides, _, suggestion in TYPOS:
        SafetyFilter(["nudenet"], get_policy(policy, {suggestion: 0.5}), "blur")


def test_a_policy_file_with_a_typo_is_an_error(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"name": "mine", "thresholds": {"FACE_FEMALE": 0.5, "BUTOCKS_EXPOSED": 0.6}}))
    with pytest.raises(PolicyError, match=r"'BUTOCKS_EXPOSED'.*Did you mean 'BUTTOCKS_EXPOSED'"):
        SafetyFilter(["nudenet"], get_policy(str(path)), "blur")
    with pytest.raises(PolicyError, match="BUTOCKS_EXPOSED"):
        SafetyFilter(["nudenet"], str(path), "blur")                # a policy given by file name


@pytest.mark.parametrize("preset", ["strict-5", "broad-9", "face-only"])
def test_presets_whose_labels_the_models_do_not_emit_stay_legitimate(face, preset):
    # strict-5 / broad-9 / face-only with Open-NSFW only: the classifier's sidecar threshold applies.
    flt = SafetyFilter(["opennsfw"], preset, "blur")
    assert flt.check([face])[0].findings                       # nsfw / sfw scores are judged


def test_labels_the_user_typed_are_checked_even_when_a_preset_has_them():
    # ...but labels the *user* typed are checked, even when a preset has them
    with pytest.raises(PolicyError, match="FEMALE_BREAST_EXPOSED.*opennsfw"):
        SafetyFilter(["opennsfw"], get_policy("strict-5", "FEMALE_BREAST_EXPOSED=0.5"), "blur")
    SafetyFilter(["opennsfw"], get_policy("strict-5", "nsfw=0.7"), "blur")


def test_a_policy_that_can_flag_nothing_is_an_error():
    with pytest.raises(PolicyError, match="nothing could ever be flagged"):
        SafetyFilter(["nudenet"], Policy("empty"), "blur")
    with pytest.raises(PolicyError, match="nothing could ever be flagged"):
        SafetyFilter(["opennsfw"], get_policy("strict-5", use_model_defaults=False), "blur")
    with pytest.raises(PolicyError, match="nothing could ever be flagged"):
        SafetyFilter([FakeModel(labels=("a", "b"))], "strict-5", "blur")
    # the sidecar threshold of a classifier is enough
    SafetyFilter([FakeModel(labels=("a", "b"), thresholds={"b": 0.5})], "strict-5", "blur")


def test_labels_of_any_loaded_model_are_valid_and_case_matters():
    models = [FakeModel("one", labels=("alpha",), thresholds={"alpha": 0.5}), FakeModel("two", labels=("Beta",))]
    SafetyFilter(models, get_policy("custom", "Beta=0.5"), "blur")
    with pytest.raises(PolicyError, match=r"'BETA'.*Did you mean 'Beta'.*case-sensitive.*Valid labels: Beta, alpha"):
        SafetyFilter(models, get_policy("custom", "BETA=0.5"), "blur")
    with pytest.raises(PolicyError, match="'zzz'.*one, two") as e:
        SafetyFilter(models, get_policy("custom", "zzz=0.5"), "blur")
    assert "Did you mean" not in str(e.value)                       # nothing close: no suggestion


def test_a_sidecar_threshold_for_a_label_its_model_lacks_is_refused():
    with pytest.raises(ModelLoadError, match=r"'NSFW'.*nsfw"):
        SafetyFilter([FakeModel(labels=("sfw", "nsfw"), thresholds={"NSFW": 0.8})], "strict-5", "blur")


@pytest.mark.parametrize("kw, match", [({"feather": -1}, "feather"), ({"feather": float("nan")}, "feather"),
                                       ({"strength": -3}, "strength"), ({"strength": float("inf")}, "strength"),
                                       ({"colour": (0, 0)}, "colour"), ({"colour": (0, 2, 0)}, "colour")])
def test_censoring_options_are_validated(kw, match):
    with pytest.raises(ValueError, match=match):
        SafetyFilter(["nudenet"], "face-only", "blur", **kw)


# =========================================================================== (b) minimum strengths


def test_minimum_strengths_follow_the_region_sizes():
    mask = np.zeros((300, 400), np.float32)
    mask[10:110, 20:140] = 1.0                  # 120 x 100: shorter side 100
    mask[200:240, 300:330] = 1.0                # 30 x 40: shorter side 30
    assert min_strength("blur", mask) == pytest.approx(100 / 8)
    assert min_strength("pixelate", mask) == pytest.approx(100 / 10)
    assert min_strength("fill", mask) == 0.0
    feathered = mask.copy()
    feathered[0:10, 20:140] = 0.4               # a soft rim outside the core does not count
    feathered[110:150, 20:140] = 0.2
    assert min_strength("blur", feathered) == pytest.approx(100 / 8)
    tiny = np.zeros((300, 400), np.float32)
    tiny[5:7, 5:7] = 1.0
    assert min_strength("blur", tiny) == censor_mod.MIN_PIXELS == min_strength("pixelate", tiny)
    whole = np.ones((300, 400), np.float32)     # a whole-image classifier flag
    assert min_strength("pixelate", whole) == pytest.approx(30.0)


@pytest.mark.parametrize("action, weak", [("blur", 1.0), ("blur", 2.0), ("pixelate", 1.0)])
def test_weak_strengths_are_raised_to_the_minimum_and_hide_the_face(face, judge_filter, action, weak):
    f = face.astype(np.float32) / 255.0
    assert face_score(judge_filter, f) > 0.7
    flt = SafetyFilter(["nudenet"], "face-only", action, strength=weak)
    v = flt.check([face])[0]
    m = flt.mask(v)
    plain = censor(f, m, action, strength=weak)                 # the minimum applies here too
    assert face_score(judge_filter, plain) < 0.5, (action, weak)
    before = f.copy()
    out = flt.run(f[None])
    np.testing.assert_array_equal(f, before)                   # the input is never written
    assert out.verdicts[0].escalated is None                     # the minimum alone was enough
    assert face_score(judge_filter, out.images[0]) < 0.5
    np.testing.assert_array_equal(out.images[0][m == 0], f[m == 0])


@pytest.fixture
def no_minimums(monkeypatch):
    """As if the detector were more sensitive than the minimums assume."""
    monkeypatch.setattr(censor_mod, "BLUR_MIN_FRACTION", 0.0)
    monkeypatch.setattr(censor_mod, "PIXELATE_MAX_BLOCKS", 10**9)
    monkeypatch.setattr(censor_mod, "MIN_PIXELS", 1.0)


@pytest.mark.parametrize("action, weak", [("blur", 1.0), ("blur", 2.0), ("pixelate", 1.0)])
def test_censoring_that_still_trips_the_detector_is_escalated(face, judge_filter, no_minimums, action, weak):
    f = face.astype(np.float32) / 255.0
    flt = SafetyFilter(["nudenet"], "face-only", action, strength=weak, colour=(0.2, 0.3, 0.4))
    v = flt.check([face])[0]
    weakly = censor(f, flt.mask(v), action, strength=weak)
    assert face_score(judge_filter, weakly) >= 0.5                  # the weak censoring alone fails
    before = f.copy()
    out = flt.run(f[None])
    np.testing.assert_array_equal(f, before)
    verdict = out.verdicts[0]
    assert verdict.unsafe and verdict.escalated == "fill"
    assert verdict.to_dict()["escalated"] == "fill"
    assert face_score(judge_filter, out.images[0]) < 0.5              # no longer trips the detector
    m = out.masks[0] >= 1.0
    np.testing.assert_allclose(out.images[0][m], np.tile([0.2, 0.3, 0.4], (m.sum(), 1)), atol=1e-6)
    assert m.sum() < 0.2 * m.size                                    # a region, not the whole image
    # censor_checked (the CLI's entry point) does the same on float32 images and verdicts
    fresh = flt.check([face])
    imgs = flt.censor_checked([f], fresh)
    np.testing.assert_array_equal(imgs[0], out.images[0])
    assert fresh[0].escalated == "fill" and imgs[0] is not f
    np.testing.assert_array_equal(f, before)


@pytest.mark.parametrize("action", ["blur", "pixelate", "fill"])
def test_normal_strengths_are_not_escalated(face, judge_filter, action):
    flt = SafetyFilter(["nudenet"], "face-only", action)
    out = flt.run(face[None])
    assert out.verdicts[0].unsafe and out.verdicts[0].escalated is None
    assert out.verdicts[0].to_dict()["escalated"] is None
    assert face_score(judge_filter, out.images[0]) < 0.5


def test_fill_that_still_trips_a_model_escalates_to_the_placeholder():
    img = np.random.default_rng(1).random((64, 80, 3), dtype=np.float32)
    flt = SafetyFilter([FakeModel(rule=always())], get_policy("custom", "X=0.5"), "blur")
    out = flt.run(img[None])
    assert out.verdicts[0].escalated == "placeholder"
    np.testing.assert_array_equal(out.images[0], placeholder(64, 80))
    assert out.masks[0].min() == 1.0


def test_fill_escalation_stops_where_it_works_and_covers_the_recheck_findings():
    img = np.random.default_rng(2).random((64, 80, 3), dtype=np.float32)
    # the re-check finds a second region the first pass did not flag
    calls = {"n": 0}

    def rule(u8):
        calls["n"] += 1
        found = while_textured((5, 5, 20, 20))(u8)
        if calls["n"] > 1:                        # on re-checks: another textured region
            found += while_textured((40, 30, 20, 20))(u8)
        return found

    flt = SafetyFilter([FakeModel(rule=rule)], get_policy("custom", "X=0.5", expand=0.0), "pixelate", strength=2)
    out = flt.run(img[None])
    assert out.verdicts[0].escalated == "fill"
    assert out.images[0][5:25, 5:25].max() == 0.0 and out.images[0][30:50, 40:60].max() == 0.0
    assert out.masks[0][30:50, 40:60].min() == 1.0
    np.testing.assert_array_equal(out.images[0][55:, :30], img[55:, :30])


def test_the_recheck_is_one_batch_and_only_for_censored_unsafe_images():
    rng = np.random.default_rng(3)
    batch = rng.random((5, 48, 48, 3), dtype=np.float32)
    batch[1] = 0.5                                 # flat: never flagged by while_textured
    model = FakeModel(rule=while_textured((0, 0, 16, 16)))
    flt = SafetyFilter([model], get_policy("custom", "X=0.5"), "blur", strength=1)
    out = flt.run(batch)
    assert out.is_safe == [False, True, False, False, False]
    assert model.calls[0] == 5 and model.calls[1] == 4              # one re-check batch of the 4 unsafe images
    assert all(v.escalated == "fill" for i, v in enumerate(out.verdicts) if i != 1)
    assert len(model.calls) == 3 and model.calls[2] == 4            # the fills re-checked once more, together


@pytest.mark.parametrize("action", ["pass", "black", "placeholder"])
def test_non_region_actions_are_not_escalated(action):
    img = np.random.default_rng(4).random((40, 40, 3), dtype=np.float32)
    model = FakeModel(rule=always())
    flt = SafetyFilter([model], get_policy("custom", "X=0.5"), action)
    out = flt.run(img[None])
    assert out.verdicts[0].escalated is None and model.calls == [1]
    if action == "pass":
        np.testing.assert_array_equal(out.images[0], img)       # report only, by design
    elif action == "black":
        assert out.images[0].max() == 0.0


def test_censor_checked_contract():
    img = np.random.default_rng(5).random((40, 40, 3), dtype=np.float32)
    model = FakeModel(rule=always())
    flt = SafetyFilter([model], get_policy("custom", "X=0.5"), "block")
    verdicts = flt.check([img])
    with pytest.raises(UnsafeContentError):
        flt.censor_checked([img], verdicts)
    flt = SafetyFilter([model], get_policy("custom", "X=0.5"), "fill")
    with pytest.raises(SafeT2IError, match="2 images for 1 verdicts"):
        flt.censor_checked([img, img], verdicts)
    with pytest.raises(SafeT2IError, match="30x40"):
        flt.censor_checked([img[:, :30]], verdicts)
    safe = FakeModel(rule=lambda u8: [])
    sflt = SafetyFilter([safe], get_policy("custom", "X=0.5"), "blur")
    sv = sflt.check([img])
    out = sflt.censor_checked([img], sv)
    assert out[0] is not img and np.array_equal(out[0], img) and sv[0].escalated is None
    # hosts' censor_one keeps working (not re-checked) and never writes into its input
    before = img.copy()
    one = flt.censor_one(img, verdicts[0])
    np.testing.assert_array_equal(img, before)
    assert one[10:40, 10:40].max() == 0.0


# =========================================================================== the ComfyUI node


class _Anything:
    """Absorbs the schema calls made at import (``io.Custom(...)``, ``io.Float.Input``, ...)."""

    def __init__(self, *a, **k):
        pass

    def __getattr__(self, name):
        return _Anything()

    def __call__(self, *a, **k):
        return _Anything()


class _NodeOutput:
    def __init__(self, *args, ui=None):
        self.args, self.ui = args, ui


@pytest.fixture
def filter_nodes(monkeypatch):
    """``nodes/filter_nodes.py`` imported with a stand-in for ComfyUI's ``comfy_api`` and
    ``folder_paths``; the pack's ``safet2i`` is this process's (one copy of every class)."""
    import safet2i.filter.report  # noqa: F401 - loaded before aliasing
    import safet2i.runtime  # noqa: F401

    io = types.ModuleType("comfy_api.latest.io")
    io.__getattr__ = lambda name: _Anything()
    io.ComfyNode, io.NodeOutput = object, _NodeOutput
    ui = types.ModuleType("comfy_api.latest.ui")
    ui.PreviewText = lambda text: text
    latest = types.ModuleType("comfy_api.latest")
    latest.io, latest.ui = io, ui
    monkeypatch.setitem(sys.modules, "comfy_api", types.ModuleType("comfy_api"))
    monkeypatch.setitem(sys.modules, "comfy_api.latest", latest)
    monkeypatch.setitem(sys.modules, "folder_paths", types.ModuleType("folder_paths"))
    pack = types.ModuleType("_safet2i_pack")
    pack.__path__ = [str(REPO)]
    monkeypatch.setitem(sys.modules, "_safet2i_pack", pack)
    for name, mod in list(sys.modules.items()):
        if name == "safet2i" or name.startswith("safet2i."):
            monkeypatch.setitem(sys.modules, "_safet2i_pack." + name, mod)
    for name in ("_safet2i_pack.nodes", "_safet2i_pack.nodes.paths", "_safet2i_pack.nodes.filter_nodes"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    import importlib

    mod = importlib.import_module("_safet2i_pack.nodes.filter_nodes")
    yield mod
    for name in [n for n in sys.modules if n.startswith("_safet2i_pack.nodes")]:
        del sys.modules[name]


def test_the_comfyui_node_raises_on_a_label_typo(filter_nodes, face):
    from safet2i.filter import load_model

    images = torch.from_numpy(face.astype(np.float32) / 255.0)[None]
    models = (load_model("nudenet"),)
    node = filter_nodes.SafeT2IImageFilter
    with pytest.raises(PolicyError, match=r"'FACE_FEMALLE'.*Did you mean 'FACE_FEMALE'"):
        node.execute(images, models, "face-only", "blur", thresholds="FACE_FEMALLE=0.4")
    with pytest.raises(PolicyError, match=r"'female_breast_exposed'.*FEMALE_BREAST_EXPOSED"):
        node.execute(images, models, "custom", "blur", thresholds="female_breast_exposed=0.5")
    out = node.execute(images, models, "face-only", "blur", thresholds="FACE_FEMALE=0.5")
    img, mask, costs, is_safe, report = out.args
    assert is_safe is False and costs[0] > 0.5 and img.dtype == torch.float32
    assert json.loads(report)["images"][0]["escalated"] is None
    half = node.execute(images.half(), models, "face-only", "fill").args[0]
    assert half.dtype == torch.float16
    flags = node.execute(images > 0.5, models, "face-only", "blur").args[0]
    assert flags.dtype == torch.float32                             # a bool batch is not cast back to bool


# --------------------------------------------------------------------------- review follow-ups


@pytest.mark.parametrize("thresholds", ['{"FACE_FEMALE": true}', '{"FACE_FEMALE": null}', "FACE_FEMALE=1",
                                         '{"FACE_FEMALE": 1.0}'])
def test_thresholds_that_switch_a_label_off_are_refused(thresholds):
    """JSON true read as 1.0, or a threshold of 1, is never reached: the label would be off."""
    from safet2i.errors import PolicyError
    from safet2i.filter import get_policy

    with pytest.raises(PolicyError, match="FACE_FEMALE"):
        get_policy("custom", thresholds)


@pytest.mark.parametrize("content,match", [
    ({"treshold": {"FACE_FEMALE": 0.5}}, "unknown key"),
    ({"thresholds": {}}, "non-empty"),
    ({"thresholds": {"FACE_FEMALE": True}}, "not a number"),
    ({"thresholds": {"FACE_FEMALE": 0.5}, "expand": True}, "'expand' must be a number"),
    ({"thresholds": {"FACE_FEMALE": 0.5}, "use_model_defaults": "yes"}, "true or false"),
    (["FACE_FEMALE"], "JSON object"),
])
def test_policy_file_mistakes_are_errors(tmp_path, content, match):
    from safet2i.errors import PolicyError
    from safet2i.filter import get_policy

    f = tmp_path / "p.json"
    f.write_text(json.dumps(content))
    with pytest.raises(PolicyError, match=match):
        get_policy(str(f))


def test_policy_file_typo_fails_the_cli_even_with_a_classifier_loaded(tmp_path, capsys):
    """Review: with nudenet + opennsfw a misspelt "treshold" key left every NudeNet class off."""
    from PIL import Image
    from skimage import data

    from safet2i.cli import main

    Image.fromarray(data.astronaut()).save(tmp_path / "a.png")
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"treshold": {"FACE_FEMALE": 0.5}}))
    code = main(["filter", str(tmp_path / "a.png"), "--out", str(tmp_path / "o"), "--policy", str(f),
                 "--model", "nudenet", "--model", "opennsfw", "-q"])
    assert code == 4 and "treshold" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
