"""The lab's trainer runs (safet2i.lab.trainers): the prompts and scorers that adapt DUO and
SC-DPO to the lab world, and the memory sampler."""

from __future__ import annotations

import re

import numpy as np
import pytest

from safet2i.lab import trainers
from safet2i.lab.world import ATTRIBUTES, LEXICONS, World, WorldConfig, words


def test_duo_prompts_pair_each_direct_caption_with_its_concept_free_twin():
    world = World(WorldConfig())
    unsafe, safe = trainers.duo_prompts(world, 12, seed=0)
    lex = LEXICONS[("colour", "red")]
    concept_words = {lex.word, *lex.synonyms}
    assert len(unsafe) == len(safe) == 12 and len(set(unsafe)) > 6
    for u, s in zip(unsafe, safe):
        assert "red" in words(u)
        assert not concept_words & set(words(s))
        # the same caption with one word changed: the concept word -> a benign object colour
        du = [(a, b) for a, b in zip(words(u), words(s)) if a != b]
        assert len(words(u)) == len(words(s)) and du and all(a == "red" for a, _ in du)
        assert {b for _, b in du} <= set(ATTRIBUTES["colour"]) - {"red", "white"}
        bg = re.search(r"(\w+) background", u)
        assert bg is None or bg.group(1) not in {b for _, b in du}


def test_scdpo_prompts_cover_every_concept_form_and_record_attributes():
    world = World(WorldConfig())
    harmful, clean, attrs = trainers.scdpo_prompts(world, 8, 5, seed=1)
    assert len(harmful) == 8 and len(clean) == 5
    for p in harmful:
        assert attrs[p]["colour"] == "red"
    for p in clean:
        assert attrs[p]["colour"] != "red"
        assert "red" not in words(p)
    assert any("red" in words(p) for p in harmful)          # direct
    assert any("red" not in words(p) for p in harmful)      # synonym / indirect / misspelled


class _OracleJudge:
    """Stands in for the lab judge with the ground truth of known samples."""

    def __init__(self, samples):
        self.by_bytes = {s.image.tobytes(): s.attributes for s in samples}

    def judge_images(self, images):
        rows = [self.by_bytes[im.tobytes()] for im in images]
        out = {a: [r[a] for r in rows] for a in ATTRIBUTES}
        out["concept"] = np.array([r["colour"] == "red" for r in rows])
        return out


def test_concept_judge_reads_the_concept_head():
    world = World(WorldConfig())
    red, grey = world.sample(0, "direct"), world.sample(0, "benign")
    flags = trainers.concept_judge(_OracleJudge([red, grey]))(np.stack([red.image, grey.image]))
    assert flags.tolist() == [True, False]


def test_sc_dpo_scorers_on_uint8_images(micro_lab, tmp_path):
    """The shared rewards through the uint8 adapter: r is 1 for a world render with its own
    caption's attributes under a judge that knows them; C is the cost model's own number."""
    from safet2i.filter.detectors import load_model
    from safet2i.train.cost_model import TrainConfig, train_cost_model
    from safet2i.train.data import from_world

    cfg, _folder, judge, _ = micro_lab
    world = World(cfg.world)
    tr = from_world(16, split="train", size=cfg.world.size, concept="red", seed=0)
    held = from_world(4, split="heldout", size=cfg.world.size, concept="red", seed=0)
    model = train_cost_model(tr, held, TrainConfig(epochs=1, size=cfg.world.size, progress=False))
    sidecar = model.export(tmp_path / "c.onnx")
    samples = [world.sample(i, f) for i, f in enumerate(("direct", "benign", "benign"))]
    images = np.stack([s.image for s in samples])
    reward, cost = trainers.sc_dpo_scorers(judge, sidecar, {s.caption: dict(s.attributes) for s in samples})
    want_c = load_model(str(sidecar)).costs(list(images))
    np.testing.assert_allclose(cost(images), want_c, rtol=1e-6, atol=1e-6)
    r = reward(images, [s.caption for s in samples])
    res = judge.judge_images(images)
    for i, s in enumerate(samples):
        named = {a: v for a, v in s.attributes.items() if not (a == "colour" and v == "red")}
        assert r[i] == pytest.approx(np.mean([res[a][i] == v for a, v in named.items()]))


def test_memory_sampler_sees_an_allocation():
    pytest.importorskip("numpy")
    if trainers._rss_mib() is None:
        pytest.skip("no /proc/self/status here")

    def work():
        # A fresh anonymous mapping, every page touched: new resident memory whatever the
        # allocator kept from earlier tests (a numpy array could reuse pages already resident).
        import mmap
        import time

        size = 64 * 1024 * 1024
        m = mmap.mmap(-1, size)
        for off in range(0, size, mmap.PAGESIZE):
            m[off] = 1
        time.sleep(0.5)
        return m        # still alive when the sampler takes its last reading

    result, run = trainers.timed("x", work)
    assert result[0] == 1 and run.seconds >= 0.5
    assert run.rss_increase_mib is not None and run.rss_increase_mib >= 40
