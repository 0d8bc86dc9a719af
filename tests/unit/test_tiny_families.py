"""The tiny diffusers fixtures of tiny_families.py: real classes, deterministic, live text path."""

from __future__ import annotations

import numpy as np
import pytest
import tiny_families as tf
import torch

CAT = "a photo of a cat sitting on a chair"
OTHER = "a nude woman standing on the beach at noon"


@pytest.fixture(scope="module")
def pipes(family_pipes):   # the session's seed-0 pipelines (conftest.py)
    return family_pipes


@pytest.mark.parametrize("name", list(tf.FAMILIES))
def test_real_classes_and_declared_widths(pipes, name):
    import diffusers

    fam, pipe = tf.FAMILIES[name], pipes[name]
    assert type(pipe) is getattr(diffusers, fam.pipeline)
    assert type(getattr(pipe, fam.denoiser)).__module__.startswith("diffusers.models.transformers.")
    widths = []
    for enc_attr, tok_attr, _kind, width in fam.encoders:
        enc = getattr(pipe, enc_attr)
        assert type(enc).__module__.startswith("transformers.models."), type(enc)
        cfg = enc.config.get_text_config() if hasattr(enc.config, "get_text_config") else enc.config
        assert getattr(cfg, "hidden_size", None) or cfg.d_model
        assert (getattr(cfg, "d_model", None) or cfg.hidden_size) == width, enc_attr
        assert getattr(pipe, tok_attr) is not None
        widths.append(width)
    assert len(set(widths)) == len(widths), "encoder widths must differ"
    assert pipe.vae.config.get("z_dim", pipe.vae.config.get("latent_channels")) == fam.latent_channels


@pytest.mark.parametrize("name", list(tf.FAMILIES))
def test_runs_deterministic_and_prompt_is_live(pipes, name):
    pipe, fam = pipes[name], tf.FAMILIES[name]
    a = tf.run(pipe, name, CAT, seed=3)
    b = tf.run(pipe, name, CAT, seed=3)
    shape = (1, 5, 32, 32, 3) if fam.output == "frames" else (1, 32, 32, 3)
    assert a.shape == shape and a.dtype == np.float32
    assert np.isfinite(a).all() and 0.0 <= a.min() and a.max() <= 1.0 and a.std() > 1e-3
    assert np.array_equal(a, b), "same seed must give bit-identical output"
    assert np.abs(tf.run(pipe, name, OTHER, seed=3) - a).max() > 1e-3, "the prompt must change the output"
    assert np.abs(tf.run(pipe, name, CAT, seed=4) - a).max() > 1e-3, "the seed must change the output"


def test_fixture_seed_changes_weights(tmp_path):
    a, b = tf.tiny_wan(tmp_path / "a", seed=0), tf.tiny_wan(tmp_path / "b", seed=1)
    wa = next(a.transformer.parameters())
    assert not torch.equal(wa, next(b.transformer.parameters()))
    assert torch.equal(wa, next(tf.tiny_wan(tmp_path / "c", seed=0).transformer.parameters()))


def test_flux_guidance_is_an_embedding_and_true_cfg_needs_a_negative(pipes):
    pipe = pipes["flux"]
    assert pipe.transformer.config.guidance_embeds and tf.FAMILIES["flux"].guidance_embed
    base = tf.run(pipe, "flux", CAT)
    assert np.abs(tf.run(pipe, "flux", CAT, guidance_scale=1.0) - base).max() > 1e-4  # into the embedding
    # true_cfg_scale without a negative prompt is ignored; with one, CFG runs
    assert np.array_equal(tf.run(pipe, "flux", CAT, true_cfg_scale=4.0), base)
    assert np.abs(tf.run(pipe, "flux", CAT, true_cfg_scale=4.0, negative_prompt="blurry") - base).max() > 1e-4


def test_cfg_switches(pipes):
    calls = {}
    for name in ("sd3", "wan", "qwen_image"):
        pipe = pipes[name]
        batches = []

        def record(mod, args, kw, batches=batches):
            batches.append(int((kw["hidden_states"] if "hidden_states" in kw else args[0]).shape[0]))

        hook = pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
        try:
            tf.run(pipe, name, CAT)  # defaults: CFG on
            on = list(batches)
            batches.clear()
            off = {
                "sd3": {"guidance_scale": 1.0},
                "wan": {"guidance_scale": 1.0},
                "qwen_image": {"true_cfg_scale": 1.0},
            }[name]
            tf.run(pipe, name, CAT, **off)
        finally:
            hook.remove()
        calls[name] = (on, batches)
    # SD3 batches cond+uncond together; Wan and Qwen-Image call the transformer twice per step
    assert calls["sd3"] == ([2, 2], [1, 1])
    assert calls["wan"] == ([1, 1, 1, 1], [1, 1])
    assert calls["qwen_image"] == ([1, 1, 1, 1], [1, 1])


def test_qwen_template_prefix_is_dropped_exactly(pipes):
    pipe = pipes["qwen_image"]
    tok = pipe.tokenizer
    ids = tok(pipe.prompt_template_encode.format(CAT)).input_ids
    assert tok.convert_ids_to_tokens(
        ids[pipe.prompt_template_encode_start_idx - 3 : pipe.prompt_template_encode_start_idx]
    ) == ["<|im_start|>", "user", "\u010a"]
    emb, _ = pipe.encode_prompt(CAT, device="cpu")
    assert emb.shape == (1, len(ids) - pipe.prompt_template_encode_start_idx, 24)


def test_t5_tokenizer_layout():
    tok = tf.tiny_t5_tokenizer()
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    ids = tok("A cat").input_ids
    assert ids[-1] == 1 and tok.convert_ids_to_tokens(ids[:-1]) == ["\u2581A", "\u2581c", "a", "t"]


@pytest.mark.parametrize("variant", ["sd35", "flux_schnell"])
def test_variants_run_deterministically(tmp_path, variant):
    if variant == "sd35":
        name, pipe = "sd3", tf.tiny_sd3(tmp_path, seed=0, sd35=True)
        assert pipe.transformer.config.qk_norm == "rms_norm" and pipe.transformer.config.dual_attention_layers
    else:
        name, pipe = "flux", tf.tiny_flux(tmp_path, seed=0, schnell=True)
        assert not pipe.transformer.config.guidance_embeds
    a = tf.run(pipe, name, CAT)
    assert a.shape == (1, 32, 32, 3) and np.array_equal(a, tf.run(pipe, name, CAT))
    assert np.abs(tf.run(pipe, name, OTHER) - a).max() > 1e-3
