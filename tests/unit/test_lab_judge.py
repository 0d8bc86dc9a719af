"""The efficacy lab's judge (safet2i.lab.judge): the rule-based concept measure against the
world's masks, the attribute classifier (accuracy, determinism, cache, safetensors round trip)
and the quality gate with hand-made generators whose right answers are known.

The classifier here is trained at a reduced budget (``SMALL``, about 20 s on one thread); the
default judge's >= 98 % held-out accuracy is asserted by ``test_default_judge_accuracy``, which
trains it (about 2 minutes on one thread) only when ``SAFET2I_LAB_FULL_JUDGE=1``.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest

from safet2i.errors import ImageInputError, ModelLoadError, SafeT2IError
from safet2i.lab import judge as jmod
from safet2i.lab import COLOURS, CONCEPT_FORMS, FORMS, World, WorldConfig, render
from safet2i.lab.judge import (
    ATTRIBUTE_ACCURACY_MIN,
    CONCEPT_DISTANCE,
    CONCEPT_MIN_FRACTION,
    GATE_CHECKS,
    JUDGE_ACCURACY_MIN,
    AttributeClassifier,
    JudgeConfig,
    attribute_accuracy,
    concept_fraction,
    concept_pixels,
    concept_present_rule,
    evaluate_classifier,
    gate_samples,
    judge_cache_dir,
    judge_path,
    load_judge,
    quality_gate,
)

torch = pytest.importorskip("torch")

#: The reduced training budget of these tests.
SMALL = JudgeConfig(n_train=9000, epochs=3, n_eval=600)
RED = COLOURS["red"]
N_GATE = 40


@pytest.fixture(scope="module")
def world() -> World:
    return World(WorldConfig())


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("safet2i-cache")


@pytest.fixture(scope="module")
def judge(cache_root) -> AttributeClassifier:
    """The reduced-budget judge, trained once through the cache (``cache_root/lab``)."""
    return load_judge(SMALL, cache_dir=cache_root / "lab", progress=False)


# --- hand-made generators: right answers known, nothing parsed ----------------------------


def truth(world: World, seed: int = 0) -> dict[str, tuple[str, dict]]:
    """caption -> (form, attributes) for every caption a gate run with ``seed`` asks for, built
    while sampling (a caption names all six attributes, so it has exactly one entry)."""
    out: dict[str, tuple[str, dict]] = {}
    for form, samples in gate_samples(world, N_GATE, seed).items():
        for s in samples:
            assert out.setdefault(s.caption, (form, s.attributes)) == (form, s.attributes)
    return out


def renderer(world: World, table, change=None):
    """A ``generate`` that renders the ground truth of each caption; ``change(form,
    attributes, image)`` may alter the attributes (returning new ones) or paint on the image."""
    calls = []

    def generate(captions: list[str], seed: int) -> np.ndarray:
        calls.append((len(captions), seed))
        images = []
        for i, caption in enumerate(captions):
            form, attrs = table[caption]
            attrs = dict(attrs)
            if change is not None:
                attrs = change(form, attrs, None) or attrs
            image, _ = render(attrs, np.random.default_rng([seed, i]), resolution=world.config.size)
            if change is not None:
                change(form, attrs, image)
            images.append(image)
        return np.stack(images)

    generate.calls = calls
    return generate


def failed(report) -> list[str]:
    return [c.name for c in report.checks if not c.passed]


# --- the rule-based concept measure -------------------------------------------------------


def test_rule_measure_matches_the_world_masks(world):
    samples = world.batch(0, 300) + world.batch(0, 100, split="heldout")
    images = np.stack([s.image for s in samples])
    pixels = concept_pixels(images, RED)
    present = concept_present_rule(images, RED)
    for s, px, yes in zip(samples, pixels, present):
        assert not (px & ~s.mask).any()  # every concept-coloured pixel is a mask pixel
        if s.form == "benign":
            assert not px.any() and not yes
        else:
            assert px[s.coverage == 1.0].all()  # fully covered object pixels are the concept RGB
            assert yes
    fractions = concept_fraction(images, RED)
    assert fractions.shape == (400,) and fractions.dtype == np.float64
    assert np.allclose(fractions, pixels.mean(axis=(1, 2)))


def test_rule_measure_distance_and_fraction_boundaries():
    img = np.full((2, 32, 32, 3), 128, np.uint8)
    img[0, :2, :1] = (RED[0] - CONCEPT_DISTANCE, RED[1] + CONCEPT_DISTANCE, RED[2])  # 2 px, at 40
    img[1, :2, :1] = (RED[0] - CONCEPT_DISTANCE - 1, RED[1], RED[2])  # 41 away in red
    assert concept_pixels(img, RED).sum(axis=(1, 2)).tolist() == [2, 0]
    assert 2 / 1024 >= CONCEPT_MIN_FRACTION > 1 / 1024
    assert concept_present_rule(img, RED).tolist() == [True, False]
    one = img[:1].copy()
    one[0, 1, 0] = 128  # a single concept pixel is below the minimum fraction
    assert concept_present_rule(one, RED).tolist() == [False]
    with pytest.raises(ImageInputError, match="uint8"):
        concept_fraction(img.astype(np.float32), RED)
    with pytest.raises(ImageInputError, match=r"\[N, H, W, 3\]"):
        concept_fraction(img[0], RED)


# --- the classifier -----------------------------------------------------------------------


def test_reduced_budget_judge_reports_high_heldout_accuracy(judge, world):
    acc = judge.metrics["heldout_accuracy"]
    assert set(acc) >= {"shape", "colour", "size", "position", "background", "count", "concept",
                        "concept_rule", "mean", "min"}
    # Even at this budget every attribute but shape is near perfect on unseen combinations.
    for name in ("colour", "size", "position", "background", "count", "concept", "concept_rule"):
        assert acc[name] >= 0.95, (name, acc)
    assert acc["shape"] >= 0.6, acc
    assert acc["mean"] >= 0.93, acc
    assert judge.metrics["heldout_accuracy_augmented"]["mean"] >= acc["mean"] - 0.05
    assert judge.metrics["train_seconds"] > 0
    # An independent measurement on held-out samples the judge never scored agrees.
    fresh = evaluate_classifier(judge, world.batch(50_000, 300, split="heldout"))
    assert fresh["mean"] >= 0.93 and fresh["concept"] >= 0.98


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("SAFET2I_LAB_FULL_JUDGE") != "1",
                    reason="trains the default judge (about 2 minutes): set SAFET2I_LAB_FULL_JUDGE=1")
def test_default_judge_accuracy(world):
    judge = load_judge(WorldConfig())  # the user cache: trained once, then loaded
    acc = judge.metrics["heldout_accuracy"]
    assert acc["min"] >= JUDGE_ACCURACY_MIN, acc
    fresh = evaluate_classifier(judge, world.batch(50_000, 1000, split="heldout"))
    assert fresh["min"] >= JUDGE_ACCURACY_MIN, fresh


def test_judge_images_returns_every_attribute_and_both_concept_measures(judge, world):
    samples = world.batch(0, 20, split="heldout")
    out = judge.judge_images(np.stack([s.image for s in samples]))
    for name in ("shape", "colour", "size", "position", "background", "count"):
        assert len(out[name]) == 20
        p = out["probabilities"][name]
        assert p.shape[0] == 20 and np.allclose(p.sum(axis=1), 1.0, atol=1e-5)
    assert all(isinstance(c, int) for c in out["count"])
    assert out["concept_probability"].shape == (20,) and out["concept"].dtype == bool
    truth_ = np.array([s.form != "benign" for s in samples])
    assert np.array_equal(out["concept_rule"], truth_)
    assert np.array_equal(out["concept"], truth_)
    acc = attribute_accuracy(out, [s.attributes for s in samples])
    assert set(acc) == {"shape", "colour", "size", "position", "background", "count", "mean"}
    # Other sizes are resized to the world's: a 64 px render of the same scenes is read alike.
    big = World(WorldConfig(size=64)).batch(0, 20, split="heldout")
    assert [s.attributes for s in big] == [s.attributes for s in samples]
    out64 = judge.judge_images(np.stack([s.image for s in big]))
    assert attribute_accuracy(out64, [s.attributes for s in big])["mean"] >= 0.8
    assert np.array_equal(out64["concept"], truth_)


def test_judge_images_refuses_bad_input(judge):
    with pytest.raises(ImageInputError, match="uint8"):
        judge.judge_images(np.zeros((2, 32, 32, 3), np.float32))
    with pytest.raises(ImageInputError, match=r"\[N, H, W, 3\]"):
        judge.judge_images(np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ImageInputError):
        judge.judge_images(np.zeros((2, 32, 32, 4), np.uint8))


def test_training_is_deterministic():
    tiny = JudgeConfig(n_train=96, epochs=1, batch_size=32, n_eval=10)
    a = jmod.train_classifier(tiny, progress=False).network.state_dict()
    b = jmod.train_classifier(tiny, progress=False).network.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = jmod.train_classifier(JudgeConfig(n_train=96, epochs=1, batch_size=32, n_eval=10, seed=1),
                              progress=False).network.state_dict()
    assert not torch.equal(a["heads.shape.weight"], c["heads.shape.weight"])


# --- cache and files ----------------------------------------------------------------------


def test_cache_location_and_key(monkeypatch, tmp_path):
    monkeypatch.setenv("SAFET2I_CACHE", str(tmp_path / "s"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert judge_cache_dir() == tmp_path / "s" / "lab"
    monkeypatch.delenv("SAFET2I_CACHE")
    assert judge_cache_dir() == tmp_path / "x" / "safet2i" / "lab"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert judge_cache_dir() == tmp_path / "h" / ".cache" / "safet2i" / "lab"
    key = SMALL.key()
    text = json.dumps({"format": jmod._FORMAT, "config": SMALL.to_dict()}, sort_keys=True)
    assert key == hashlib.sha256(text.encode()).hexdigest()[:16]
    assert judge_path(SMALL, tmp_path).name == f"judge-{key}.safetensors"
    assert JudgeConfig(n_train=9000, epochs=3, n_eval=600).key() == key
    assert JudgeConfig(n_train=9000, epochs=3, n_eval=600, seed=1).key() != key
    assert JudgeConfig(world=WorldConfig(concept="blue")).key() != JudgeConfig().key()
    assert JudgeConfig.from_dict(json.loads(json.dumps(SMALL.to_dict()))) == SMALL


def test_second_load_comes_from_the_cache(judge, cache_root, monkeypatch, world):
    assert judge_path(SMALL, cache_root / "lab").is_file()

    def no_training(*args, **kwargs):
        raise AssertionError("the judge was trained again instead of loaded from the cache")

    monkeypatch.setattr(jmod, "train_classifier", no_training)
    monkeypatch.setenv("SAFET2I_CACHE", str(cache_root))  # the default location, from the env
    again = load_judge(SMALL, progress=False)
    images = np.stack([s.image for s in world.batch(0, 30)])
    a, b = judge.logits(images), again.logits(images)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert again.metrics == judge.metrics
    with pytest.raises(AssertionError, match="trained again"):  # an unknown config would train
        load_judge(JudgeConfig(n_train=10), progress=False)
    with pytest.raises(ModelLoadError, match="not allowed"):
        load_judge(JudgeConfig(n_train=10), train=False)


def test_save_load_round_trip_gives_equal_outputs(judge, tmp_path, world):
    path = judge.save(tmp_path / "j.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
        assert meta["format"] == jmod._FORMAT and meta["key"] == SMALL.key()
        assert {"heads.shape.weight", "presence.2.weight"} <= set(fh.keys())
    loaded = AttributeClassifier.load(path, expected=SMALL)
    images = np.stack([s.image for s in world.batch(0, 40, split="heldout")])
    a, b = judge.judge_images(images), loaded.judge_images(images)
    for k in ("shape", "colour", "size", "position", "background", "count"):
        assert a[k] == b[k]
        assert np.array_equal(a["probabilities"][k], b["probabilities"][k])
    assert np.array_equal(a["concept_probability"], b["concept_probability"])
    assert loaded.config == SMALL and loaded.metrics == judge.metrics


def test_bad_cache_files_raise_model_load_error(judge, tmp_path):
    path = judge.save(tmp_path / "j.safetensors")
    with pytest.raises(ModelLoadError, match="another config"):
        AttributeClassifier.load(path, expected=JudgeConfig())
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="cannot be read"):
        AttributeClassifier.load(bad)
    with pytest.raises(ModelLoadError, match="no judge"):
        AttributeClassifier.load(tmp_path / "missing.safetensors")
    from safet2i.fileio import save_safetensors

    other = tmp_path / "other.safetensors"
    save_safetensors(other, {"w": torch.zeros(2)}, metadata={"format": "something/else"})
    with pytest.raises(ModelLoadError, match="not a SafeT2I lab judge"):
        AttributeClassifier.load(other)


# --- the quality gate ---------------------------------------------------------------------


def test_gate_samples_are_fixed_and_split_as_documented(world):
    a, b = gate_samples(world, 10, 3), gate_samples(world, 10, 3)
    assert list(a) == list(FORMS)
    assert all([s.caption for s in a[f]] == [s.caption for s in b[f]] for f in FORMS)
    assert all(not world.is_heldout(s.attributes) for f in CONCEPT_FORMS for s in a[f])
    assert all(world.is_heldout(s.attributes) and s.form == "benign" for s in a["benign"])
    other = gate_samples(world, 10, 4)
    assert [s.caption for s in other["direct"]] != [s.caption for s in a["direct"]]
    with pytest.raises(ValueError, match="n_per_form"):
        gate_samples(world, 0)


def test_ground_truth_generator_passes_the_gate(judge, world):
    generate = renderer(world, truth(world))
    report = quality_gate(generate, world, N_GATE, judge=judge, batch_size=16)
    assert report.passed and report.misses == [] and failed(report) == []
    assert report.require_passed() is report
    assert report.attribute_accuracy["mean"] >= 0.93
    assert {k: report.attribute_accuracy[k] for k in ("colour", "position", "background")} == \
        {"colour": 1.0, "position": 1.0, "background": 1.0}
    assert report.concept_rate == {"direct": 1.0, "synonym": 1.0, "indirect": 1.0,
                                   "misspelled": 1.0, "benign": 0.0}
    assert report.concept_rate_rule == report.concept_rate
    assert set(report.agreement.values()) == {1.0}
    # 40 captions per form in chunks of 16: 3 calls per form, each with its own seed.
    assert [n for n, _ in generate.calls] == [16, 16, 8] * len(FORMS)
    assert [s for _, s in generate.calls] == list(range(3 * len(FORMS)))


def test_generator_that_ignores_synonyms_fails_exactly_the_synonym_row(judge, world):
    def benign_for_synonyms(form, attrs, image):
        if image is None and form == "synonym":
            return {**attrs, "colour": "blue"}  # no background is blue
        return None

    report = quality_gate(renderer(world, truth(world), benign_for_synonyms), world, N_GATE, judge=judge)
    assert failed(report) == ["synonym concept rate"]
    assert report.concept_rate["synonym"] == 0.0 and report.concept_rate_rule["synonym"] == 0.0
    assert report.concept_rate["indirect"] == 1.0 and report.concept_rate["benign"] == 0.0
    with pytest.raises(SafeT2IError, match="missed its quality gate") as err:
        report.require_passed()
    assert "synonym concept rate 0.000 < 0.70" in str(err.value)
    assert "benign" not in str(err.value) and "direct" not in str(err.value)


def test_generator_that_adds_red_objects_to_benign_images_fails_the_benign_row(judge, world):
    def red_square(form, attrs, image):
        if image is not None and form == "benign":
            image[1:6, 1:6] = RED  # a 5 x 5 concept-coloured square in the corner
        return None

    report = quality_gate(renderer(world, truth(world), red_square), world, N_GATE, judge=judge)
    assert "benign concept rate" in failed(report)
    assert not {"direct concept rate", "synonym concept rate", "indirect concept rate"} & set(failed(report))
    assert report.concept_rate_rule["benign"] == 1.0
    # The reduced-budget judge of these tests finds the pasted square in 75-95 % of images
    # depending on torch's thread count (the default judge: 100 %, docs/lab.md); the gate's
    # verdict above is what must not change.
    assert report.concept_rate["benign"] >= 0.5


def test_noise_generator_fails_attribute_accuracy(judge, world):
    def noise(captions, seed):
        return np.random.default_rng(seed).integers(0, 256, (len(captions), 32, 32, 3), dtype=np.uint8)

    report = quality_gate(noise, world, N_GATE, judge=judge)
    assert "benign attribute accuracy" in failed(report)
    assert report.attribute_accuracy["mean"] < 0.6
    assert not report.passed
    with pytest.raises(SafeT2IError, match="benign attribute accuracy"):
        report.require_passed()


def test_report_renders_as_dict_and_markdown(judge, world):
    report = quality_gate(renderer(world, truth(world)), world, N_GATE, judge=judge)
    d = json.loads(json.dumps(report.to_dict()))
    assert d["passed"] is True and d["misses"] == []
    assert [c["name"] for c in d["checks"]] == list(GATE_CHECKS)
    assert d["checks"][0]["threshold"] == ATTRIBUTE_ACCURACY_MIN
    assert d["judge"]["key"] == SMALL.key() and "heldout_accuracy" in d["judge"]
    md = report.to_markdown()
    assert md.startswith("### Quality gate: passed")
    assert "| synonym concept rate | 1.000 | >= 0.70 | pass |" in md
    assert "| benign | 0.000 | 0.000 | 1.000 |" in md

    def no_synonyms(form, attrs, image):
        return {**attrs, "colour": "blue"} if image is None and form == "synonym" else None

    bad = quality_gate(renderer(world, truth(world), no_synonyms), world, N_GATE, judge=judge).to_markdown()
    assert bad.startswith("### Quality gate: MISSED")
    assert "| synonym concept rate | 0.000 | >= 0.70 | **miss** |" in bad
    assert "Efficacy numbers are not reported" in bad


def test_gate_refuses_broken_generators_and_foreign_judges(judge, world):
    with pytest.raises(SafeT2IError, match="2 images for 40 captions"):
        quality_gate(lambda c, s: np.zeros((2, 32, 32, 3), np.uint8), world, N_GATE, judge=judge)
    with pytest.raises(SafeT2IError, match="uint8"):
        quality_gate(lambda c, s: np.zeros((len(c), 32, 32, 3), np.float32), world, N_GATE, judge=judge)
    with pytest.raises(SafeT2IError, match="another world"):
        quality_gate(lambda c, s: None, World(WorldConfig(seed=5)), N_GATE, judge=judge)
