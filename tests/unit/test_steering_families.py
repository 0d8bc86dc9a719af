"""SAFREE-style steering on T5 / umT5 (bidirectional) and causal LLM (Qwen2.5-VL) encoders, and in
the diffusers SD3, Flux, Qwen-Image and Wan pipelines (``tests/unit/tiny_families.py``).

The references are written here from docs/steering.md, independently of ``safet2i.steering``: rows
straight from the transformers models (the layer each pipeline uses), every leave-one-out variant
encoded on its own, the family's pooled row (CLIP: first end token; T5/umT5: first ``</s>``; causal
LLM: the last row), the prompt's token rows (CLIP 1..n, T5 0..n−1, Qwen-Image after its 34-token
template prefix up to the closing ``<|im_end|>``), then the trigger rule and projections in numpy
float64. The text encoders run in float64; the plan batches the variants and the reference encodes
them one by one, and P_M of nearly parallel leave-one-out vectors amplifies the last-bit
differences: they agree to ~1e-8 (bound 1e-6).
Not-steered rows are bit-identical.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from safet2i.errors import SafeT2IError
from safet2i.steering import Span, SteeringPlan, chat_span, clip_span, end_rows, projector, t5_span
from tiny_families import tiny_flux, tiny_qwen_image, tiny_sd3, tiny_wan

PROMPT = "a nude woman on a beach"
CONCEPTS = ["nude", "naked body", "erotic"]
MSL = 64


# ------------------------------------------------------------------------------------ references


def proj(vectors: np.ndarray) -> np.ndarray:
    a = vectors.T
    return a @ np.linalg.pinv(a.T @ a) @ a.T


def ref_steer(rows: np.ndarray, loo: np.ndarray, concepts: np.ndarray, first: int, n: int, alpha: float):
    """(steered rows, trigger rows) from the equations: rows are the conditioning's rows of one chunk."""
    eye = np.eye(rows.shape[1])
    pc, pm = proj(concepts), proj(loo)
    dist = np.linalg.norm((eye - pc) @ loo.T, axis=0)
    trig = [i for i in range(n) if dist[i] >= (1 + alpha) * (dist.sum() - dist[i]) / (n - 1)]
    new = ((eye - pc) @ pm @ rows.T).T
    out = rows.copy()
    for i in trig:
        out[first + i] = new[first + i]
    return out, [first + i for i in trig]


def f64(t) -> np.ndarray:
    return t.detach().to(torch.float64).cpu().numpy()


def clip_rows(te, tok, text_or_ids):
    ids = text_or_ids if isinstance(text_or_ids, list) else \
        tok(text_or_ids, padding="max_length", max_length=77, truncation=True).input_ids
    with torch.no_grad():
        return ids, te(torch.tensor([ids]), output_hidden_states=True).hidden_states[-2][0]


def t5_rows(te, tok, text_or_ids, masked=False, mask=None):
    if isinstance(text_or_ids, list):
        ids = text_or_ids
    else:
        enc = tok(text_or_ids, padding="max_length", max_length=MSL, truncation=True)
        ids, mask = enc.input_ids, enc.attention_mask
    with torch.no_grad():
        if masked:
            m = torch.tensor([mask])
            return ids, mask, te(torch.tensor([ids]), m)[0][0] * m[0, :, None]
        return ids, mask, te(torch.tensor([ids]))[0][0]


def qwen_rows(pipe, text_or_ids):
    ids = text_or_ids if isinstance(text_or_ids, list) else \
        pipe.tokenizer(pipe.prompt_template_encode.format(text_or_ids)).input_ids
    with torch.no_grad():
        t = torch.tensor([ids])
        return ids, pipe.text_encoder(input_ids=t, attention_mask=torch.ones_like(t),
                                      output_hidden_states=True).hidden_states[-1][0]


def loo_vectors(encode, ids, first, n, pool):
    out = []
    for i in range(first, first + n):
        v = list(ids)
        v[i] = 0
        out.append(f64(encode(v)[pool]))
    return np.stack(out)


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("families")
    out = {"sd3": tiny_sd3(folder / "sd3", 1), "flux": tiny_flux(folder / "flux", 2),
           "qwen_image": tiny_qwen_image(folder / "qwen", 3), "wan": tiny_wan(folder / "wan", 4)}
    for p in out.values():
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            if getattr(p, name, None) is not None:
                getattr(p, name).double()
    return out


# ------------------------------------------------------------------------------------ spans


def test_spans_of_each_kind_of_encoder():
    assert clip_span([9, 5, 6, 7, 8, 8], 8) == Span(1, 3, 4)                 # BOS, 3 tokens, EOS, padding
    assert t5_span([5, 6, 7, 1, 0, 0], 1) == Span(0, 3, 3)                   # 3 tokens, </s>, padding
    assert t5_span([5, 6, 7, 8], 1) == Span(0, 3, 3)                         # cut without </s>: last row pools
    ids = [1, 2, 3, 4, 20, 21, 22, 9, 5, 6, 7]                               # prefix 4, prompt 3, close 9, suffix
    assert chat_span(ids, 4, 9) == Span(4, 3, 10, 4)
    assert chat_span(ids + [0, 0], 4, 9, pad_id=0) == Span(4, 3, 10, 4)     # trailing padding is not the last row
    # a closing token typed inside the prompt does not end it early: the last one closes the turn
    assert chat_span([1, 2, 20, 9, 21, 9, 5], 2, 9) == Span(2, 3, 6, 2)
    with pytest.raises(SafeT2IError, match="closing chat-template token"):
        chat_span([1, 2, 20, 21], 2, 9)


def test_causal_leave_one_out_changes_only_later_rows_and_always_the_last(pipes):
    """The premise of the causal rule (docs/steering.md): in Qwen2.5-VL, replacing prompt token i
    leaves rows < i bit-identical and changes row i and every later row, the last one included."""
    pipe = pipes["qwen_image"]
    ids, rows = qwen_rows(pipe, PROMPT)
    sp = chat_span(ids, pipe.prompt_template_encode_start_idx, pipe.tokenizer.convert_tokens_to_ids("<|im_end|>"))
    assert sp.start == 34 and sp.pool == len(ids) - 1
    assert pipe.tokenizer.decode(ids[sp.first:sp.first + sp.n]) == PROMPT
    for i in range(sp.first, sp.first + sp.n):
        v = list(ids)
        v[i] = 0
        _, other = qwen_rows(pipe, v)
        assert torch.equal(other[:i], rows[:i])
        assert (other[i:] - rows[i:]).abs().amax(-1).min() > 1e-6
        assert not torch.allclose(other[-1], rows[-1])


def test_bidirectional_leave_one_out_changes_every_row_of_t5(pipes):
    """Why T5 pools its ``</s>`` row: every row sees every token (so the end row, which is no prompt
    token, carries each removal); the first row, SAFREE's SD3 choice, is the first token's own row."""
    pipe = pipes["flux"]
    ids, _, rows = t5_rows(pipe.text_encoder_2, pipe.tokenizer_2, PROMPT)
    eos = ids.index(1)
    for i in (0, eos // 2, eos - 1):
        v = list(ids)
        v[i] = 0
        _, _, other = t5_rows(pipe.text_encoder_2, pipe.tokenizer_2, v)
        assert (other - rows).abs().amax(-1).min() > 1e-8          # every row, padding included, moves


# ------------------------------------------------------------------------------------ the core on T5 / Qwen


class T5Adapter:
    """A host adapter as a host writes it (not the diffusers one): T5 rows at full length."""

    name, end_id = "t5", 1

    def __init__(self, te, tok):
        self.te, self.tok = te, tok

    def chunks(self, text):
        return [(self.tok(text, padding="max_length", max_length=MSL, truncation=True).input_ids, None)]

    def span(self, ids):
        return t5_span(ids, 1)

    def encode(self, id_lists, data):
        with torch.no_grad():
            return self.te(torch.tensor(id_lists))[0]

    def token_text(self, ids):
        return [str(i) for i in ids]


@pytest.mark.parametrize("alpha", [0.0, 0.05])
def test_plan_on_t5_rows_against_float64_reference(pipes, alpha):
    pipe = pipes["flux"]
    te, tok = pipe.text_encoder_2, pipe.tokenizer_2
    enc = T5Adapter(te, tok)
    ids, _, rows = t5_rows(te, tok, PROMPT)
    eos = ids.index(1)

    def encode(v):
        return t5_rows(te, tok, v)[2]

    concepts = np.stack([f64(t5_rows(te, tok, c)[2][t5_rows(te, tok, c)[0].index(1)]) for c in CONCEPTS])
    want, trig = ref_steer(f64(rows), loo_vectors(encode, ids, 0, eos, eos), concepts, 0, eos, alpha)
    plan = SteeringPlan([enc], [projector(end_rows(enc, CONCEPTS))], PROMPT, rows, alpha=alpha, svf=None)
    out = plan.steer(rows)
    assert trig and out.results[0][1].triggers == trig
    np.testing.assert_allclose(f64(out.rows), want, rtol=0, atol=1e-6)
    assert torch.equal(out.rows[eos:], rows[eos:])                     # </s> and padding rows untouched


# ------------------------------------------------------------------------------------ diffusers, per family


def family_reference(pipe, family: str, alpha: float) -> tuple[np.ndarray, dict]:
    """(expected steered prompt_embeds [T, D], trigger rows per encoder) built from the models."""
    if family == "sd3":
        parts, trig = [], {}
        for name, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
            te, tk = getattr(pipe, name), getattr(pipe, tok)
            ids, rows = clip_rows(te, tk, PROMPT)
            eos = ids.index(tk.eos_token_id)
            concepts = []
            for c in CONCEPTS:
                cids, crows = clip_rows(te, tk, c)
                concepts.append(f64(crows[cids.index(tk.eos_token_id)]))
            out, trig[name] = ref_steer(f64(rows), loo_vectors(lambda v, te=te, tk=tk: clip_rows(te, tk, v)[1],
                                                               ids, 1, eos - 1, eos),
                                        np.stack(concepts), 1, eos - 1, alpha)
            parts.append(out)
        clip = np.concatenate(parts, -1)
        te3, tk3 = pipe.text_encoder_3, pipe.tokenizer_3
        ids, _, rows = t5_rows(te3, tk3, PROMPT)
        eos = ids.index(1)
        concepts = np.stack([f64(t5_rows(te3, tk3, c)[2][t5_rows(te3, tk3, c)[0].index(1)]) for c in CONCEPTS])
        loo = loo_vectors(lambda v: t5_rows(te3, tk3, v)[2], ids, 0, eos, eos)
        t5, trig["text_encoder_3"] = ref_steer(f64(rows), loo, concepts, 0, eos, alpha)
        clip = np.pad(clip, ((0, 0), (0, t5.shape[1] - clip.shape[1])))
        return np.concatenate([clip, t5]), trig
    if family in ("flux", "wan"):
        te, tk = (pipe.text_encoder_2, pipe.tokenizer_2) if family == "flux" else (pipe.text_encoder, pipe.tokenizer)
        masked = family == "wan"
        ids, mask, rows = t5_rows(te, tk, PROMPT, masked)
        eos = ids.index(1)
        concepts = []
        for c in CONCEPTS:
            cids, _, crows = t5_rows(te, tk, c, masked)
            concepts.append(f64(crows[cids.index(1)]))
        out, trig = ref_steer(f64(rows), loo_vectors(lambda v: t5_rows(te, tk, v, masked, mask)[2], ids, 0, eos, eos),
                              np.stack(concepts), 0, eos, alpha)
        return out, {"text_encoder_2" if family == "flux" else "text_encoder": trig}
    # qwen_image: prompt after the 34-token prefix, up to the last <|im_end|>; pooled = last row
    ids, rows = qwen_rows(pipe, PROMPT)
    start = 34
    close = max(i for i, t in enumerate(ids) if t == pipe.tokenizer.convert_tokens_to_ids("<|im_end|>"))
    concepts = np.stack([f64(qwen_rows(pipe, c)[1][-1]) for c in CONCEPTS])
    n = close - start
    out, trig = ref_steer(f64(rows[start:]), loo_vectors(lambda v: qwen_rows(pipe, v)[1], ids, start, n, len(ids) - 1),
                          concepts, 0, n, alpha)
    return out, {"text_encoder": trig}


@pytest.mark.parametrize("family", ["sd3", "flux", "qwen_image", "wan"])
def test_diffusers_steer_prompt_matches_the_float64_reference(pipes, family):
    from safet2i.diffusers_adapter import encode_for_steering, steer_prompt

    pipe = pipes[family]
    steered, original, fraction, report = steer_prompt(pipe, PROMPT, CONCEPTS, alpha=0.0, self_validating=False,
                                                       max_sequence_length=MSL)
    want, trig = family_reference(pipe, family, 0.0)
    assert {e["encoder"]: e["triggers"] for e in report} == trig and all(trig.values())
    assert steered.shape == original.shape and fraction == 1.0
    np.testing.assert_allclose(f64(steered[0]), want, rtol=0, atol=1e-6)
    # the original is the pipeline's own encode, bit for bit
    assert torch.equal(original, encode_for_steering(pipe, PROMPT, family, MSL)[0])
    if family == "qwen_image":
        assert all(pipe.tokenizer.decode([t]).strip() in PROMPT for e in report for t in e["trigger_tokens"])
    if family == "wan":                                                  # zeroed padding rows stay zero
        n_real = pipe.tokenizer(PROMPT).input_ids.__len__()
        assert torch.all(steered[0, n_real:] == 0)


@pytest.mark.parametrize("family", ["sd3", "flux", "qwen_image", "wan"])
def test_steering_off_gives_the_plain_encode_bit_for_bit(pipes, family):
    """Zero strength: α so large that no token can trigger gives the pipeline's own tensor."""
    from safet2i.diffusers_adapter import encode_for_steering, steer_prompt, steering_pipeline_kwargs

    pipe = pipes[family]
    steered, original, fraction, report = steer_prompt(pipe, PROMPT, CONCEPTS, alpha=10.0, max_sequence_length=MSL)
    assert steered is original and fraction == 0.0 and not any(e["triggers"] for e in report)
    plain, extra = encode_for_steering(pipe, PROMPT, family, MSL)
    assert torch.equal(steered, plain)
    kw, _ = steering_pipeline_kwargs(pipe, PROMPT, CONCEPTS, alpha=10.0, max_sequence_length=MSL)
    assert torch.equal(kw["prompt_embeds"], plain) and "callback_on_step_end" not in kw
    for k, v in extra.items():
        assert torch.equal(kw[k], v)


@pytest.mark.parametrize("family", ["sd3", "flux", "qwen_image", "wan"])
def test_steering_pipeline_kwargs_run_the_pipeline(pipes, family):
    from tiny_families import call_kwargs

    from safet2i.diffusers_adapter import steering_pipeline_kwargs

    pipe = pipes[family]
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).float()
    try:
        kw, report = steering_pipeline_kwargs(pipe, PROMPT, CONCEPTS, alpha=0.0, max_sequence_length=MSL,
                                              concepts_as_negative=True)
        expect = {"sd3": {"pooled_prompt_embeds"}, "flux": {"pooled_prompt_embeds"}, "qwen_image": set(), "wan": set()}
        assert expect[family] <= set(kw) and kw["max_sequence_length"] == MSL
        assert kw["negative_prompt"] == ", ".join(CONCEPTS)
        assert ("note" in report) == (family in ("flux", "qwen_image"))
        call = call_kwargs(family)
        call.pop("max_sequence_length")
        call.pop("negative_prompt", None)
        out = pipe(prompt=None, **kw, **call)
        pixels = out.frames if family == "wan" else out.images
        assert np.isfinite(pixels).all()
    finally:
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            if getattr(pipe, name, None) is not None:
                getattr(pipe, name).double()


def test_switch_after_with_positive_only_prompt_embeds():
    """Flux, Qwen-Image and Wan keep the negatives out of ``prompt_embeds``: every row is a positive."""
    from safet2i.diffusers_adapter import switch_after

    original = torch.zeros(1, 3, 2)
    steered = torch.ones(2, 3, 2)                    # num_images_per_prompt = 2
    pipe = type("P", (), {"num_timesteps": 10, "do_classifier_free_guidance": True})()
    cb = switch_after(0.2, original, negatives_in_batch=False)
    assert torch.equal(cb(pipe, 0, None, {"prompt_embeds": steered})["prompt_embeds"], steered)
    assert torch.equal(cb(pipe, 1, None, {"prompt_embeds": steered})["prompt_embeds"], torch.zeros(2, 3, 2))
    # the SD/SDXL/SD3 default reads the pipeline's CFG flag: the first half is the negatives
    cb = switch_after(0.2, original)
    got = cb(pipe, 1, None, {"prompt_embeds": steered})["prompt_embeds"]
    assert torch.equal(got[:1], torch.ones(1, 3, 2)) and torch.equal(got[1:], torch.zeros(1, 3, 2))


def test_paper_configuration_steers_every_step_on_the_new_families():
    from safet2i.steering.settings import PAPER, SteeringSettings, configure

    for arch in ("sd3", "flux", "qwen_image", "wan", "sdxl"):
        assert configure(PAPER, SteeringSettings(), arch).self_validating is False
    assert configure(PAPER, SteeringSettings(), None).self_validating is True


def test_unknown_pipelines_are_refused():
    from safet2i.diffusers_adapter import pipeline_family

    with pytest.raises(SafeT2IError, match="not object"):
        pipeline_family(object())
