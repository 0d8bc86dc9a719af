"""A1111 prompt steering (extension/safet2i_a1111/steering.py) against the core, computed independently.

The webui's ``on_cfg_denoiser`` gives ``params.text_cond``: the cond rows only (one per image
and ``AND`` sub-prompt), 77·k tokens each, for SDXL a dict with ``crossattn`` (CLIP-L ‖
OpenCLIP-bigG channels) and ``vector``. Here the "webui" rows are the tiny CLIP's own encodes,
the engines are the HF fallback of steering.py, and the reference is
``safet2i.steering.steer_sequence`` with its own encoder closure.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "extension"))

from safet2i.steering import projector, steer_sequence  # noqa: E402
from safet2i_a1111.steering import (  # noqa: E402
    Encoder, HFClipEngine, SteeringError, SteeringHook, candidate_texts, find_encoders,
)

PROMPT = "a photo of a nude woman on a sunny beach"
BENIGN = "a red bicycle leaning on a wall"


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Two tiny CLIP text models with the real CLIP BPE (64 and 32 channels)."""
    pytest.importorskip("transformers")
    from test_steering import clip_bpe_tokenizer
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = clip_bpe_tokenizer(tmp_path_factory.mktemp("bpe"))
    models = []
    for seed, width in ((0, 64), (1, 32)):
        torch.manual_seed(seed)
        models.append(CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=width, intermediate_size=2 * width, num_attention_heads=4,
            num_hidden_layers=2, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)).eval())
    return tok, models


def ids_of(tok, text):
    return tok(text, padding="max_length", max_length=77, truncation=True).input_ids


def core(tok, model, text, concepts, **kw):
    """The core's SteerResult for ``text`` (one chunk), from scratch."""
    @torch.no_grad()
    def encode_rows(id_lists):
        return model(torch.tensor(id_lists)).last_hidden_state

    cids = [ids_of(tok, c) for c in concepts]
    crow = encode_rows(cids)
    pc = projector(torch.stack([crow[i, cids[i].index(tok.eos_token_id)] for i in range(len(cids))]))
    ids = ids_of(tok, text)
    rows = encode_rows([ids])[0]
    return rows, steer_sequence([ids], rows, encode_rows, pc, tok.eos_token_id, **kw)[0]


def sd1(tok, model):
    return SimpleNamespace(cond_stage_model=SimpleNamespace(wrapped=SimpleNamespace(transformer=model, tokenizer=tok)))


def params_for(text_cond, step=0, total=20, denoiser=None):
    uncond = torch.zeros_like(text_cond["crossattn"] if isinstance(text_cond, dict) else text_cond)
    return SimpleNamespace(text_cond=text_cond, text_uncond=uncond, sampling_step=step, total_sampling_steps=total,
                           denoiser=denoiser)


def test_steered_rows_equal_the_core_and_nothing_is_mutated(clips):
    tok, (model, _) = clips
    rows, ref = core(tok, model, PROMPT, ["nude"], svf=None)
    assert ref.changed and ref.triggers
    benign_rows, benign_ref = core(tok, model, BENIGN, ["nude"], svf=None)
    hook = SteeringHook(find_encoders(sd1(tok, model)), ["nude"], self_validating=False)
    hook.prepare([PROMPT, BENIGN])
    text_cond = torch.stack([rows, benign_rows])
    frozen = text_cond.clone()
    params = params_for(text_cond)
    uncond = params.text_uncond
    assert hook.apply(params)
    assert params.text_cond is not text_cond and torch.equal(text_cond, frozen)    # a new tensor
    assert params.text_uncond is uncond and not uncond.any()
    assert torch.equal(params.text_cond[0], ref.rows)                            # the core's result, bit for bit
    assert torch.equal(params.text_cond[1], benign_ref.rows)
    assert hook.describe([PROMPT]).startswith("nude") and "β" in hook.describe([PROMPT])


def test_benign_prompts_are_bit_identical(clips):
    tok, (model, _) = clips
    rows, ref = core(tok, model, BENIGN, ["nude"], alpha=10.0)
    assert not ref.changed
    hook = SteeringHook(find_encoders(sd1(tok, model)), ["nude"], alpha=10.0)
    hook.prepare([BENIGN])
    text_cond = torch.stack([rows, rows])
    params = params_for(text_cond)
    assert not hook.apply(params)
    assert params.text_cond is text_cond                     # untouched: the very same object
    assert hook.report([BENIGN]) == "no trigger token (steered 0 of 1 model calls)"


@pytest.mark.parametrize("total", [20, 50, 7])
@pytest.mark.parametrize("svf", [(2.5, 5.333), (2.5, 0.0)], ids=["nudity-svf", "wide-window"])
def test_self_validating_window_scaled_to_the_real_step_count(clips, total, svf):
    tok, (model, _) = clips
    rows, ref = core(tok, model, PROMPT, ["nude"], svf=svf)
    assert ref.changed and 0 <= ref.t_prime < 50
    hook = SteeringHook(find_encoders(sd1(tok, model)), ["nude"])
    hook.kw["svf"] = svf                  # the nudity preset gives t' = 0 on this tiny model; (2.5, 0) gives 10
    hook.prepare([PROMPT])
    text_cond = rows[None]
    steered = []
    for step in range(total):
        den = SimpleNamespace(step=step, total_steps=total)        # the denoiser's own counter wins
        params = params_for(text_cond, step=0, total=999, denoiser=den)
        if hook.apply(params):
            assert torch.equal(params.text_cond[0], ref.rows)
            steered.append(step)
        else:
            assert params.text_cond is text_cond                  # after t': the webui's rows as they are
    expected = [s for s in range(total) if s < (ref.t_prime + 1) / 50 * total]
    assert steered == expected and steered[0] == 0
    if svf[1] == 0.0:
        assert ref.t_prime == 10 and len(steered) == {20: 5, 50: 11, 7: 2}[total]
    # without the denoiser's counter: the state's sampling_step / sampling_steps
    params = params_for(text_cond, step=total - 1, total=total)
    assert not hook.apply(params) and params.text_cond is text_cond


def test_emphasis_scaled_rows_and_per_row_schedule(clips):
    """Emphasis rescales rows (still matched, steered from the webui's own rows); rows of a
    batch with AND sub-prompts or edited prompts are matched to their own text."""
    tok, (model, _) = clips
    rows, _ = core(tok, model, PROMPT, ["nude"], svf=None)
    other = "an oil painting of a nude man in a forest"
    rows2, _ = core(tok, model, other, ["nude"], svf=None)
    hook = SteeringHook(find_encoders(sd1(tok, model)), ["nude"], self_validating=False)
    hook.prepare([PROMPT, other])
    scaled = rows * 1.25                                     # "(...:1.25)"-like rescaling of every row
    text_cond = torch.stack([rows2, scaled, rows])
    params = params_for(text_cond)
    assert hook.apply(params)
    enc = hook.encoders[0]
    c = hook.plans[PROMPT].chunks[0][0]
    from safet2i.steering.safree import steer_chunk
    want_scaled = steer_chunk(scaled, c.loo, hook.p_c[0], c.n, alpha=0.01, order="code", svf=None)
    assert torch.equal(params.text_cond[1], want_scaled.rows)
    assert torch.equal(params.text_cond[0], core(tok, model, other, ["nude"], svf=None)[1].rows)
    assert torch.equal(params.text_cond[2], core(tok, model, PROMPT, ["nude"], svf=None)[1].rows)
    assert enc.name == "te"
    with pytest.raises(SteeringError, match="does not match any prompt"):
        hook.apply(params_for(torch.randn(1, 77, 64)))


def test_long_prompt_is_steered_per_chunk(clips):
    tok, (model, _) = clips
    engine = find_encoders(sd1(tok, model))[0].engine
    filler = ", ".join(["a quiet garden with tall green trees"] * 10)
    text = filler + ", a nude woman"
    chunks, count = engine.tokenize_line(text)
    assert len(chunks) == 2 and count > 75
    ids = [c.tokens for c in chunks]

    @torch.no_grad()
    def encode_rows(id_lists):
        return model(torch.tensor(id_lists)).last_hidden_state

    rows = torch.cat([encode_rows([i])[0] for i in ids])                     # the webui's 154 rows
    cid = ids_of(tok, "nude")
    pc = projector(encode_rows([cid])[0, cid.index(tok.eos_token_id)][None])
    want = steer_sequence(ids, rows, encode_rows, pc, tok.eos_token_id, svf=None)
    assert want[1].changed
    hook = SteeringHook(find_encoders(sd1(tok, model)), ["nude"], self_validating=False)
    hook.prepare([text])
    params = params_for(rows[None])
    assert hook.apply(params)
    assert torch.equal(params.text_cond[0], torch.cat([r.rows for r in want]))
    assert "chunk 2" in hook.describe([text])


def test_sdxl_two_encoders_on_their_channel_slices_and_vector_untouched(clips):
    tok, (m1, m2) = clips
    embedders = [HFClipEngine(m1, tok), HFClipEngine(m2, tok), SimpleNamespace(input_key="original_size_as_tuple")]
    sd = SimpleNamespace(conditioner=SimpleNamespace(embedders=embedders))
    encoders = find_encoders(sd)
    assert [e.name for e in encoders] == ["te1", "te2"]
    r1, want1 = core(tok, m1, PROMPT, ["nude"], svf=None)
    r2, want2 = core(tok, m2, PROMPT, ["nude"], svf=None)
    vector = torch.randn(1, 96)
    text_cond = {"crossattn": torch.cat([r1, r2], dim=-1)[None], "vector": vector}
    frozen = text_cond["crossattn"].clone()
    hook = SteeringHook(encoders, ["nude"], self_validating=False)
    hook.prepare([PROMPT])
    params = params_for(text_cond)
    assert hook.apply(params)
    out = params.text_cond
    assert out is not text_cond and torch.equal(text_cond["crossattn"], frozen) and out["vector"] is vector
    assert torch.equal(out["crossattn"][0], torch.cat([want1.rows, want2.rows], dim=-1))
    assert "te1" in hook.describe([PROMPT])
    with pytest.raises(SteeringError, match="channels"):
        hook.apply(params_for({"crossattn": torch.randn(1, 77, 80), "vector": vector}))


def test_controlnet_marker_row_is_kept_and_odd_layouts_fail_closed(clips):
    tok, (model, _) = clips
    rows, ref = core(tok, model, PROMPT, ["nude"], svf=None)
    hook = SteeringHook(find_encoders(sd1(tok, model)), ["nude"], self_validating=False)
    hook.prepare([PROMPT])
    marked = torch.cat([torch.full((1, 64), 1024.0), rows])[None]
    params = params_for(marked)
    assert hook.apply(params)
    assert torch.equal(params.text_cond[0, 0], marked[0, 0]) and torch.equal(params.text_cond[0, 1:], ref.rows)
    with pytest.raises(SteeringError, match="not whole 77-token chunks"):
        hook.apply(params_for(torch.cat([torch.zeros(1, 2, 64), rows[None]], dim=1)))


def test_unsupported_encoders_and_textual_inversion_fail_closed(clips):
    tok, (model, _) = clips
    with pytest.raises(SteeringError, match="does not support this model's text encoder"):
        find_encoders(SimpleNamespace(cond_stage_model=torch.nn.Identity()))
    with pytest.raises(SteeringError, match="FrozenT5"):
        FrozenT5 = type("FrozenT5", (), {"input_key": "txt"})
        find_encoders(SimpleNamespace(conditioner=SimpleNamespace(embedders=[FrozenT5()])))

    class WithEmbedding(HFClipEngine):      # a chunk carrying a textual-inversion fix
        def tokenize_line(self, line):
            chunks, n = super().tokenize_line(line)
            chunks[0].fixes = [(2, "embedding")]
            return chunks, n

    enc = Encoder("te", WithEmbedding(model, tok))
    with pytest.raises(SteeringError, match="textual-inversion"):
        enc.encode([c for c, _ in enc.chunks("a photo")], [f for _, f in enc.chunks("a photo")])
    # The webui's engines hold the fixes on their hijack (A1111) / embedding database (Forge).
    seen = []

    class Hijacked(HFClipEngine):
        hijack = SimpleNamespace(fixes=None)

        def encode_with_transformers(self, tokens):
            seen.append(self.hijack.fixes)
            return super().encode_with_transformers(tokens)

    Encoder("te", Hijacked(model, tok)).encode([ids_of(tok, "a photo")] * 2, [[(2, "e")], [(2, "e")]])
    assert seen == [[[(2, "e")], [(2, "e")]]]


def test_unprepared_hook_and_candidate_texts_outside_the_webui(clips):
    tok, (model, _) = clips
    hook = SteeringHook(find_encoders(sd1(tok, model)), ["nude"])
    with pytest.raises(SteeringError, match="not prepared"):
        hook.apply(params_for(torch.zeros(1, 77, 64)))
    assert candidate_texts(["a", "b", "a"], [20]) == ["a", "b"]


def test_candidate_texts_use_the_webui_prompt_parser(monkeypatch):
    """AND sub-prompts and schedule variants come from the webui's own parser (stubbed here)."""
    import types

    calls = []
    parser = types.ModuleType("modules.prompt_parser")
    parser.get_multicond_prompt_list = lambda prompts: (None, [t.strip() for p in prompts for t in p.split(" AND ")],
                                                        None)
    modules = types.ModuleType("modules")
    modules.prompt_parser = parser
    monkeypatch.setitem(sys.modules, "modules", modules)
    monkeypatch.setitem(sys.modules, "modules.prompt_parser", parser)
    assert candidate_texts(["a [cat:dog:0.5] AND b"], [20]) == ["a [cat:dog:0.5]", "b"]   # no schedule parser

    def schedules(prompts, steps):
        calls.append(steps)
        return [[[steps // 2, p.replace("[cat:dog:0.5]", "cat")], [steps, p.replace("[cat:dog:0.5]", "dog")]]
                for p in prompts]

    parser.get_learned_conditioning_prompt_schedules = schedules
    assert candidate_texts(["a [cat:dog:0.5] AND b"], [20, 20]) == ["a cat", "a dog", "b"]
    assert calls == [20]
