"""Wan 2.2 A14B's two experts in diffusers: ``load_safety_lora(..., expert="transformer_2")``.

A tiny WanPipeline with ``transformer_2`` and ``boundary_ratio`` (Wan 2.2's layout) is built from
``tiny_families.tiny_wan``'s pieces plus a second ``WanTransformer3DModel`` of the same config.
References: the real module tree (names and shapes of every Linear), ΔW = B·A computed here in
float64 from the file's own tensors, and the weights before loading (bit for bit).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lora_fixtures import dit_linear_shapes, make_factors, write_dit_layout
from safet2i.errors import SafeT2IError
from safet2i.lora import CoverageError


@pytest.fixture(scope="module")
def wan22(tmp_path_factory):
    import tiny_families as tf
    from diffusers import WanPipeline, WanTransformer3DModel

    base = tf.tiny_wan(tmp_path_factory.mktemp("wan22"))
    torch.manual_seed(1)
    low = WanTransformer3DModel.from_config(base.transformer.config).eval()
    pipe = WanPipeline(tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae,
                       scheduler=base.scheduler, transformer=base.transformer, transformer_2=low, boundary_ratio=0.875)
    pipe.set_progress_bar_config(disable=True)
    return pipe, base


def _params(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _peft(path, model, seed):
    shapes = {n: s for n, s in dit_linear_shapes(model).items() if len(s) == 2}
    factors = make_factors(shapes, rank=2, seed=seed, std=0.05)
    save_file(write_dit_layout(factors, "peft-transformer"), str(path))
    return {f.name: f.delta64() for f in factors}


def _check(after, before, truth, strength):
    for n, v in after.items():
        mod = n[:-len(".weight")]
        if n.endswith(".weight") and mod in truth:
            np.testing.assert_allclose(v.double().numpy(), before[n].double().numpy() + strength * truth[mod],
                                       atol=2e-6, rtol=1e-6, err_msg=n)
        else:
            assert torch.equal(v, before[n]), n


def _video(pipe):
    return pipe("a cat walking", height=32, width=32, num_frames=5, num_inference_steps=2, guidance_scale=1.0,
                output_type="np", generator=torch.Generator().manual_seed(0)).frames[0]


def test_each_expert_gets_its_own_lora_and_undo_restores(wan22, tmp_path):
    from safet2i.diffusers_adapter import load_safety_lora

    pipe, _ = wan22
    hi0, lo0 = _params(pipe.transformer), _params(pipe.transformer_2)
    plain = _video(pipe)
    truth_hi = _peft(tmp_path / "high.safetensors", pipe.transformer, seed=3)
    truth_lo = _peft(tmp_path / "low.safetensors", pipe.transformer_2, seed=4)
    h_hi = load_safety_lora(pipe, tmp_path / "high.safetensors", strength=0.8)          # default: transformer
    try:
        _check(_params(pipe.transformer), hi0, truth_hi, 0.8)
        assert all(torch.equal(v, lo0[n]) for n, v in _params(pipe.transformer_2).items())   # untouched
        hi1 = _params(pipe.transformer)
        only_hi = _video(pipe)
        h_lo = load_safety_lora(pipe, tmp_path / "low.safetensors", strength=0.5, expert="transformer_2")
        try:
            assert h_lo.coverage.host == "WanPipeline.transformer_2" and not h_lo.coverage.unmatched
            assert len(h_lo.coverage.applied) == len(truth_lo)
            _check(_params(pipe.transformer_2), lo0, truth_lo, 0.5)
            assert all(torch.equal(v, hi1[n]) for n, v in _params(pipe.transformer).items())
            # the pipeline samples its second step with the patched low-noise expert
            assert np.abs(_video(pipe) - only_hi).max() > 1e-3
        finally:
            h_lo.undo()
        assert all(torch.equal(v, lo0[n]) for n, v in _params(pipe.transformer_2).items())
    finally:
        h_hi.undo()
    assert all(torch.equal(v, hi0[n]) for n, v in _params(pipe.transformer).items())
    np.testing.assert_array_equal(_video(pipe), plain)


def test_expert_refusals_change_nothing(wan22, tmp_path):
    from safet2i.diffusers_adapter import load_safety_lora

    pipe, wan21 = wan22
    _peft(tmp_path / "l.safetensors", pipe.transformer_2, seed=5)
    with pytest.raises(SafeT2IError, match="has no transformer_2"):
        load_safety_lora(wan21, tmp_path / "l.safetensors", expert="transformer_2")
    with pytest.raises(SafeT2IError, match="expert must be one of transformer, transformer_2"):
        load_safety_lora(pipe, tmp_path / "l.safetensors", expert="vae")
    # a partial file on the second expert: refused (nothing changes), then loaded with allow_partial
    shapes = {n: s for n, s in dit_linear_shapes(pipe.transformer_2).items() if ".attn1." in n}
    sd = write_dit_layout(make_factors(shapes, seed=6), "peft-transformer")
    g = torch.Generator().manual_seed(7)
    sd["transformer.blocks.9.attn1.to_q.lora_A.weight"] = torch.randn(2, 24, generator=g)   # no block 9 here
    sd["transformer.blocks.9.attn1.to_q.lora_B.weight"] = torch.randn(24, 2, generator=g)
    save_file(sd, str(tmp_path / "p.safetensors"))
    before = _params(pipe.transformer_2)
    with pytest.raises(CoverageError, match=f"only {len(shapes)} of its {len(shapes) + 1}"):
        load_safety_lora(pipe, tmp_path / "p.safetensors", expert="transformer_2")
    assert all(torch.equal(v, before[n]) for n, v in _params(pipe.transformer_2).items())
    h = load_safety_lora(pipe, tmp_path / "p.safetensors", expert="transformer_2", allow_partial=True)
    assert len(h.coverage.applied) == len(shapes)
    h.undo()
    assert all(torch.equal(v, before[n]) for n, v in _params(pipe.transformer_2).items())
