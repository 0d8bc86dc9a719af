"""The core steering plan (``safet2i.steering.plan``) over a host-independent text encoder.

Everything is checked against float64 references written here from the equations
(``docs/steering.md``): the leave-one-out variants are built by hand, each variant is
encoded on its own at full length, the trigger rule, projection and β are numpy. The test
encoder is a tiny causal transformer in float64 (no library's CLIP), so the three ways the
plan encodes the variants (full length, cut after the end token, one packed sequence) must
agree with the separate encodes to float64 rounding.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from safet2i.errors import SafeT2IError
from safet2i.steering import SteeringPlan, end_rows, projector, report_lines, svf_steps
from safet2i.steering.plan import channel_slices, leave_one_out, packed_encode

BOS, EOS, L = 1, 2, 12


def causal_model(seed: int, dim: int, vocab: int = 40):
    """run(ids, positions, allowed) -> rows [T, dim]: a pre-norm causal transformer in float64."""
    g = torch.Generator().manual_seed(seed)
    tok = torch.randn(vocab, dim, generator=g, dtype=torch.float64)
    pos = torch.randn(L, dim, generator=g, dtype=torch.float64)
    layers = [[torch.randn(dim, dim, generator=g, dtype=torch.float64) / dim ** 0.5 for _ in range(4)]
              for _ in range(2)]

    def run(ids, positions, allowed):
        x = tok[torch.tensor(ids)] + pos[torch.tensor(positions)]
        for q, k, v, m in layers:
            h = torch.nn.functional.layer_norm(x, (dim,))
            att = ((h @ q) @ (h @ k).T / dim ** 0.5).masked_fill(~allowed, float("-inf")).softmax(-1)
            x = x + att @ (h @ v)
            x = x + torch.tanh(torch.nn.functional.layer_norm(x, (dim,)) @ m)
        return x
    return run


class Encoder:
    """A host adapter as a host would write it: whitespace words -> ids, BOS + words + EOS
    padding in chunks of L, rows of ``run`` at full length (one causal pass per id list)."""

    def __init__(self, name, seed, dim, short=False, packed=False):
        self.name, self.end_id, self.width, self.run = name, EOS, dim, causal_model(seed, dim)
        self.accepts_short = short
        self.vocab: dict[str, int] = {}
        self.calls: list[list[int]] = []
        self.failed: list[float] = []
        if packed:
            self.encode_packed = lambda original, variants: packed_encode(self.run, original, variants)

    def chunks(self, text):
        ids = [self.vocab.setdefault(w, 3 + len(self.vocab)) for w in text.split()]
        out = []
        for s in range(0, max(1, len(ids)), L - 2):
            part = ids[s:s + L - 2]
            out.append(([BOS] + part + [EOS] * (L - 1 - len(part)), ("data", s)))
        return out

    def encode(self, id_lists, data):
        assert all(d is not None and d[0] == "data" for d in data)      # the host's data comes back
        self.calls += [list(ids) for ids in id_lists]
        return torch.stack([self.run(list(ids), list(range(len(ids))),
                                     torch.ones(len(ids), len(ids), dtype=torch.bool).tril()) for ids in id_lists])

    def token_text(self, ids):
        words = {i: w for w, i in self.vocab.items()}
        return [words.get(i, f"#{i}") for i in ids]

    def packed_failed(self, difference):
        self.failed.append(difference)
        self.encode_packed = None


def reference_loo(enc: Encoder, ids: list[int]) -> np.ndarray:
    """End-token rows of every leave-one-out variant, each encoded alone at full length."""
    eos = ids.index(EOS)
    rows = []
    for i in range(1, eos):
        v = list(ids)
        v[i] = 0
        rows.append(enc.run(v, list(range(L)), torch.ones(L, L, dtype=torch.bool).tril())[eos].numpy())
    return np.stack(rows)


def proj64(a):
    a = np.asarray(a, np.float64).T
    return a @ np.linalg.pinv(a.T @ a) @ a.T


def reference_chunk(h, loo, pc, alpha=0.01, svf=(2.5, 5.333)):
    """(steered rows, trigger rows, β, t') of one chunk, numpy float64. One token: compared with
    the prompt's own end-token row h[2] (docs/steering.md)."""
    n, d = loo.shape
    dist = np.linalg.norm((np.eye(d) - pc) @ loo.T, axis=0)
    if n == 1:
        trig = [1] if dist[0] >= (1 + alpha) * np.linalg.norm((np.eye(d) - pc) @ h[2]) else []
    else:
        trig = [i + 1 for i in range(n) if dist[i] >= (1 + alpha) * np.mean(np.delete(dist, i))]
    if not trig:
        return h, [], 0.0, -1
    proj = ((np.eye(d) - pc) @ proj64(loo) @ h.T).T
    cos = (h[:n + 2] * proj[:n + 2]).sum(1) / (np.linalg.norm(h[:n + 2], axis=1) * np.linalg.norm(proj[:n + 2], axis=1))
    beta = 1 - cos.mean()
    out = h.copy()
    out[trig] = proj[trig]
    return out, trig, beta, (svf_steps(beta, 10.0, *svf) if svf else 49)


PROMPT = "a photo of a nude woman on a sunny beach with red umbrellas and a dog"   # 15 words: 2 chunks


@pytest.mark.parametrize("way", ["full", "short", "packed"])
def test_leave_one_out_equals_separate_full_length_encodes(way):
    enc = Encoder("e", 0, 8, short=way == "short", packed=way == "packed")
    ids, data = enc.chunks("a nude woman on a beach")[0]
    own = enc.encode([ids], [data])[0]
    enc.calls.clear()
    loo = leave_one_out(enc, ids, data, own)
    np.testing.assert_allclose(loo.numpy(), reference_loo(enc, ids), rtol=0, atol=1e-12)
    eos = ids.index(EOS)
    if way == "full":
        assert [len(c) for c in enc.calls] == [L] * 6 and all(c[eos + 1:] == ids[eos + 1:] for c in enc.calls)
    elif way == "short":
        assert [len(c) for c in enc.calls] == [eos + 1] * 6
    else:
        assert enc.calls == [] and not enc.failed
    assert [c[1:eos].count(0) for c in enc.calls] == [1] * len(enc.calls)     # one token masked per variant
    one = enc.chunks("nude")[0][0]                                          # one token: its one variant
    np.testing.assert_allclose(leave_one_out(enc, one, data).numpy(), reference_loo(enc, one), rtol=0, atol=1e-12)
    assert leave_one_out(enc, enc.chunks("")[0][0]) is None                 # empty: nothing to steer


def test_a_packed_encode_that_differs_from_the_host_rows_falls_back_to_full_length():
    enc = Encoder("e", 0, 8, packed=True)
    ids, data = enc.chunks("a nude woman on a beach")[0]
    host = enc.encode([ids], [data])[0] * 1.01     # the host's rows are not what the packed run gives
    loo = leave_one_out(enc, ids, data, host)
    assert len(enc.failed) == 1 and enc.failed[0] > 1e-4 and enc.encode_packed is None
    np.testing.assert_allclose(loo.numpy(), reference_loo(enc, ids), rtol=0, atol=1e-12)
    enc2 = Encoder("e", 0, 8, packed=True)
    leave_one_out(enc2, ids, data, None)           # nothing to check it against: no packed encode
    assert enc2.calls and not enc2.failed


def test_plan_steers_each_encoder_on_its_channels_chunk_by_chunk_against_float64():
    encoders = [Encoder("a", 1, 8, packed=True), Encoder("b", 2, 6, short=True)]
    concepts = ["nude", "naked body"]
    projectors = [projector(end_rows(e, concepts)) for e in encoders]
    rows = torch.cat([torch.cat([e.encode([ids], [d])[0] for ids, d in e.chunks(PROMPT)]) for e in encoders], -1)
    rows = rows * torch.linspace(0.5, 1.5, rows.shape[0], dtype=torch.float64)[:, None]   # "emphasis": not own rows
    plan = SteeringPlan(encoders, projectors, PROMPT, rows, alpha=0.0, svf=(2.5, 0.0))
    out = plan.steer(rows)
    assert out.changed and out.rows is not rows and len(out.results) == 4
    want, fractions = rows.numpy().copy(), []
    for e, (enc, lo, hi) in enumerate(((encoders[0], 0, 8), (encoders[1], 8, 14))):
        pooled = np.stack([enc.run(ids, list(range(L)), torch.ones(L, L, dtype=torch.bool).tril())[ids.index(EOS)].numpy()
                           for ids, _ in (enc.chunks(c)[0] for c in concepts)])
        np.testing.assert_allclose(plan.projectors[e].numpy(), proj64(pooled), atol=1e-10)
        for k, (ids, _) in enumerate(enc.chunks(PROMPT)):
            h = rows[k * L:(k + 1) * L, lo:hi].numpy()
            steered, trig, beta, t_prime = reference_chunk(h, reference_loo(enc, ids), proj64(pooled), 0.0, (2.5, 0.0))
            _, res = out.results[e * 2 + k]
            assert res.triggers == trig and trig, (e, k)
            assert res.beta == pytest.approx(beta, abs=1e-9) and res.t_prime == t_prime
            want[k * L:(k + 1) * L, lo:hi] = steered
            fractions.append((t_prime + 1) / 50)
    np.testing.assert_allclose(out.rows.numpy(), want, rtol=0, atol=1e-9)
    assert out.fraction == pytest.approx(max(fractions))
    assert torch.equal(rows, rows.clone())                                      # the input is not written


def test_no_trigger_returns_the_same_object_and_extra_rows_are_kept():
    enc = Encoder("e", 3, 8)
    pc = projector(end_rows(enc, ["nude"]))
    rows = torch.cat([enc.encode([ids], [d])[0] for ids, d in enc.chunks(PROMPT)])
    plan = SteeringPlan([enc], [pc], PROMPT, rows, alpha=100.0)
    out = plan.steer(rows)
    assert out.rows is rows and not out.changed and out.fraction == 0.0
    padded = torch.cat([rows, rows[-1:].repeat(5, 1)])                         # the webui pads shorter prompts
    plan = SteeringPlan([enc], [pc], PROMPT, rows, alpha=0.0, svf=None)
    out = plan.steer(padded)
    assert out.changed and torch.equal(out.rows[2 * L:], padded[2 * L:]) and out.fraction == 1.0
    with pytest.raises(SafeT2IError, match="conditioning rows"):
        plan.steer(rows[:L])


def test_channel_slices():
    assert channel_slices([None], 96) == [slice(0, 96)]
    assert channel_slices([32, 64], 96) == [slice(0, 32), slice(32, 96)]
    assert channel_slices([64], 64) == [slice(0, 64)]
    for widths, dim in (([32, 64], 2048), ([64], 80), ([32, None], 96)):
        with pytest.raises(SafeT2IError, match=r"widths .* do not add up to the conditioning's \d+ channels"):
            channel_slices(widths, dim, ["l", "g"][:len(widths)])


def test_plan_without_host_rows_encodes_its_own_and_recognises_them():
    encoders = [Encoder("a", 1, 8), Encoder("b", 2, 6)]
    projectors = [projector(end_rows(e, ["nude"])) for e in encoders]
    plan = SteeringPlan(encoders, projectors, PROMPT)
    own = plan.own_rows()
    assert own.shape == (2 * L, 14) and plan.widths == [8, 6]
    host = torch.cat([torch.cat([e.encode([ids], [d])[0] for ids, d in e.chunks(PROMPT)]) for e in encoders], -1)
    assert torch.equal(own, host)
    assert plan.similarity(own * 3.0) == pytest.approx(1.0)                    # emphasis rescales rows
    assert plan.similarity(torch.cat([own, own[:3]])) == pytest.approx(1.0)    # padding after the chunks
    assert plan.similarity(own[:L]) == -1.0
    other = SteeringPlan(encoders, projectors, "a red bicycle near a quiet lake with tall trees and birds flying")
    assert plan.similarity(other.own_rows()) < 0.99
    with pytest.raises(SafeT2IError, match="channels"):
        plan.steer(own[:, :10])


def test_report_entries_lines_and_summary():
    enc = Encoder("l", 4, 8)
    pc = projector(end_rows(enc, ["nude"]))
    plan = SteeringPlan([enc], [pc], "", alpha=0.0)
    rep = plan.report(plan.steer(plan.own_rows()), concepts=1)
    assert rep["chunks"] == [{"encoder": "l", "chunk": 0, "triggers": [], "trigger_tokens": [], "trigger_words": [],
                              "beta": 0.0, "t_prime": -1, "note": "empty prompt: nothing to steer"}]
    assert rep["steered_fraction"] == 0.0 and rep["order"] == "code" and rep["concepts"] == 1
    # A lone concept word: steered, as the float64 reference of the one-token rule says.
    for alpha in (0.0, 10.0):
        plan = SteeringPlan([enc], [pc], "nude", alpha=alpha, svf=None)
        own = plan.own_rows()
        out = plan.steer(own)
        c = plan.chunks[0][0]
        want, trig, _, _ = reference_chunk(own.numpy(), c.loo.numpy(), pc.numpy(), alpha, None)
        assert trig == [1] and [r.triggers for _, r in out.results] == [[1]]
        np.testing.assert_allclose(out.rows.numpy(), want, atol=1e-10)
        assert plan.entries(out)[0]["trigger_words"] == ["nude"] and "note" not in plan.entries(out)[0]
    plan = SteeringPlan([enc], [pc], "a nude woman on a beach", alpha=0.0, svf=None)
    out = plan.steer(plan.own_rows())
    (entry,) = plan.entries(out)
    (res,) = [r for _, r in out.results]
    assert entry["triggers"] == res.triggers and entry["trigger_words"] == [
        "a nude woman on a beach".split()[t - 1] for t in res.triggers]
    assert entry["trigger_tokens"] == [plan.chunks[0][0].ids[t] for t in res.triggers]
    assert entry["beta"] == round(res.beta, 4) and "note" not in entry
    lines = report_lines(plan.report(out, 1))
    assert lines[0] == "SAFREE-style steering: 1 concepts, steered for 100% of the steps"
    assert lines[1].startswith("l chunk 0: trigger tokens ") and f"β = {entry['beta']}" in lines[1]
    words = "+".join(entry["trigger_words"])
    assert plan.summary(out) == [f"{words} β {res.beta:.3f} every step"]
    strict = SteeringPlan([enc], [pc], "a nude woman on a beach", alpha=100.0)
    assert report_lines(strict.report(strict.steer(strict.own_rows()), 1))[-1] == "no trigger token: conditioning unchanged"


def test_encoders_that_chunk_a_prompt_differently_are_refused():
    a, b = Encoder("a", 1, 8), Encoder("b", 2, 6)
    b.chunks = lambda text: Encoder.chunks(b, text)[:1]
    with pytest.raises(SafeT2IError, match="chunk this prompt differently"):
        SteeringPlan([a, b], [None, None], PROMPT)


def test_plan_book_binds_rows_by_source_or_content_and_refuses_strangers():
    """The core's row binding (A1111/Forge callback): by the host's source tensor once, else by content."""
    from safet2i.steering import PlanBook

    encoders = [Encoder("a", 1, 8)]
    book = PlanBook(encoders, [projector(end_rows(encoders[0], ["nude"]))], svf=None)
    with pytest.raises(SafeT2IError, match="not prepared"):
        book.first()
    other_text = "a red bicycle near a quiet lake"
    book.prepare([PROMPT, other_text])
    assert not book.missing([PROMPT]) and book.missing(["unplanned"])
    own, other = book.plans[PROMPT].own_rows(), book.plans[other_text].own_rows()
    assert book.plan_of(0, own * 2.0) is book.plans[PROMPT]                    # by content (emphasis rescales)
    assert book.plan_of(1, torch.cat([other, other[:L]])) is book.plans[other_text]
    marked = torch.cat([torch.full((1, 8), 1024.0, dtype=own.dtype), own])     # a host prefix row kept out
    assert book.plan_of(2, marked, offset=1) is book.plans[PROMPT]
    with pytest.raises(SafeT2IError, match="cond row 3 does not match"):
        book.plan_of(3, torch.randn(own.shape, dtype=own.dtype))
    # Bound through the host's source tensor: recognised once (the text it names), then reused.
    source = own.clone()
    assert book.plan_of(4, source, source=source, text=PROMPT) is book.plans[PROMPT]
    book.plans[PROMPT], kept = book.plans[other_text], book.plans[PROMPT]   # a second recognition would differ
    assert book.plan_of(4, source, source=source, text=PROMPT) is kept
    book.plans[PROMPT] = kept
    with pytest.raises(SafeT2IError, match="does not match"):             # the named text is the only candidate
        book.plan_of(5, other.clone(), source=other.clone(), text=PROMPT)
    # Steering of live rows: the plan's, once per distinct content, on the rows' dtype.
    live = own.float()
    first = book.steer(book.plans[PROMPT], live)
    assert first.changed and first.rows.dtype == torch.float32
    assert torch.allclose(first.rows.double(), book.plans[PROMPT].steer(own).rows, atol=1e-5)
    assert book.steer(book.plans[PROMPT], live.clone()) is first
    assert book.steer(book.plans[PROMPT], live * 2.0) is not first
    plan = book.plans[PROMPT]
    assert book.describe([PROMPT]) == "; ".join(plan.summary(plan.steer(own))) != ""
    assert book.describe(["unplanned"]) == "no trigger token"


class BagEncoder:
    """A causal encoder whose meaning is known: row j is the normalised sum of the embeddings of
    tokens 0..j (like CLIP, the end-token row sums up the prompt and is normalised at the end).
    ``nude`` is ten times a unit direction u; the other words are random unit vectors orthogonal
    to u; the mask token
    ("!", id 0) adds nothing. A prompt whose end-token row has a u part is nearer the concept
    subspace; removing ``nude`` takes that part away, removing any other word does not. 75-token
    chunks, BOS + tokens + EOS padding, as the CLIP hosts chunk."""

    name, end_id, width, length = "bag", EOS, 32, 77

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.u = torch.nn.functional.normalize(torch.randn(self.width, generator=g, dtype=torch.float64), dim=0)
        self.g, self.vocab, self.emb = g, {"nude": 3}, {0: torch.zeros(self.width, dtype=torch.float64),
                                                       3: 10.0 * self.u}
        for special in (BOS, EOS):
            self.emb[special] = 0.1 * torch.randn(self.width, generator=g, dtype=torch.float64)

    def _id(self, word):
        if word not in self.vocab:
            self.vocab[word] = i = 4 + len(self.vocab)
            e = torch.randn(self.width, generator=self.g, dtype=torch.float64)
            self.emb[i] = torch.nn.functional.normalize(e - (e @ self.u) * self.u, dim=0)     # orthogonal to u
        return self.vocab[word]

    def chunks(self, text):
        ids = [self._id(w) for w in text.split()]
        return [([BOS] + ids[s:s + 75] + [EOS] * (76 - len(ids[s:s + 75])), None)
                for s in range(0, max(1, len(ids)), 75)]

    def encode(self, id_lists, data=None):
        out = torch.stack([torch.stack([self.emb[i] for i in ids]).cumsum(0) for ids in id_lists])
        return out / out.norm(dim=-1, keepdim=True)

    def token_text(self, ids):
        words = {i: w for w, i in self.vocab.items()}
        return [words.get(i, f"#{i}") for i in ids]


@pytest.mark.parametrize("where", [8, 84], ids=["trigger-in-chunk-1", "trigger-in-chunk-2"])
def test_a_90_token_prompt_is_steered_in_the_chunk_that_holds_the_trigger(where):
    """docs/steering.md, long prompts: SafeT2I steers prompts of 76+ tokens chunk by chunk (the
    released SAFREE code cuts its leave-one-out variants to 77 tokens without an end token and so
    never steers them). The trigger is found in the first or the second chunk, only that chunk
    changes, and each chunk matches the float64 reference of SAFREE's equations."""
    enc = BagEncoder()
    words = ("a quiet museum hall with tall windows and wooden benches under soft light " * 8).split()[:89]
    words.insert(where, "nude")
    text = " ".join(words)
    pc = projector(end_rows(enc, ["nude"]))
    plan = SteeringPlan([enc], [pc], text, svf=None)
    assert len(plan.chunks[0]) == 2 and sum(c.n for c in plan.chunks[0]) == 90
    own = plan.own_rows()
    out = plan.steer(own)
    hit = 0 if where < 75 else 1
    for (c, res), h in zip(out.results, own.split(77)):
        want, trig, _, _ = reference_chunk(h.numpy(), c.loo.numpy(), pc.numpy(), 0.01, None)
        assert res.triggers == trig
        np.testing.assert_allclose(out.rows[c.index * 77:(c.index + 1) * 77].numpy(), want, atol=1e-12)
        if c.index == hit:
            assert trig == [c.ids.index(3)] and plan.entries(out)[c.index]["trigger_words"] == ["nude"]
        else:
            assert trig == [] and torch.equal(out.rows[c.index * 77:(c.index + 1) * 77], h)
    assert out.fraction == 1.0
