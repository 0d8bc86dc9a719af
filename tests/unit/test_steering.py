"""SAFREE-style steering: every equation against float64 references on hand-built matrices,
then end to end with a tiny random CLIP text model and the real CLIP BPE tokenizer."""

from __future__ import annotations

import gzip
import json
import math
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
import torch

from safet2i.steering import load_concepts, project_rows, projector, steer_chunk, steer_sequence, svf_steps, trigger_tokens
from safet2i.steering.safree import concept_projector


def proj64(a):  # rows of a span the subspace
    A = np.asarray(a, np.float64).T
    return A @ np.linalg.pinv(A.T @ A) @ A.T


def test_projector_matches_pinv_formula_and_is_a_projector():
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(3, 8))
    vecs[2] = vecs[0] + vecs[1]  # rank-deficient: pinv, not inv
    p = projector(torch.tensor(vecs)).numpy()
    np.testing.assert_allclose(p, proj64(vecs), atol=1e-10)
    np.testing.assert_allclose(p @ p, p, atol=1e-10)
    np.testing.assert_allclose(p, p.T, atol=1e-12)
    assert round(np.trace(p)) == 2


@pytest.mark.parametrize("spread", [1e-3, 3e-4])
def test_projection_of_an_ill_conditioned_concept_matrix_stays_float64_accurate(spread):
    """Concept vectors nearly alike (as SAFREE's 17 "sexual …" concepts are) make CᵀC ill-conditioned.
    The float64 projector stays within 1e-4 of the exact projector onto their span (an orthonormal
    basis from a float64 QR, an algorithm that never forms CᵀC); the same formula in float32, as the
    released code computes it, is far off: a regression to float32 fails this test."""
    rng = np.random.default_rng(7)
    base = rng.normal(size=64)
    vecs = torch.tensor(base + spread * rng.normal(size=(6, 64)), dtype=torch.float32)   # float32, as hosts give them
    exact = np.linalg.qr(vecs.double().numpy().T)[0]
    exact = exact @ exact.T
    ours = projector(vecs)
    assert ours.dtype == torch.float64
    assert np.abs(ours.numpy() - exact).max() < 1e-4
    a = vecs.T                                                                            # the formula in float32
    float32 = (a @ torch.linalg.pinv(a.T @ a) @ a.T).double().numpy()
    assert np.abs(float32 - exact).max() > 1e-2, "the case is not ill-conditioned enough to catch float32"
    # The steering built on it: rows projected with the exact projector agree too.
    rows, pooled = torch.randn(8, 64, generator=torch.Generator().manual_seed(1)), torch.randn(3, 64).double()
    p_m = projector(pooled)
    got = project_rows(rows, ours, p_m).numpy()
    want = ((np.eye(64) - exact) @ p_m.numpy() @ rows.double().numpy().T).T
    assert np.abs(got - want).max() < 1e-4 * max(1.0, np.abs(want).max())


def test_trigger_rule_matches_reference():
    rng = np.random.default_rng(1)
    concept = rng.normal(size=(2, 6))
    pc = proj64(concept)
    loo = rng.normal(size=(5, 6))
    loo[3] = 3.0 * loo[3] - 2.0 * (pc @ loo[3])  # removing token 3 moves the prompt away from C
    dist = np.linalg.norm((np.eye(6) - pc) @ loo.T, axis=0)
    want = [i for i in range(5) if dist[i] >= 1.01 * np.mean(np.delete(dist, i))]
    got = trigger_tokens(torch.tensor(loo), torch.tensor(pc), alpha=0.01)
    assert got == want and 3 in got
    assert trigger_tokens(torch.tensor(loo[:1]), torch.tensor(pc)) == []  # one token: no trigger


@pytest.mark.parametrize("order", ["code", "paper"])
def test_projection_orders(order):
    rng = np.random.default_rng(2)
    pc, pm = proj64(rng.normal(size=(2, 6))), proj64(rng.normal(size=(3, 6)))
    h = rng.normal(size=(4, 6))
    want = ((np.eye(6) - pc) @ pm @ h.T).T if order == "code" else (pm @ (np.eye(6) - pc) @ h.T).T
    np.testing.assert_allclose(project_rows(torch.tensor(h), torch.tensor(pc), torch.tensor(pm), order).numpy(), want, atol=1e-12)
    assert not np.allclose(((np.eye(6) - pc) @ pm @ h.T), (pm @ (np.eye(6) - pc) @ h.T))  # they differ


def test_svf_rule():
    for beta in np.linspace(0, 1, 41):
        assert svf_steps(beta) == round(10 / (1 + math.exp(-5.0 * (10 * beta - 5.333))))
    assert svf_steps(0.40) == 0 and svf_steps(0.65) == 10
    assert svf_steps(0.6, k=3.5, t0=5.5) == round(10 / (1 + math.exp(-7.0 * 0.5)))


def test_steer_chunk_replaces_trigger_rows_only():
    rng = np.random.default_rng(3)
    d, n = 6, 4
    concept = rng.normal(size=(2, d))
    pc = proj64(concept)
    loo = rng.normal(size=(n, d))
    loo[1] = 4.0 * loo[1] - 3.0 * (pc @ loo[1])
    rows = torch.tensor(rng.normal(size=(10, d)), dtype=torch.float32)
    res = steer_chunk(rows, torch.tensor(loo), torch.tensor(pc), n)
    trig = trigger_tokens(torch.tensor(loo), torch.tensor(pc))
    assert res.changed and res.triggers == [i + 1 for i in trig]
    pm = proj64(loo)
    full = ((np.eye(d) - pc) @ pm @ rows.numpy().astype(np.float64).T).T
    for j in range(10):
        if j in res.triggers:
            np.testing.assert_allclose(res.rows[j].numpy(), full[j], atol=1e-5)
        else:
            assert torch.equal(res.rows[j], rows[j])
    h = rows.numpy().astype(np.float64)[: n + 2]
    cos = (h * full[: n + 2]).sum(1) / (np.linalg.norm(h, axis=1) * np.linalg.norm(full[: n + 2], axis=1))
    assert res.beta == pytest.approx(1 - cos.mean(), abs=1e-9)
    assert res.t_prime == svf_steps(res.beta) and res.fraction == pytest.approx((res.t_prime + 1) / 50)
    assert torch.equal(rows, torch.tensor(rows.numpy()))  # input untouched


def test_no_trigger_returns_the_same_tensor():
    rows = torch.randn(8, 4)
    res = steer_chunk(rows, torch.ones(3, 4), projector(torch.randn(1, 4)), 3)  # identical LOO: no trigger
    assert res.rows is rows and not res.changed and res.fraction == 0.0


def test_concept_presets():
    concepts, svf = load_concepts("nudity")
    assert len(concepts) == 17 and concepts[2] == "Nudity" and svf == "nudity"
    assert load_concepts("custom", "nude, naked\nporn")[0] == ["nude", "naked", "porn"]


# --------------------------------------------------------------------------- tiny CLIP, real BPE

def clip_bpe_tokenizer(folder: Path):
    """The real CLIP BPE vocabulary (49408 tokens) from open_clip's shipped merges file."""
    from transformers import CLIPTokenizer
    from tiny_diffusers import _bytes_to_unicode

    spec = find_spec("open_clip")
    if spec is None:
        pytest.skip("open-clip-torch (for its CLIP BPE file) is not installed")
    bpe = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    chars = _bytes_to_unicode()
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    pytest.importorskip("transformers")
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = clip_bpe_tokenizer(tmp_path_factory.mktemp("bpe"))
    assert len(tok) == 49408 and tok("nudity").input_ids[1:-1] == tok.convert_tokens_to_ids(["nu", "dity</w>"])
    torch.manual_seed(0)
    model = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=64, intermediate_size=128,
                                         num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=77,
                                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                         pad_token_id=tok.eos_token_id)).eval()
    return tok, model


def encoder(tok, model):
    def ids_of(text):
        return tok(text, padding="max_length", max_length=77, truncation=True).input_ids

    @torch.no_grad()
    def encode_rows(id_lists):
        return model(torch.tensor(id_lists)).last_hidden_state

    def encode_pooled(texts):
        ids = [ids_of(t) for t in texts]
        rows = encode_rows(ids)
        return torch.stack([rows[i, ids[i].index(tok.eos_token_id)] for i in range(len(ids))])

    return ids_of, encode_rows, encode_pooled


def test_concept_word_is_flagged_and_benign_prompt_is_bit_identical(tiny_clip):
    tok, model = tiny_clip
    ids_of, encode_rows, encode_pooled = encoder(tok, model)
    pc = concept_projector(("tiny", id(model)), ["nude"], encode_pooled)
    assert concept_projector(("tiny", id(model)), ["nude"], lambda c: 1 / 0) is pc  # cached

    prompt = "a photo of a nude woman on a sunny beach"
    ids = ids_of(prompt)
    rows = encode_rows([ids])[0]
    (res,) = steer_sequence([ids], rows, encode_rows, pc, tok.eos_token_id)
    nudity_pos = ids.index(tok.convert_tokens_to_ids("nude</w>"))
    assert nudity_pos in res.triggers
    assert not torch.equal(res.rows[nudity_pos], rows[nudity_pos])
    untouched = [j for j in range(77) if j not in res.triggers]
    assert torch.equal(res.rows[untouched], rows[untouched])

    benign_ids = ids_of("a red bicycle")
    benign_rows = encode_rows([benign_ids])[0]
    pc_far = concept_projector(("tiny", id(model)), ["pornography", "nudity", "sexual acts"], encode_pooled)
    # No trigger (here: a strict α) -> the rows come back exactly as they were.
    (benign,) = steer_sequence([benign_ids], benign_rows, encode_rows, pc_far, tok.eos_token_id, alpha=10.0)
    assert not benign.changed and benign.triggers == [] and torch.equal(benign.rows, benign_rows)
    e_ids = ids_of("")  # the empty prompt: nothing to steer, unchanged
    e_rows = encode_rows([e_ids])[0]
    (r,) = steer_sequence([e_ids], e_rows, encode_rows, pc, tok.eos_token_id)
    assert not r.changed and torch.equal(r.rows, e_rows)


@pytest.mark.parametrize("alpha", [0.01, 10.0])
def test_one_token_prompts_follow_the_documented_rule_against_float64(tiny_clip, alpha):
    """A lone token is compared with the prompt itself (docs/steering.md): a trigger iff
    ‖(I − P_C) p_masked‖ ≥ (1 + α) ‖(I − P_C) p‖. A lone concept word lies in the subspace, so it
    is steered at any α; a word whose removal moves the prompt no farther is left bit-identical
    (the released code, comparing with the NaN mean of no other token, steers every lone token)."""
    tok, model = tiny_clip
    ids_of, encode_rows, encode_pooled = encoder(tok, model)
    pc = concept_projector(("tiny-one", id(model)), ["nude"], encode_pooled)
    pc64 = proj64(encode_pooled(["nude"]).double().numpy())
    outcomes = {}
    for word in ("nude", "cat", "beach", "red", "dog", "house"):
        ids = ids_of(word)
        assert ids.index(tok.eos_token_id) == 2, word                    # one BPE token
        rows = encode_rows([ids])[0]
        (res,) = steer_sequence([ids], rows, encode_rows, pc, tok.eos_token_id, alpha=alpha, svf=None)
        masked = list(ids)
        masked[1] = 0
        residual = np.eye(pc64.shape[0]) - pc64
        d_masked = np.linalg.norm(residual @ encode_rows([masked])[0, 2].double().numpy())
        d_own = np.linalg.norm(residual @ rows[2].double().numpy())
        want = bool(d_masked >= (1 + alpha) * d_own)
        assert res.changed == want and res.triggers == ([1] if want else []), word
        if want:
            h = rows.double().numpy()
            loo = encode_rows([masked])[:, 2].double().numpy()
            proj = (residual @ proj64(loo) @ h.T).T
            np.testing.assert_allclose(res.rows[1].double().numpy(), proj[1], atol=2e-5)
            assert torch.equal(res.rows[[0, *range(2, 77)]], rows[[0, *range(2, 77)]])
        else:
            assert torch.equal(res.rows, rows)
        outcomes[word] = want
    assert outcomes["nude"] is True                      # the concept word itself: steered at any α
    assert not all(outcomes.values()), "every lone token steered: the rule did not decide anything"


def test_diffusers_prompt_steering_sd_and_sdxl(tmp_path):
    pytest.importorskip("diffusers")
    from safet2i.diffusers_adapter import steer_prompt, steering_kwargs
    from tiny_diffusers import tiny_sd_pipeline, tiny_sdxl_pipeline

    pipe = tiny_sd_pipeline(tmp_path / "sd")
    prompt = "a photo of a nude person"
    ref, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
    same, original, frac, rep = steer_prompt(pipe, prompt, ["nude"], alpha=10.0)
    assert frac == 0.0 and rep[0]["triggers"] == []
    torch.testing.assert_close(original, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(same, ref, rtol=0, atol=1e-6)  # no trigger: the pipeline's own embeddings
    steered, original, frac, rep = steer_prompt(pipe, prompt, ["nude"], self_validating=False)
    assert frac == 1.0 and rep[0]["triggers"] and not torch.equal(steered, original)
    kw = dict(num_inference_steps=4, guidance_scale=6.0, height=32, width=32, output_type="np")
    a = pipe(prompt_embeds=steered, generator=torch.Generator().manual_seed(0), **kw).images
    b = pipe(prompt_embeds=original, generator=torch.Generator().manual_seed(0), **kw).images
    c = pipe(generator=torch.Generator().manual_seed(0), **kw, **steering_kwargs(steered, original, 0.5)).images
    assert steering_kwargs(steered, original, 0.0)["prompt_embeds"] is original
    assert np.abs(a - b).max() > 1e-4 and np.abs(c - a).max() > 0 and np.abs(c - b).max() > 0

    xl = tiny_sdxl_pipeline(tmp_path / "xl")
    ref_xl = xl.encode_prompt(prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)[0]
    steered, original, frac, rep = steer_prompt(xl, prompt, ["nude"], self_validating=False)
    assert steered.shape == ref_xl.shape == (1, 77, 64) and len(rep) == 2
    torch.testing.assert_close(original, ref_xl, rtol=0, atol=1e-5)


def test_truncated_leave_one_out_gives_the_same_result(tiny_clip):
    tok, model = tiny_clip
    ids_of, encode_rows, encode_pooled = encoder(tok, model)
    pc = concept_projector(("tiny", id(model)), ["nude"], encode_pooled)
    ids = ids_of("a photo of a nude woman on a sunny beach")
    rows = encode_rows([ids])[0]
    full = steer_sequence([ids], rows, encode_rows, pc, tok.eos_token_id)[0]
    short = steer_sequence([ids], rows, encode_rows, pc, tok.eos_token_id, truncate=True)[0]
    assert full.triggers == short.triggers and full.t_prime == short.t_prime
    torch.testing.assert_close(full.rows, short.rows, rtol=0, atol=1e-5)


def test_fourier_reattention_matches_numpy_reference():
    from safet2i.steering.reattention import fourier_reattention

    rng = np.random.default_rng(7)
    hs, ho = rng.normal(size=(2, 3, 8, 6)), rng.normal(size=(2, 3, 8, 6))
    fs = np.fft.fftshift(np.fft.fft2(hs), axes=(-2, -1))
    fo = np.fft.fftshift(np.fft.fft2(ho), axes=(-2, -1))
    win = np.zeros((8, 6), bool)
    win[3:5, 2:4] = True  # half-size 1 around the centre (4, 3)
    damp = win & (np.abs(fs) > np.abs(fo))
    want = np.fft.ifft2(np.fft.ifftshift(np.where(damp, fs * 0.2, fs), axes=(-2, -1))).real
    got = fourier_reattention(torch.tensor(hs), torch.tensor(ho), 0.2).numpy()
    np.testing.assert_allclose(got, want.astype(np.float32), atol=1e-5)
    same = fourier_reattention(torch.tensor(hs), torch.tensor(hs), 0.2)  # nothing amplified: unchanged
    np.testing.assert_allclose(same.numpy(), hs, atol=1e-5)


def _causal_model(seed=0, vocab=50, positions=16, dim=8, layers=2):
    """A tiny pre-norm causal transformer in float64 (independent of any library's CLIP)."""
    g = torch.Generator().manual_seed(seed)
    w = {"tok": torch.randn(vocab, dim, generator=g, dtype=torch.float64),
         "pos": torch.randn(positions, dim, generator=g, dtype=torch.float64),
         "layers": [[torch.randn(dim, dim, generator=g, dtype=torch.float64) / dim ** 0.5 for _ in range(5)]
                    for _ in range(layers)]}

    def run(ids, pos, allowed):
        x = w["tok"][torch.tensor(ids)] + w["pos"][torch.tensor(pos)]
        for q, k, v, o, m in w["layers"]:
            h = torch.nn.functional.layer_norm(x, (dim,))
            att = (h @ q) @ (h @ k).T / dim ** 0.5
            att = att.masked_fill(~allowed, float("-inf")).softmax(-1)
            x = x + (att @ (h @ v)) @ o
            x = x + torch.tanh(torch.nn.functional.layer_norm(x, (dim,)) @ m)
        return x
    return run


def test_packed_leave_one_out_equals_separate_causal_encodes():
    from safet2i.steering.safree import packed_layout

    run = _causal_model()
    original = [1, 7, 9, 4, 11, 2]
    variants = []
    for i in range(1, 5):
        v = list(original)
        v[i] = 0
        variants.append(v)
    variants.append(list(original))  # unchanged variant: only its last row is recomputed
    ids, pos, allowed, last = packed_layout(original, variants)
    assert len(ids) == len(original) + sum(len(original) - i for i in (1, 2, 3, 4)) + 1
    packed = run(ids, pos, allowed)
    n = len(original)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    ref_prompt = run(original, list(range(n)), causal)
    torch.testing.assert_close(packed[:n], ref_prompt, rtol=1e-12, atol=1e-12)
    for j, v in enumerate(variants):
        ref = run(v, list(range(n)), causal)[-1]
        torch.testing.assert_close(packed[last[j]], ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError):
        packed_layout(original, [original[:-1]])


def test_projection_stays_on_the_projectors_device():
    """GPU pipelines keep the projector on the accelerator: no CPU-only intermediate (the meta
    device stands in for a GPU here: any cross-device op raises)."""
    from safet2i.steering.safree import project_rows

    p_c = torch.zeros(6, 6, dtype=torch.float64, device="meta")
    p_m = torch.zeros(6, 6, dtype=torch.float64, device="meta")
    out = project_rows(torch.zeros(4, 6, device="meta"), p_c, p_m)
    assert out.device.type == "meta" and out.shape == (4, 6)


# --------------------------------------------------------------------------- issue 4 audit

def test_concept_cache_holds_a_weak_owner_and_misses_for_another_owner():
    import gc
    import weakref

    class Owner:  # stands in for a text encoder module
        pass

    calls = []

    def enc(concepts):
        calls.append(list(concepts))
        return torch.randn(len(concepts), 5, dtype=torch.float64)

    key = ("owner-test", 1)
    a = Owner()
    p1 = concept_projector(key, ["x", "y"], enc, owner=a)
    assert concept_projector(key, ["x", "y"], lambda c: 1 / 0, owner=a) is p1  # same owner: hit
    b = Owner()
    p2 = concept_projector(key, ["x", "y"], enc, owner=b)  # same key, another object: miss
    assert len(calls) == 2 and not torch.equal(p1, p2)
    ref = weakref.ref(b)
    del b
    gc.collect()
    assert ref() is None  # the cache does not keep its owner alive
    c = Owner()  # may well get b's id
    p3 = concept_projector(key, ["x", "y"], enc, owner=c)  # dead owner: miss
    assert len(calls) == 3 and concept_projector(key, ["x", "y"], lambda c: 1 / 0, owner=c) is p3
    np.testing.assert_allclose(p3.numpy() @ p3.numpy(), p3.numpy(), atol=1e-10)


def test_multi_chunk_prompt_against_float64_reference_per_chunk(tiny_clip):
    tok, model = tiny_clip
    _, encode_rows, encode_pooled = encoder(tok, model)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    words = tok(", ".join(["a nude figure drawing in a quiet museum hall"] * 9), add_special_tokens=False).input_ids
    assert len(words) > 75
    chunks = [[bos] + words[:75] + [eos]]
    rest = words[75:]
    chunks.append([bos] + rest + [eos] * (77 - 1 - len(rest)))
    rows = encode_rows(chunks).reshape(2 * 77, -1)
    pc = concept_projector(("tiny-multi", id(model)), ["nude"], encode_pooled, owner=model)
    results = steer_sequence(chunks, rows, encode_rows, pc, eos)
    assert len(results) == 2

    c_vec = encode_pooled(["nude"]).double().numpy()
    pc64 = proj64(c_vec)
    d = pc64.shape[0]
    for c, (ids, res) in enumerate(zip(chunks, results)):
        e = ids.index(eos)
        n = e - 1
        variants = []
        for i in range(1, n + 1):
            v = list(ids)
            v[i] = 0
            variants.append(v)
        loo = encode_rows(variants)[:, e].double().numpy()  # [n, d]
        dist = np.linalg.norm((np.eye(d) - pc64) @ loo.T, axis=0)
        want = [i + 1 for i in range(n) if dist[i] >= 1.01 * np.mean(np.delete(dist, i))]
        assert res.triggers == want, c
        assert want, f"chunk {c}: no trigger in the reference (test prompt too weak)"
        h = rows[c * 77:(c + 1) * 77].double().numpy()
        proj = ((np.eye(d) - pc64) @ proj64(loo) @ h.T).T
        expected = h.copy()
        expected[want] = proj[want]
        np.testing.assert_allclose(res.rows.double().numpy(), expected, atol=2e-5)
        cos = (h[: n + 2] * proj[: n + 2]).sum(1) / (np.linalg.norm(h[: n + 2], axis=1) * np.linalg.norm(proj[: n + 2], axis=1))
        assert res.beta == pytest.approx(1 - cos.mean(), abs=1e-5)
        assert res.t_prime == svf_steps(res.beta)


def test_violence_and_user_presets_and_a_broken_user_file(tmp_path):
    from safet2i.errors import PolicyError
    from safet2i.steering import concepts as cmod

    packaged = json.loads((cmod.PACKAGE_DIR / "violence.json").read_text(encoding="utf-8"))
    items, svf = load_concepts("violence")
    assert items == packaged["concepts"] and "Gore" in items and svf == "nudity"
    (tmp_path / "mine.json").write_text(json.dumps({"name": "my artists", "svf": "artist",
                                                    "concepts": ["Van Gogh", "Kelly McKernan"]}))
    (tmp_path / "broken.json").write_text('{"concepts": ["a", ')  # malformed JSON
    (tmp_path / "empty.json").write_text('{"concepts": []}')
    try:
        presets, errors = cmod.read_presets((cmod.PACKAGE_DIR, tmp_path))  # does not raise
        assert set(errors) == {"broken", "empty"} and "my artists" in presets
        cmod.refresh((cmod.PACKAGE_DIR, tmp_path))
        assert load_concepts("my artists") == (["Van Gogh", "Kelly McKernan"], "artist")
        assert load_concepts("nudity")[0][2] == "Nudity"  # the packaged presets are still there
        with pytest.raises(PolicyError, match=r"broken\.json.*not valid JSON"):
            load_concepts("broken")
        with pytest.raises(PolicyError, match=r"empty\.json.*non-empty list"):
            load_concepts("empty")
    finally:
        cmod.refresh()
    assert "my artists" not in cmod.CONCEPT_PRESETS and not cmod.PRESET_ERRORS


def test_a_broken_user_file_replacing_a_builtin_preset_is_an_error_not_the_builtin(tmp_path):
    """A user's nudity.json that does not parse means "not the built-in nudity list": choosing
    nudity raises its error instead of silently using the packaged one; listed once."""
    from safet2i.errors import PolicyError
    from safet2i.steering import concepts as cmod

    (tmp_path / "nudity.json").write_text('{"concepts": ["my own", ')
    try:
        cmod.refresh((cmod.PACKAGE_DIR, tmp_path))
        assert "nudity" not in cmod.CONCEPT_PRESETS and "nudity" in cmod.PRESET_ERRORS
        with pytest.raises(PolicyError, match=r"nudity\.json.*not valid JSON"):
            load_concepts("nudity")
        choices = cmod.preset_choices()
        assert choices.count("nudity") == 1 and choices[-1] == "custom" and "violence" in choices
        # a valid user file of the name replaces the built-in and clears an earlier error
        (tmp_path / "nudity.json").write_text('{"concepts": ["my own"]}')
        cmod.refresh((cmod.PACKAGE_DIR, tmp_path))
        assert load_concepts("nudity") == (["my own"], "nudity") and "nudity" not in cmod.PRESET_ERRORS
        assert cmod.preset_choices().count("nudity") == 1
    finally:
        cmod.refresh()
    assert load_concepts("nudity")[0][2] == "Nudity"


def _spy_projector(monkeypatch):
    import safet2i.steering as steering

    real, seen = steering.concept_projector, []

    def spy(key, concepts, encode_pooled, owner=None):
        missed = []

        def counted(c):
            missed.append(True)
            return encode_pooled(c)
        out = real(key, concepts, counted, owner=owner)
        seen.append((out, bool(missed)))
        return out
    monkeypatch.setattr(steering, "concept_projector", spy)
    return seen


def test_diffusers_in_place_merge_gives_a_new_subspace(tmp_path, monkeypatch):
    pytest.importorskip("diffusers")
    from safet2i.diffusers_adapter import steer_prompt
    from tiny_diffusers import tiny_sd_pipeline

    pipe = tiny_sd_pipeline(tmp_path / "sd")
    seen = _spy_projector(monkeypatch)
    concepts = ["nude", "naked"]
    steer_prompt(pipe, "a photo of a nude person", concepts)
    steer_prompt(pipe, "a nude statue", concepts)
    assert seen[1][1] is False and seen[1][0] is seen[0][0]  # unchanged weights: cached
    # An in-place LoRA merge (what fuse_lora and load_safety_lora do): W += B·A.
    q = dict(pipe.text_encoder.named_parameters())["encoder.layers.0.self_attn.q_proj.weight"]
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        q += torch.randn(q.shape[0], 2, generator=g) @ torch.randn(2, q.shape[1], generator=g)
    steer_prompt(pipe, "a photo of a nude person", concepts)
    p_new, missed = seen[2]
    assert missed and not torch.allclose(p_new, seen[0][0], atol=1e-6)
    tok, enc = pipe.tokenizer, pipe.text_encoder
    ids = [tok(c, padding="max_length", max_length=77, truncation=True).input_ids for c in concepts]
    with torch.no_grad():
        last = enc(torch.tensor(ids)).last_hidden_state
    pooled = np.stack([last[i, ids[i].index(tok.eos_token_id)].double().numpy() for i in range(2)])
    np.testing.assert_allclose(p_new.numpy(), proj64(pooled), atol=1e-6)  # the merged encoder's P_C


def test_diffusers_peft_adapter_changes_give_a_new_subspace(tmp_path, monkeypatch):
    """A PEFT LoRA on the text encoder changes its output through the adapter's scaling and
    switches, without touching a weight: each change is a cache miss, and the subspace is the
    one of the encoder as it is then (float64 reference)."""
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer
    from safet2i.diffusers_adapter import steer_prompt
    from tiny_diffusers import tiny_sd_pipeline

    pipe = tiny_sd_pipeline(tmp_path / "sd")
    tok, enc = pipe.tokenizer, pipe.text_encoder
    torch.manual_seed(0)
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"],
                                       init_lora_weights=False), enc)
    layers = [m for m in enc.modules() if isinstance(m, BaseTunerLayer)]
    assert layers
    seen = _spy_projector(monkeypatch)
    concepts = ["nude", "naked"]
    ids = [tok(c, padding="max_length", max_length=77, truncation=True).input_ids for c in concepts]

    def reference():
        with torch.no_grad():
            last = enc(torch.tensor(ids)).last_hidden_state
        return proj64(np.stack([last[i, ids[i].index(tok.eos_token_id)].double().numpy() for i in range(2)]))

    def scale(value):
        for m in layers:
            m.scaling = {k: value for k in m.scaling}

    def enable(on):
        return lambda: [m.enable_adapters(on) for m in layers]

    def merge():
        for m in layers:
            m.merge()

    steer_prompt(pipe, "a photo of a nude person", concepts)
    steer_prompt(pipe, "a nude statue", concepts)
    assert [m for _, m in seen] == [True, False]          # unchanged: cached
    # enable(True) returns to the state after scale(0.25): that cached subspace is right again
    for change, expect_miss in ((lambda: scale(0.25), True), (enable(False), True), (enable(True), False),
                                (lambda: scale(3.0), True), (merge, True)):
        change()
        steer_prompt(pipe, "a photo of a nude person", concepts)
        p_new, missed = seen[-1]
        assert missed is expect_miss, change
        np.testing.assert_allclose(p_new.numpy(), reference(), atol=1e-6)
    assert not np.allclose(seen[-1][0].numpy(), seen[0][0].numpy(), atol=1e-4)


def test_diffusers_no_trigger_is_bit_identical_one_token_is_steered_and_empty_is_reported(tmp_path):
    pytest.importorskip("diffusers")
    from safet2i.diffusers_adapter import steer_prompt
    from tiny_diffusers import tiny_sd_pipeline

    pipe = tiny_sd_pipeline(tmp_path / "sd")
    prompt = "a photo of a nude person"
    ref, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
    same, original, frac, rep = steer_prompt(pipe, prompt, ["nude"], alpha=10.0)
    assert frac == 0.0 and rep[0]["triggers"] == []
    assert torch.equal(same, ref) and torch.equal(original, ref)
    # One token, the concept word itself (the tiny tokenizer: one character, one token): steered.
    one, original, frac, rep = steer_prompt(pipe, "x", ["x"], self_validating=False)
    assert frac == 1.0 and rep[0]["triggers"] == [1] and "note" not in rep[0]
    assert torch.equal(original, pipe.encode_prompt("x", "cpu", 1, False)[0]) and not torch.equal(one, original)
    empty, original, frac, rep = steer_prompt(pipe, "", ["x"])
    assert frac == 0.0 and rep[0]["note"] == "empty prompt: nothing to steer" and torch.equal(empty, original)


@pytest.mark.parametrize("guidance_scale", [6.0, 1.0], ids=["cfg", "no-cfg"])
def test_switch_after_swaps_every_image_of_the_batch(tmp_path, guidance_scale):
    pytest.importorskip("diffusers")
    from safet2i.diffusers_adapter import steer_prompt, steering_kwargs
    from tiny_diffusers import tiny_sd_pipeline

    pipe = tiny_sd_pipeline(tmp_path / "sd")
    prompt = "a photo of a nude person"
    steered, original, frac, rep = steer_prompt(pipe, prompt, ["nude"], self_validating=False)
    assert frac == 1.0 and not torch.equal(steered, original)
    negative = pipe.encode_prompt("", "cpu", 1, False)[0]
    seen = []
    real = pipe.unet.forward

    def recording(sample, timestep, encoder_hidden_states, *a, **kw):
        seen.append(encoder_hidden_states.detach().clone())
        return real(sample, timestep, encoder_hidden_states, *a, **kw)
    pipe.unet.forward = recording
    steps, fraction = 5, 0.4  # round(0.4 · 5) = 2 steered steps, then 3 original ones
    pipe(num_inference_steps=steps, guidance_scale=guidance_scale, height=32, width=32, output_type="np",
         num_images_per_prompt=2, generator=torch.Generator().manual_seed(0),
         **steering_kwargs(steered, original, fraction))
    assert len(seen) == steps
    cfg = guidance_scale > 1.0
    for step, emb in enumerate(seen):
        assert emb.shape[0] == (4 if cfg else 2)
        positives = emb[2:] if cfg else emb
        want = steered[0] if step < 2 else original[0]
        for image in range(2):
            assert torch.equal(positives[image], want), (step, image)
        if cfg:
            for image in range(2):
                assert torch.equal(emb[image], negative[0]), (step, image)


def test_diffusers_paper_configuration_and_concepts_as_negative(tmp_path):
    """``steering_pipeline_kwargs``: the paper configuration gives the 17 nudity concepts joined with
    ", " as the negative prompt (after the caller's) and the same images as those settings by hand;
    SDXL runs it without the self-validating window and passes the pipeline's pooled embeddings."""
    pytest.importorskip("diffusers")
    from safet2i.diffusers_adapter import steer_prompt, steering_kwargs, steering_pipeline_kwargs
    from tiny_diffusers import tiny_sd_pipeline, tiny_sdxl_pipeline

    concepts, _ = load_concepts("nudity")
    pipe = tiny_sd_pipeline(tmp_path / "sd")
    prompt = "a photo of a nude person"
    kwargs, rep = steering_pipeline_kwargs(pipe, prompt, ["cat"], alpha=5.0, self_validating=False,
                                           negative_prompt="blurry", configuration="SAFREE (paper configuration)")
    assert kwargs["negative_prompt"] == "blurry, " + ", ".join(concepts) and rep["concepts"] == 17
    assert rep["configuration"].startswith("SAFREE (paper configuration): concepts nudity, alpha 0.01, order code, "
                                           "self-validating on")
    steered, original, fraction, entries = steer_prompt(pipe, prompt, "nudity")
    assert rep["chunks"] == entries and rep["steered_fraction"] == round(fraction, 4)
    run = dict(num_inference_steps=3, guidance_scale=6.0, height=32, width=32, output_type="np")
    a = pipe(generator=torch.Generator().manual_seed(0), **run, **kwargs).images
    by_hand = steering_kwargs(steered, original, fraction)
    b = pipe(generator=torch.Generator().manual_seed(0), negative_prompt="blurry, " + ", ".join(concepts), **run,
             **by_hand).images
    c = pipe(generator=torch.Generator().manual_seed(0), negative_prompt="blurry", **run, **by_hand).images
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-4                 # the concepts in the negative prompt change the image
    plain, rep = steering_pipeline_kwargs(pipe, prompt, ["nude"], negative_prompt="blurry")
    assert plain["negative_prompt"] == "blurry" and rep["configuration"].endswith("concepts as negative prompt off")
    assert steering_pipeline_kwargs(pipe, prompt, ["nude"], concepts_as_negative=True)[0]["negative_prompt"] == "nude"

    xl = tiny_sdxl_pipeline(tmp_path / "xl")
    kwargs, rep = steering_pipeline_kwargs(xl, prompt, configuration="SAFREE (paper configuration)")
    assert "self-validating off" in rep["configuration"] and rep["steered_fraction"] in (0.0, 1.0)
    pooled = xl.encode_prompt(prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)[2]
    assert torch.equal(kwargs["pooled_prompt_embeds"], pooled) and "callback_on_step_end" not in kwargs
    out = xl(generator=torch.Generator().manual_seed(0), num_inference_steps=2, height=32, width=32,
             output_type="np", **kwargs).images
    assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all()


def test_switch_after_with_one_fraction_per_prompt_swaps_each_prompt_when_due():
    """A batch of prompts steered for different shares of the schedule (the bench's case):
    each prompt's positive rows (repeated per image) switch to its original at its own step;
    the negative half is never touched."""
    from types import SimpleNamespace

    from safet2i.diffusers_adapter import switch_after
    from safet2i.errors import SafeT2IError

    original = torch.stack([torch.full((3, 4), 10.0), torch.full((3, 4), 20.0)])
    cb = switch_after([0.4, 0.8], original)  # of 5 steps: after 2 and after 4 steps
    pipe = SimpleNamespace(num_timesteps=5, do_classifier_free_guidance=True)
    emb = torch.zeros(8, 3, 4)  # [4 negatives; prompt 0 x2, prompt 1 x2]
    seen = []
    for step in range(5):
        emb = cb(pipe, step, None, {"prompt_embeds": emb})["prompt_embeds"]
        seen.append([float(emb[i, 0, 0]) for i in range(8)])
    assert seen[0] == [0.0] * 8
    assert seen[1] == [0.0] * 4 + [10.0, 10.0, 0.0, 0.0]
    assert seen[3] == [0.0] * 4 + [10.0, 10.0, 20.0, 20.0]
    with pytest.raises(SafeT2IError, match="fractions"):
        switch_after([0.5], original)
