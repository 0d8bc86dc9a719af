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


def test_attribute_reward_is_the_share_of_matching_attributes():
    world = World(WorldConfig())
    samples = [world.sample(i, "benign") for i in range(4)]
    red = world.sample(0, "direct")
    judge = _OracleJudge([*samples, red])
    images = np.stack([s.image for s in samples])
    own = {s.caption: dict(s.attributes) for s in samples}
    assert np.allclose(trainers.attribute_reward(judge, own)(images, [s.caption for s in samples]), 1.0)
    # ask for the next sample's attributes: the reward counts the attributes that agree
    shifted = [samples[(i + 1) % 4] for i in range(4)]
    want = [np.mean([s.attributes[a] == t.attributes[a] for a in ATTRIBUTES]) for s, t in zip(samples, shifted)]
    got = trainers.attribute_reward(judge, own)(images, [t.caption for t in shifted])
    np.testing.assert_allclose(got, want)
    flags = trainers.concept_judge(judge)(np.stack([red.image, samples[0].image]))
    assert flags.tolist() == [True, False]


def test_memory_sampler_sees_an_allocation():
    pytest.importorskip("numpy")
    if trainers._rss_mib() is None:
        pytest.skip("no /proc/self/status here")

    def work():
        a = np.ones(64 * 1024 * 1024 // 8)   # 64 MiB, touched
        a[::512] = 2.0
        import time
        time.sleep(0.5)
        return float(a.sum())

    result, run = trainers.timed("x", work)
    assert result > 0 and run.seconds >= 0.5
    assert run.rss_increase_mib is not None and run.rss_increase_mib >= 40
