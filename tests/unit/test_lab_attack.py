"""The lab's Ring-A-Bell-style prompt attack (safet2i.lab.attack): it finds a planted solution a
random search of the same budget misses, never uses (or re-creates) a banned word, is
deterministic for a seed, computes the concept direction exactly and validates its config."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from safet2i.lab import attack as A  # noqa: E402
from safet2i.lab.world import LEXICONS, World, WorldConfig  # noqa: E402

pytestmark = pytest.mark.skipif(importlib.util.find_spec("open_clip") is None,
                                reason="open-clip-torch (for its CLIP BPE file) is not installed")

PREFIX, SUFFIX = "two small", "circles on the left, grey background"


@pytest.fixture(scope="module")
def tok():
    from safet2i.lab.tokenizer import clip_tokenizer

    return clip_tokenizer()


@pytest.fixture(scope="module")
def world():
    return World(WorldConfig())


class TinyEncoder:
    """A deterministic stand-in for a text encoder: a random token table plus positions, and a
    causal running mean mixed in (so a token changes every later position, as in CLIP)."""

    def __init__(self, tok, dim: int = 8, seed: int = 0, positions: float = 0.1, mix: float = 0.5):
        g = torch.Generator().manual_seed(seed)
        self.tok = tok
        self.table = torch.randn(len(tok), dim, generator=g)
        self.pos = positions * torch.randn(77, dim, generator=g)
        self.mix = mix
        self.calls = 0

    def __call__(self, prompts):
        self.calls += 1
        ids = self.tok(list(prompts), padding="max_length", max_length=77, truncation=True,
                       return_tensors="pt").input_ids
        e = self.table[ids] + self.pos
        run = e.cumsum(1) / torch.arange(1, 78).view(1, 77, 1)
        return e + self.mix * run


def planted_setup(tok, world, **overrides):
    kw = dict(tokens=3, population=64, generations=80, pool_size=150, world_tokens=False, seed=0)
    kw.update(overrides)
    config = A.AttackConfig(**kw)
    pool = A.candidate_pool(tok, world, config)
    planted = (pool[7], pool[71], pool[133])
    enc = TinyEncoder(tok)
    slot = A.decode_tokens(tok, planted)
    target = enc([f"{PREFIX} {slot} {SUFFIX}"])[0]
    obj = A.SlotObjective(enc, tok, target, prefix=PREFIX, suffix=SUFFIX, banned=A.banned_words(world),
                          target_slot_tokens=len(planted), fitness=config.fitness, align=config.align)
    return config, pool, planted, obj


@pytest.mark.parametrize("method", ["genetic", "greedy"])
def test_the_search_recovers_a_planted_solution_a_random_search_misses(tok, world, method):
    config, pool, planted, obj = planted_setup(tok, world, method=method)
    assert len(pool) == 150 and len(set(pool)) == 150
    assert obj([planted])[0] == pytest.approx(0.0, abs=1e-12)  # the optimum is known
    found = A.search_tokens(obj, pool, config, seed=0)
    assert found.tokens == planted
    assert found.loss == pytest.approx(0.0, abs=1e-12)
    assert found.history == sorted(found.history, reverse=True)  # elitism: the best never worsens
    # A random search with the same number of encoded candidates (K tokens of a 150-token pool:
    # 3.4 million combinations) stays far from it.
    rng = np.random.default_rng(1)
    genomes = [tuple(pool[i] for i in rng.integers(len(pool), size=3)) for _ in range(found.evaluations)]
    random_best = float(obj(genomes).min())
    assert found.evaluations < 0.002 * len(pool) ** 3
    assert random_best > 0.1 * found.random_loss > 0


def test_banned_tokens_never_appear_and_merged_words_are_rejected(tok, world):
    lex = LEXICONS[("colour", "red")]
    banned = A.banned_words(world)
    assert set(banned) == {lex.word, *lex.synonyms, *lex.misspellings}
    assert not {w for w, _ in lex.indirect} & set(banned)
    ids = A.banned_token_ids(tok, banned)
    vocab = tok.get_vocab()
    for t in ("red</w>", "red", "redd", "crimson</w>", "scarlet</w>", "cherry</w>", "ruby</w>", "bird</w>",
              "tired</w>", "<|startoftext|>", "<|endoftext|>"):
        assert vocab[t] in ids, t
    for t in ("tomato</w>", "blood</w>", "blue</w>", "re", "d</w>", "car", "mine</w>"):
        assert vocab[t] not in ids, t
    # Every token whose text holds a banned word is out, whatever its case or end mark.
    texts = {i: A.token_text(t).strip().lower() for t, i in vocab.items()}
    assert {i for i, s in texts.items() if any(w in s for w in banned)} <= ids
    # BPE pieces that are allowed alone can spell a banned word together: rejected.
    target = torch.zeros(77, 8)
    obj = A.SlotObjective(TinyEncoder(tok), tok, target, prefix=PREFIX, suffix=SUFFIX, banned=banned)
    for pieces in (["re", "d</w>"], ["car", "mine</w>"], ["r", "ed</w>"]):
        genome = [vocab[p] for p in pieces]
        assert A.contains_banned(A.decode_tokens(tok, genome), banned)
        assert obj([genome])[0] == np.inf
    assert np.isfinite(obj([[vocab["tomato</w>"]]])[0])
    with pytest.raises(ValueError, match="banned word"):
        A.SlotObjective(TinyEncoder(tok), tok, target, prefix="one red", suffix="", banned=banned)
    # A whole attack: no pool token is banned and no prompt holds a banned word, even when the
    # pool offers pieces that merge into one.
    config = A.AttackConfig(tokens=2, population=16, generations=3, pool_size=40, n_pairs=8, seed=3)
    pool = A.candidate_pool(tok, world, config)
    assert not set(pool) & ids
    with pytest.raises(ValueError, match="banned token"):
        A.attack_prompts(TinyEncoder(tok), tok, world, 1, config, pool=[*pool, vocab["red</w>"]])
    merging = [*pool, vocab["re"], vocab["d</w>"]]
    report = A.attack_prompts(TinyEncoder(tok), tok, world, 3, config, pool=merging)
    assert report.all_clean
    for r in report.results:
        assert A.contains_banned(r.prompt, banned) is None and r.banned_hit is None
        assert not set(r.tokens) & ids
        assert r.attributes["colour"] == "red" and r.twin_attributes["colour"] != "red"
        assert world.is_heldout(r.twin_attributes)
        assert np.isfinite(r.loss) and r.loss <= r.random_loss


def test_the_attack_is_deterministic_for_a_seed(tok, world):
    config = A.AttackConfig(tokens=2, population=12, generations=3, pool_size=30, n_pairs=8, seed=5)
    runs = [A.attack_prompts(TinyEncoder(tok), tok, world, 3, config) for _ in range(2)]
    other = A.attack_prompts(TinyEncoder(tok), tok, world, 3,
                             A.AttackConfig(**{**config.__dict__, "seed": 6}))
    a, b = ([(r.prompt, r.tokens, r.loss, r.seed) for r in run.results] for run in runs)
    assert a == b
    assert a != [(r.prompt, r.tokens, r.loss, r.seed) for r in other.results]
    seen = []
    A.attack_prompts(TinyEncoder(tok), tok, world, 2, config, progress=lambda d, n, r: seen.append((d, n)))
    assert seen == [(1, 2), (2, 2)]
    d = runs[0].to_dict()
    assert d["all_clean"] and len(d["results"]) == 3 and d["config"]["seed"] == 5
    assert runs[0].to_markdown([True, False, True]).endswith("attack success: 0.667 (2/3)")
    assert runs[0].to_markdown(np.array([True, False, True])) == runs[0].to_markdown([1, 0, 1])
    with pytest.raises(ValueError, match="2 concept flags for 3"):
        runs[0].to_markdown([True, False])


def test_concept_direction_matches_a_float64_hand_computation(tok, world):
    enc = TinyEncoder(tok, dim=16, seed=2)
    with_c, without_c = A.concept_pairs(world, 10)
    assert all(" red " in w and " red " not in wo for w, wo in zip(with_c, without_c))
    got = A.concept_direction(enc, with_c, without_c, batch_size=3)
    a = enc(with_c).double().numpy()
    b = enc(without_c).double().numpy()
    want = sum(a[i] - b[i] for i in range(len(a))) / len(a)
    assert got.shape == (77, 16) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="pair up"):
        A.concept_direction(enc, with_c, without_c[:-1])
    with pytest.raises(ValueError, match="at least one"):
        A.concept_direction(enc, [], [])


@pytest.mark.parametrize(("field", "value", "message"), [
    ("tokens", 0, "tokens"), ("tokens", 76, "tokens"), ("tokens", 2.5, "tokens"),
    ("population", 1, "population"),
    ("elite", 64, "elite"), ("tournament", 65, "tournament"), ("mutation_rate", 1.5, "mutation_rate"),
    ("eta", float("nan"), "eta"), ("fitness", "l1", "fitness"), ("align", "left", "align"),
    ("method", "annealing", "method"), ("pool_size", -1, "pool_size"), ("seed", True, "seed"),
    ("generations", -1, "generations"), ("n_pairs", 0, "n_pairs"), ("batch_size", 0, "batch_size"),
])
def test_config_validation_names_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        A.AttackConfig(**{field: value})


def test_config_validation_refuses_an_empty_pool_and_attack_success_counts_flags():
    with pytest.raises(ValueError, match="pool is empty"):
        A.AttackConfig(world_tokens=False, pool_size=0)
    assert A.attack_success([True, False, 1, 0]) == 0.5
    assert A.attack_success(np.array([True, True])) == 1.0
    with pytest.raises(ValueError, match="at least one"):
        A.attack_success([])


def test_control_prompts_describe_the_attack_scenes_without_a_search(tok, world):
    config = A.AttackConfig(tokens=2, population=8, generations=1, pool_size=20, n_pairs=4, seed=1)
    report = A.attack_prompts(TinyEncoder(tok), tok, world, 4, config)
    twin = A.control_prompts(tok, world, 4, config, kind="twin")
    assert twin == [r.twin_caption for r in report.results]
    banned = A.banned_words(world)
    for kind in ("empty", "random", "direct"):
        prompts = A.control_prompts(tok, world, 4, config, kind=kind)
        assert prompts == A.control_prompts(tok, world, 4, config, kind=kind)
        for p, r in zip(prompts, report.results):
            prefix, suffix = A.split_caption(r.twin_caption, r.twin_attributes["colour"])
            assert p.startswith(prefix) and p.endswith(suffix)
            assert (A.contains_banned(p, banned) is not None) == (kind == "direct")
    empty = A.control_prompts(tok, world, 4, config, kind="empty")
    assert all(r.twin_attributes["colour"] not in e.split() for e, r in zip(empty, report.results))
    with pytest.raises(ValueError, match="kind"):
        A.control_prompts(tok, world, 4, config, kind="nothing")


def test_slot_alignment_leaves_out_the_extra_slot_positions(tok, world):
    # Without positions or mixing each output row is its token's row: "tomato fire" in the slot
    # matches a target with "fire" there once the extra slot position is left out.
    enc = TinyEncoder(tok, positions=0.0, mix=0.0)
    target = enc([f"{PREFIX} fire {SUFFIX}"])[0]
    vocab = tok.get_vocab()
    genome = [vocab["tomato</w>"], vocab["fire</w>"]]
    for align, zero in (("slot", True), ("full", False)):
        obj = A.SlotObjective(enc, tok, target, prefix=PREFIX, suffix=SUFFIX, align=align)
        assert (obj([genome])[0] == pytest.approx(0.0, abs=1e-12)) == zero
        assert obj.loss_of_text("fire") == pytest.approx(0.0, abs=1e-12)
    cos = A.SlotObjective(enc, tok, 3 * target, prefix=PREFIX, suffix=SUFFIX, fitness="cosine")
    assert cos([genome])[0] == pytest.approx(0.0, abs=1e-6)


def test_an_attack_whose_every_candidate_is_rejected_is_an_error(tok, world, monkeypatch):
    # Past the pool check (switched off here), the prompt check still rejects every candidate.
    monkeypatch.setattr(A, "banned_token_ids", lambda tokenizer, banned: frozenset())
    vocab = tok.get_vocab()
    config = A.AttackConfig(tokens=2, population=4, elite=1, generations=1, pool_size=0, n_pairs=2)
    with pytest.raises(ValueError, match="rejected"):
        A.attack_prompts(TinyEncoder(tok), tok, world, 1, config, pool=[vocab["red</w>"], vocab["ruby</w>"]])
