"""Model layer through the diffusers host: tiny SD and SDXL-layout pipelines, real release layouts."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from safet2i.errors import SafeT2IError
from safet2i.lora.arch import UNetConfig, unet_modules

from tiny_diffusers import tiny_sd_pipeline as tiny_pipeline, tiny_sdxl_pipeline


def _weights(pipe):
    """Every parameter of the UNet and of every text encoder (SDXL: text_encoder_2 too)."""
    mods = [("unet", pipe.unet), ("te1", pipe.text_encoder), ("te2", getattr(pipe, "text_encoder_2", None))]
    out = {f"{c}.{n}": p.detach().clone() for c, mod in mods if mod is not None for n, p in mod.named_parameters()}
    assert any(k.startswith("te2.") for k in out) == hasattr(pipe, "text_encoder_2")
    return out


def _lora(pipe, layout: str, rank=4, alpha=None, seed=0):
    """(state dict, {(component, module): (B, A, scale)}) in one of the release layouts."""
    g = torch.Generator().manual_seed(seed)
    mods = unet_modules(UNetConfig.from_diffusers(pipe.unet.config))
    sd, want = {}, {}
    for m in mods:
        if ".attn1." not in m.diffusers and ".attn2.to_k" not in m.diffusers:
            continue
        a = torch.randn(rank, m.shape[1], generator=g) * 0.2
        b = torch.randn(m.shape[0], rank, generator=g) * 0.2
        if layout == "duo":
            stem = f"unet.{m.diffusers}"
            sd[stem + ".lora.down.weight"], sd[stem + ".lora.up.weight"] = a, b
        elif layout == "peft":
            stem = f"base_model.model.{m.diffusers}"
            sd[stem + ".lora_A.weight"], sd[stem + ".lora_B.weight"] = a, b
        elif layout == "kohya-ldm":
            stem = "lora_unet_" + m.ldm.replace(".", "_")
            sd[stem + ".lora_down.weight"], sd[stem + ".lora_up.weight"] = a, b
            if alpha is not None:
                sd[stem + ".alpha"] = torch.tensor(float(alpha))
        want[("unet", m.diffusers)] = (b, a, (alpha / rank) if alpha is not None else 1.0)
    return sd, want


@pytest.mark.parametrize("layout,alpha", [("duo", None), ("peft", None), ("kohya-ldm", 2.0)])
@pytest.mark.parametrize("xl", [False, True], ids=["sd", "sdxl"])
def test_every_target_weight_is_base_plus_scaled_BA_and_nothing_else_changes(tmp_path, layout, alpha, xl):
    from safet2i.diffusers_adapter import load_safety_lora

    pipe = (tiny_sdxl_pipeline if xl else tiny_pipeline)(tmp_path)
    before = _weights(pipe)
    sd, want = _lora(pipe, layout, alpha=alpha)
    save_file(sd, str(tmp_path / "l.safetensors"))
    handle = load_safety_lora(pipe, tmp_path / "l.safetensors", strength=0.7)
    assert len(handle.coverage.applied) == len(want) and not handle.coverage.unmatched
    after = _weights(pipe)
    expected_changed = {f"unet.{mod}.weight" for (_, mod) in want}
    for k, v in after.items():
        if k in expected_changed:
            b, a, scale = want[("unet", k[len("unet."):-len(".weight")])]
            ref = before[k].double() + 0.7 * scale * (b.double() @ a.double())
            torch.testing.assert_close(v.double(), ref, atol=1e-5, rtol=1e-5)
        else:
            assert torch.equal(v, before[k]), k
    handle.undo()
    assert all(torch.equal(v, before[k]) for k, v in _weights(pipe).items())


def test_wrong_architecture_and_partial_files_change_nothing(tmp_path):
    from safet2i.diffusers_adapter import load_safety_lora

    pipe = tiny_pipeline(tmp_path)
    before = _weights(pipe)
    xl = tiny_sdxl_pipeline(tmp_path / "xl")
    sd, _ = _lora(xl, "duo")
    sd = {k: v for k, v in sd.items() if "attn2.to_k" in k}  # SDXL context width: fits no SD weight
    save_file(sd, str(tmp_path / "xl.safetensors"))
    with pytest.raises(SafeT2IError, match="NOTHING|only"):
        load_safety_lora(pipe, tmp_path / "xl.safetensors")
    assert all(torch.equal(v, before[k]) for k, v in _weights(pipe).items())
    sd, want = _lora(pipe, "duo")
    sd["unet.up_blocks.9.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight"] = torch.ones(4, 8)
    sd["unet.up_blocks.9.attentions.0.transformer_blocks.0.attn1.to_q.lora.up.weight"] = torch.ones(8, 4)
    save_file(sd, str(tmp_path / "partial.safetensors"))
    with pytest.raises(SafeT2IError, match=r"up_blocks\.9"):
        load_safety_lora(pipe, tmp_path / "partial.safetensors")
    assert all(torch.equal(v, before[k]) for k, v in _weights(pipe).items())
    handle = load_safety_lora(pipe, tmp_path / "partial.safetensors", allow_partial=True)
    assert len(handle.coverage.applied) == len(want) and len(handle.coverage.unmatched) == 1


def test_sdxl_text_encoder_lora_on_both_encoders(tmp_path):
    """kohya lora_te1_/lora_te2_ keys (q/v projections of every layer, te2's text_projection): each weight
    becomes base + strength·(alpha/r)·B·A, computed here from the file's tensors; nothing else changes."""
    from safet2i.diffusers_adapter import load_safety_lora

    pipe = tiny_sdxl_pipeline(tmp_path)
    before = _weights(pipe)
    g = torch.Generator().manual_seed(5)
    sd, want, rank, alpha = {}, {}, 4, 2.0
    for comp, enc in (("te1", pipe.text_encoder), ("te2", pipe.text_encoder_2)):
        names = [n for n, m in enc.named_modules() if isinstance(m, torch.nn.Linear)
                 and (n.endswith(("q_proj", "v_proj")) or n == "text_projection")]
        assert (comp == "te2") == ("text_projection" in names)
        for n in names:
            w = dict(enc.named_parameters())[n + ".weight"]
            a = torch.randn(rank, w.shape[1], generator=g) * 0.2
            b = torch.randn(w.shape[0], rank, generator=g) * 0.2
            stem = f"lora_{comp}_" + n.replace(".", "_")
            sd[stem + ".lora_down.weight"], sd[stem + ".lora_up.weight"] = a, b
            sd[stem + ".alpha"] = torch.tensor(alpha)
            want[f"{comp}.{n}.weight"] = (b, a)
    assert sum(k.startswith("te1.") for k in want) == 4 and sum(k.startswith("te2.") for k in want) == 5
    save_file(sd, str(tmp_path / "te.safetensors"))
    handle = load_safety_lora(pipe, tmp_path / "te.safetensors", strength=0.5)
    assert len(handle.coverage.applied) == len(want) and not handle.coverage.unmatched
    after = _weights(pipe)
    for k, v in after.items():
        if k in want:
            b, a = want[k]
            ref = before[k].double() + 0.5 * (alpha / rank) * (b.double() @ a.double())
            torch.testing.assert_close(v.double(), ref, atol=1e-6, rtol=1e-6)
            assert not torch.equal(v, before[k])
        else:
            assert torch.equal(v, before[k]), k
    handle.undo()
    assert all(torch.equal(v, before[k]) for k, v in _weights(pipe).items())


@pytest.mark.parametrize("layout", ["kohya", "peft"])
def test_text_encoder_lora_with_standard_names_on_transformers_without_text_model_level(tmp_path, layout):
    """Files name CLIP text-encoder modules ``text_model.encoder...`` (kohya ``lora_te_text_model_...``,
    PEFT ``text_encoder.text_model....``); transformers >= 5 builds ``CLIPTextModel`` without the
    ``text_model`` level. Every such target still lands on its weight: W + B·A."""
    from safet2i.diffusers_adapter import load_safety_lora

    pipe = tiny_pipeline(tmp_path)
    te = pipe.text_encoder
    prefix = "" if hasattr(te, "text_model") else "text_model."
    g = torch.Generator().manual_seed(3)
    sd, want = {}, {}
    for n, m in te.named_modules():
        if not n.endswith(("self_attn.q_proj", "self_attn.v_proj")):
            continue
        std = prefix + n                          # the standard (transformers 4) module name
        a = torch.randn(2, m.in_features, generator=g) * 0.2
        b = torch.randn(m.out_features, 2, generator=g) * 0.2
        if layout == "kohya":
            stem = "lora_te_" + std.replace(".", "_")
            sd[stem + ".lora_down.weight"], sd[stem + ".lora_up.weight"] = a, b
            sd[stem + ".alpha"] = torch.tensor(2.0)
        else:
            stem = "text_encoder." + std
            sd[stem + ".lora_A.weight"], sd[stem + ".lora_B.weight"] = a, b
        want[n] = (m.weight.detach().clone(), b @ a)
    assert len(want) == 4
    save_file(sd, str(tmp_path / "te.safetensors"))
    handle = load_safety_lora(pipe, tmp_path / "te.safetensors")
    assert not handle.coverage.unmatched and len(handle.coverage.applied) == 4
    mods = dict(te.named_modules())
    for n, (w0, delta) in want.items():
        torch.testing.assert_close(mods[n].weight.detach(), w0 + delta, atol=1e-6, rtol=1e-6)
    handle.undo()
    for n, (w0, _) in want.items():
        assert torch.equal(mods[n].weight.detach(), w0)
