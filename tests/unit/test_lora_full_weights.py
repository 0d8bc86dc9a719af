"""Core full-weights rules (``safet2i.lora.full_weights``) shared by the ComfyUI node and the
A1111 extension, on host dicts laid out like each host's: file naming, pairing, the coverage
rule for full text encoders (``position_ids`` ignored, ``text_projection`` counted only when the
file has one) and the whole-part rule with and without ``allow_partial``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from safet2i.lora import load_full_weights
from safet2i.lora import full_weights as core

H = 8


def clip_keys(prefix: str, projection: bool) -> dict[str, torch.Tensor]:
    """A CLIP-L-like text encoder under ``prefix`` (ComfyUI: ``clip_l.transformer.``)."""
    t = {
        "text_model.embeddings.token_embedding.weight": torch.zeros(11, H),
        "text_model.embeddings.position_embedding.weight": torch.zeros(5, H),
        "text_model.encoder.layers.0.self_attn.q_proj.weight": torch.zeros(H, H),
        "text_model.encoder.layers.0.self_attn.q_proj.bias": torch.zeros(H),
        "text_model.final_layer_norm.weight": torch.zeros(H),
    }
    if projection:
        t["text_projection.weight"] = torch.zeros(H, H)
    return {prefix + k: v for k, v in t.items()}


def comfy_clip_host() -> dict[str, torch.Tensor]:
    """ComfyUI's SD1 CLIP state dict: CLIP-L with a text_projection, and a logit_scale outside."""
    return dict(clip_keys("clip_l.transformer.", projection=True), **{"clip_l.logit_scale": torch.zeros(())})


def load(tmp_path: Path, name: str, tensors: dict) -> object:
    f = tmp_path / name
    save_file({k: torch.randn(v.shape) if v.is_floating_point() else v for k, v in tensors.items()}, str(f))
    return load_full_weights(f)


def file_clip(projection: bool, v5: bool = False, position_ids: bool = False) -> dict[str, torch.Tensor]:
    t = clip_keys("", projection)
    if position_ids:
        t["text_model.embeddings.position_ids"] = torch.arange(5)[None]
    if v5:   # transformers 5's CLIPTextModel: no text_model. level (WithProjection keeps it)
        t = {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in t.items()}
    return t


@pytest.mark.parametrize("v5", [False, True])
@pytest.mark.parametrize("position_ids", [False, True])
def test_text_encoder_without_projection_replaces_the_whole_encoder(tmp_path, v5, position_ids):
    fw = load(tmp_path, "te.safetensors", file_clip(False, v5, position_ids))
    assert (fw.component, fw.naming) == ("text_encoder", "hf")
    assert all(k.startswith("text_model.") for k in fw.tensors)
    host = comfy_clip_host()
    p = core.pair(fw, host)
    assert p.prefix == "clip_l.transformer."
    assert p.ignored == (["text_model.embeddings.position_ids"] if position_ids else [])
    assert "clip_l.transformer.text_projection.weight" not in p.required       # a CLIPTextModel file never has it
    assert "clip_l.logit_scale" not in p.required                              # outside the encoder
    rep = core.plan("te", "text_encoder", p.tensors, host, p.pairs, p.required, "host", p.ignored)
    assert rep.missing == [] and rep.fraction == 1.0 and not rep.partial
    core.require_whole(rep)


def test_text_projection_counts_only_when_the_file_has_one(tmp_path):
    host = comfy_clip_host()
    fw = load(tmp_path, "te_proj.safetensors", file_clip(True))
    p = core.pair(fw, host)
    assert "clip_l.transformer.text_projection.weight" in p.required
    assert p.pairs["text_projection.weight"] == "clip_l.transformer.text_projection.weight"
    rep = core.plan("te", "text_encoder", p.tensors, host, p.pairs, p.required, "host")
    assert rep.missing == [] and rep.total == 6
    # the same file less its layer 0: the encoder is not wholly replaced
    short = {k: v for k, v in file_clip(True).items() if ".layers.0." not in k}
    p = core.pair(load(tmp_path, "short.safetensors", short), host)
    rep = core.plan("te", "text_encoder", p.tensors, host, p.pairs, p.required, "host")
    assert len(rep.missing) == 2 and rep.partial
    with pytest.raises(core.WeightsError, match="partial file"):
        core.require_whole(rep)
    core.require_whole(rep, allow_partial=True)


def test_best_prefix_and_wrong_shapes_and_allow_partial(tmp_path):
    host = dict(comfy_clip_host(), **clip_keys("clip_g.transformer.", projection=True))
    host["clip_g.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"] = torch.zeros(H + 1, H)
    fw = load(tmp_path, "te.safetensors", file_clip(False))
    assert core.pair(fw, host).prefix == "clip_l.transformer."    # the prefix where every shape fits
    host = comfy_clip_host()
    del host["clip_l.transformer.text_model.final_layer_norm.weight"]
    wide = dict(file_clip(False), **{"text_model.encoder.layers.0.self_attn.q_proj.weight": torch.zeros(H + 1, H)})
    p = core.pair(load(tmp_path, "wide.safetensors", wide), host)
    with pytest.raises(core.WeightsError, match=r"2 of its 5 tensors match no tensor") as ei:
        core.plan("te", "text_encoder", p.tensors, host, p.pairs, p.required, "host", partial_hint=" hint")
    msg = str(ei.value)
    assert f"shape ({H}, {H}) in the model, ({H + 1}, {H}) in the file" in msg    # named, wrong shape: said so
    assert "final_layer_norm.weight (no such weight in the model)" in msg and msg.endswith(" hint")
    rep = core.plan("te", "text_encoder", p.tensors, host, p.pairs, p.required, "host", allow_partial=True)
    assert rep.partial and len(rep.cov.unmatched) == 2 and len(rep.pairs) == 3
    assert rep.missing == ["clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"]


def test_unet_pairing_under_a_host_prefix(tmp_path):
    ldm = {"input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3), "out.2.weight": torch.zeros(4, 4, 3, 3)}
    host = {"diffusion_model." + k: v for k, v in ldm.items()}
    host["model_sampling.sigmas"] = torch.zeros(3)                 # ComfyUI: outside the UNet part
    fw = load(tmp_path, "u.safetensors", {"model.diffusion_model." + k: v for k, v in ldm.items()})
    assert (fw.component, fw.naming) == ("unet", "ldm")
    p = core.pair(fw, host, unet_prefix="diffusion_model.")
    assert p.pairs == {k: "diffusion_model." + k for k in ldm} and sorted(p.required) == sorted(p.pairs.values())
    diff = {"conv_in.weight": ldm["input_blocks.0.0.weight"], "conv_out.weight": ldm["out.2.weight"]}
    fw = load(tmp_path, "d.safetensors", diff)
    asked = []
    p = core.pair(fw, host, lambda: asked.append(1) or {"conv_in.weight": "input_blocks.0.0.weight"},
                  unet_prefix="diffusion_model.")
    assert asked == [1] and p.pairs == {"conv_in.weight": "diffusion_model.input_blocks.0.0.weight"}
    with pytest.raises(core.WeightsError, match="conv_out.weight"):
        core.plan("u", "unet", p.tensors, host, p.pairs, p.required, "host")
