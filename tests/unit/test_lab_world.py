"""The efficacy lab's procedural world (safet2i.lab.world): determinism, masks, caption forms,
rendered attributes, the held-out split and config validation."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections import deque

import numpy as np
import pytest

from safet2i.lab import world as wmod
from safet2i.lab import (
    BACKGROUNDS,
    COLOURS,
    CONCEPT_FORMS,
    FORMS,
    LEXICONS,
    World,
    WorldConfig,
    combination_key,
    vocabulary,
)

#: "Close to a colour": every channel within 40 of it (Chebyshev distance <= 40 on 0..255).
CLOSE = 40
RED = np.array(COLOURS["red"])
LEX = LEXICONS[("colour", "red")]


def cheb(image: np.ndarray, rgb) -> np.ndarray:
    """Per-pixel Chebyshev distance of an [H, W, 3] image to one RGB colour."""
    return np.abs(image.astype(np.int32) - np.asarray(rgb, np.int32)).max(axis=-1)


def has_word(text: str, word: str) -> bool:
    return re.search(rf"\b{re.escape(word)}\b", text) is not None


def levenshtein(a: str, b: str) -> int:
    """Independent of the module's: full DP table."""
    t = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a) + 1):
        t[i][0] = i
    for j in range(len(b) + 1):
        t[0][j] = j
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            t[i][j] = min(t[i - 1][j] + 1, t[i][j - 1] + 1, t[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
    return t[len(a)][len(b)]


def components(mask: np.ndarray) -> int:
    """Number of 8-connected components of a boolean mask (BFS)."""
    seen = np.zeros_like(mask)
    h, w = mask.shape
    n = 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        n += 1
        seen[y0, x0] = True
        q = deque([(y0, x0)])
        while q:
            y, x = q.popleft()
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    yy, xx = y + dy, x + dx
                    if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not seen[yy, xx]:
                        seen[yy, xx] = True
                        q.append((yy, xx))
    return n


def digest(sample) -> str:
    return hashlib.sha256(sample.image.tobytes() + sample.caption.encode()).hexdigest()


@pytest.fixture(scope="module")
def world() -> World:
    return World(WorldConfig())


# --- determinism -------------------------------------------------------------------------


@pytest.mark.parametrize("form", FORMS)
def test_same_arguments_give_identical_samples(form):
    a, b = World(WorldConfig()), World(WorldConfig())
    for i in (0, 7, 123):
        sa, sb = a.sample(i, form), b.sample(i, form)
        assert sa.image.tobytes() == sb.image.tobytes()
        assert sa.caption == sb.caption
        assert np.array_equal(sa.mask, sb.mask) and sa.attributes == sb.attributes
        assert sa.image.dtype == np.uint8 and sa.image.shape == (32, 32, 3)
        assert sa.mask.dtype == bool and sa.mask.shape == (32, 32)


def test_index_seed_form_and_split_change_the_sample(world):
    per_index = {digest(world.sample(i, "direct")) for i in range(20)}
    assert len(per_index) == 20
    other_seed = World(WorldConfig(seed=1))
    assert all(digest(world.sample(i, "direct")) != digest(other_seed.sample(i, "direct"))
               for i in range(10))
    assert all(digest(world.sample(i, "direct")) != digest(world.sample(i, "synonym"))
               for i in range(10))
    assert all(digest(world.sample(i, "benign")) != digest(world.sample(i, "benign", "heldout"))
               for i in range(10))


def test_a_fresh_process_gives_the_same_bytes(world):
    calls = [(32, 0, 0, "direct", "train"), (32, 0, 5, "benign", "heldout"),
             (64, 3, 2, "indirect", "train"), (32, 9, 11, "misspelled", "train")]
    code = (
        "import hashlib, json, sys\n"
        "from safet2i.lab import World, WorldConfig\n"
        "out = []\n"
        "for size, seed, i, form, split in json.loads(sys.argv[1]):\n"
        "    s = World(WorldConfig(size=size, seed=seed)).sample(i, form, split)\n"
        "    out.append(hashlib.sha256(s.image.tobytes() + s.caption.encode()).hexdigest())\n"
        "print(json.dumps(out))\n"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")  # Python's hash() salt must not matter
    res = subprocess.run([sys.executable, "-c", code, json.dumps(calls)], capture_output=True,
                         text=True, env=env, timeout=60, check=True)
    here = [digest(World(WorldConfig(size=s, seed=sd)).sample(i, f, sp)) for s, sd, i, f, sp in calls]
    assert json.loads(res.stdout) == here


def test_batch_is_the_same_as_sample(world):
    b = world.batch(3, 7, forms=("direct", "benign"), split="heldout")
    assert len(b) == 7
    for k, s in enumerate(b, start=3):
        ref = world.sample(k, ("direct", "benign")[k % 2], "heldout")
        assert s.form == ref.form and s.caption == ref.caption
        assert s.image.tobytes() == ref.image.tobytes()
    assert [s.form for s in world.batch(0, 10)] == list(FORMS) * 2


# --- masks and concept pixels -------------------------------------------------------------


@pytest.mark.parametrize("form", CONCEPT_FORMS)
def test_concept_masks_cover_exactly_the_concept_pixels(world, form):
    for i in range(40):
        s = world.sample(i, form)
        assert s.attributes["colour"] == "red"
        assert s.mask.any()
        assert np.array_equal(s.mask, s.coverage >= 0.5)
        bg = BACKGROUNDS[s.attributes["background"]]
        d = cheb(s.image, RED)
        # a mask pixel is at least half object colour: no farther from red than half the
        # background's distance (+1 for rounding), and some mask pixel is close to red
        assert (d[s.mask] <= 0.5 * cheb(np.array([[bg]]), RED)[0, 0] + 1).all()
        assert (d[s.mask] <= CLOSE).any()
        # every pixel close to red is a mask pixel
        assert not ((d <= CLOSE) & ~s.mask).any()
        # fully covered pixels are exactly the concept colour
        assert (s.image[s.coverage == 1.0] == RED).all()


def test_benign_images_have_no_concept_pixels_and_empty_masks(world):
    colours = set()
    for i in range(300):
        s = world.sample(i, "benign")
        colours.add(s.attributes["colour"])
        assert s.attributes["colour"] != "red" and s.attributes["background"] != "red"
        assert not s.mask.any()
        assert (s.coverage >= 0.5).any()  # the objects are there, just not red
        assert cheb(s.image, RED).min() > CLOSE, s.caption
    assert colours == set(COLOURS) - {"red"}


def test_another_colour_concept_with_lists_works():
    w = World(WorldConfig(concept="blue", size=32))
    blue = COLOURS["blue"]
    for i in range(60):
        b = w.sample(i, "benign")
        assert b.attributes["colour"] != "blue" and cheb(b.image, blue).min() > CLOSE
        c = w.sample(i, "synonym")
        assert c.attributes["colour"] == "blue" and c.mask.any()
        assert not has_word(c.caption, "blue")
        assert any(has_word(c.caption, syn) for syn in LEXICONS[("colour", "blue")].synonyms)
    assert any(w.sample(i, "benign").attributes["colour"] == "red" for i in range(60))


# --- caption forms ------------------------------------------------------------------------


def test_lexicon_for_red_has_the_expected_kind_of_words():
    assert {"crimson", "scarlet"} <= set(LEX.synonyms)
    assert len(LEX.synonyms) >= 4 and len(LEX.indirect) >= 4 and len(LEX.misspellings) >= 4


def test_caption_forms(world):
    vocab = vocabulary()
    plain = vocabulary(misspellings=False)
    assert not set(LEX.misspellings) & plain
    for i in range(60):
        samples = {f: world.sample(i, f) for f in FORMS}
        for s in samples.values():
            assert set(wmod.words(s.caption)) <= vocab, s.caption
            a = s.attributes
            assert has_word(s.caption, a["background"])
            assert has_word(s.caption, a["size"])
            assert re.search(rf"\b{a['shape']}", s.caption)
        direct = samples["direct"].caption
        assert has_word(direct, "red")
        syn = samples["synonym"].caption
        assert not has_word(syn, "red") and any(has_word(syn, w) for w in LEX.synonyms)
        ind = samples["indirect"].caption
        assert not has_word(ind, "red") and not any(has_word(ind, w) for w in LEX.synonyms)
        assert any(phrase in ind for phrase, _ in LEX.indirect)
        mis = samples["misspelled"].caption
        assert not has_word(mis, "red") and not any(has_word(mis, w) for w in LEX.synonyms)
        unknown = [w for w in wmod.words(mis) if w not in plain]
        assert len(unknown) == 1, mis
        assert 1 <= levenshtein(unknown[0], "red") <= 2 and unknown[0] in LEX.misspellings
        ben = samples["benign"].caption
        assert has_word(ben, samples["benign"].attributes["colour"])
        assert not has_word(ben, "red")
        assert not any(has_word(ben, w) for w in (*LEX.synonyms, *LEX.misspellings))
        assert not any(phrase in ben for phrase, _ in LEX.indirect)
        assert set(wmod.words(ben)) <= plain


def test_every_synonym_indirect_phrase_and_misspelling_is_used(world):
    caps = {f: " / ".join(world.sample(i, f).caption for i in range(300)) for f in CONCEPT_FORMS}
    assert all(has_word(caps["synonym"], w) for w in LEX.synonyms)
    assert all(p in caps["indirect"] for p, _ in LEX.indirect)
    assert all(has_word(caps["misspelled"], w) for w in LEX.misspellings)


def test_a_bad_lexicon_is_refused(monkeypatch):
    bad = wmod.ConceptLexicon(word="red", synonyms=("blood-red",), indirect=(("crimson-ish", "pre"),),
                              misspellings=("grey", "rde"))
    monkeypatch.setitem(wmod.LEXICONS, ("colour", "red"), bad)
    with pytest.raises(ValueError) as err:
        WorldConfig()
    msg = str(err.value)
    assert "blood-red" in msg and "crimson-ish" not in msg and "rde" not in msg
    # 'grey' is at edit distance 2 from 'red' but is a background word of the world
    assert "misspelling 'grey' is a word of the world" in msg
    bad2 = wmod.ConceptLexicon(word="red", synonyms=("crimson",), indirect=(("crimson-ish", "pre"),),
                               misspellings=("rde",))
    monkeypatch.setitem(wmod.LEXICONS, ("colour", "red"), bad2)
    with pytest.raises(ValueError, match="crimson-ish"):
        WorldConfig()


# --- attributes are rendered ------------------------------------------------------------


@pytest.mark.parametrize("size", [32, 64])
def test_attributes_are_rendered(size):
    w = World(WorldConfig(size=size))
    areas: dict[str, list[float]] = {"small": [], "large": []}
    seen = {name: set() for name in ("shape", "position", "count", "background", "size")}
    for i in range(120):
        s = w.sample(i, ("direct", "benign")[i % 2])
        a = s.attributes
        for name in seen:
            seen[name].add(a[name])
        assert s.image.shape == (size, size, 3) and s.mask.shape == (size, size)
        obj = s.coverage >= 0.5
        assert components(obj) == a["count"], (i, a)
        ys, xs = np.nonzero(s.coverage > 0)
        wts = s.coverage[ys, xs]
        cx, cy = (xs + 0.5) @ wts / wts.sum() / size, (ys + 0.5) @ wts / wts.sum() / size
        region = {"left": cx < 0.4, "right": cx > 0.6, "top": cy < 0.4, "bottom": cy > 0.6,
                  "centre": abs(cx - 0.5) < 0.1 and abs(cy - 0.5) < 0.1}
        assert region[a["position"]], (a, cx, cy)
        areas[a["size"]].append(float(s.coverage.sum()) / a["count"] / size**2)
        bg = BACKGROUNDS[a["background"]]
        for y, x in ((0, 0), (0, -1), (-1, 0), (-1, -1)):
            assert tuple(s.image[y, x]) == bg
        assert (s.image[s.coverage == 0] == bg).all()
        assert (s.image[s.coverage == 1] == COLOURS[a["colour"]]).all()
        assert a["background"] != a["colour"]
    assert max(areas["small"]) < min(areas["large"])
    assert seen == {"shape": set(wmod.SHAPES), "position": set(wmod.POSITIONS), "count": {1, 2, 3},
                    "background": set(BACKGROUNDS), "size": {"small", "large"}}


def test_render_keeps_three_large_objects_inside_and_apart():
    rng = np.random.default_rng(0)
    for pos in wmod.POSITIONS:
        for shape in wmod.SHAPES:
            attrs = dict(shape=shape, colour="green", size="large", position=pos, background="grey",
                         count=3)
            img, cov = wmod.render(attrs, rng, resolution=32)
            assert components(cov >= 0.5) == 3
            assert cov[0].max() < 0.5 and cov[-1].max() < 0.5  # never cut by the border
            assert cov[:, 0].max() < 0.5 and cov[:, -1].max() < 0.5


# --- held-out split ---------------------------------------------------------------------


def test_heldout_combinations_are_disjoint_from_train(world):
    train = {combination_key(world.sample(i, f).attributes) for i in range(200) for f in ("benign", "direct")}
    held = {combination_key(world.sample(i, f, "heldout").attributes)
            for i in range(200) for f in ("benign", "direct")}
    assert not train & held
    assert len(held) > 40 and len(train) > 300
    assert all(world.is_heldout(dict(kv.split("=") for kv in k.split("|"))) for k in list(held)[:5])


@pytest.mark.parametrize("fraction", [0.1, 0.3])
def test_about_the_configured_fraction_is_held_out(fraction):
    w = World(WorldConfig(heldout_fraction=fraction))
    combos = w.combinations()
    held = w.combinations(split="heldout")
    assert len(combos) > 1000
    assert abs(len(held) / len(combos) - fraction) < 0.02
    benign = w.combinations(concept=False)
    assert abs(len(w.combinations(concept=False, split="heldout")) / len(benign) - fraction) < 0.025
    assert all(c["colour"] != "red" and c["background"] != c["colour"] for c in benign)
    # stable: the split depends on the combination only, not on the seed
    keys = {combination_key(c) for c in held}
    assert keys == {combination_key(c) for c in World(WorldConfig(seed=99, heldout_fraction=fraction))
                    .combinations(split="heldout")}


def test_no_heldout_combinations_means_a_clear_error():
    w = World(WorldConfig(heldout_fraction=0.0))
    w.sample(0, "benign")
    with pytest.raises(ValueError, match="heldout"):
        w.sample(0, "benign", "heldout")


# --- configuration ----------------------------------------------------------------------


def test_size_64_works():
    s = World(WorldConfig(size=64)).sample(0, "direct")
    assert s.image.shape == (64, 64, 3) and s.mask.shape == (64, 64) and s.mask.sum() > 20


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(concept="magenta"), r"unknown concept 'magenta'.*known values: red"),
        (dict(size=15), r"size must be an integer >= 16"),
        (dict(size=32.0), r"size must be an integer"),
        (dict(concept="green"), r"no synonym, indirect and misspelling lists for the colour 'green'"),
        (dict(concept_attribute="texture"), r"unknown concept_attribute 'texture'"),
        (dict(heldout_fraction=1.5), r"heldout_fraction must be a number in \[0, 1\]"),
    ],
)
def test_bad_configs_raise_value_error(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        WorldConfig(**kwargs)


def test_non_colour_concept_attribute_is_not_implemented():
    with pytest.raises(NotImplementedError, match="only colour"):
        WorldConfig(concept_attribute="shape", concept="circle")


def test_bad_sample_arguments(world):
    with pytest.raises(ValueError, match="unknown form"):
        world.sample(0, "explicit")
    with pytest.raises(ValueError, match="unknown split"):
        world.sample(0, "direct", "test")
    with pytest.raises(ValueError, match="non-negative"):
        world.sample(-1, "direct")
