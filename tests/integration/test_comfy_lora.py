"""Model layer in a real ComfyUI: safety LoRAs in real release layouts and full safety weights.

The tiny SD1.x-layout checkpoint has one UNet level (model_channels 320, one res block) with
4 transformer blocks (down, mid, two up), i.e. 16 self-attention weights for a DUO-style file.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from safet2i.lora.arch import UNetConfig, unet_modules

from .test_comfy_guidance import images, run_ok

pytestmark = pytest.mark.integration

TINY = UNetConfig(block_out_channels=(320,), attention_levels=(True,), transformer_depth=(1,), mid_depth=1,
                  layers_per_block=1, cross_attention_dim=768)
ATTN1 = [m for m in unet_modules(TINY) if ".attn1." in m.diffusers]


def duo_file(path, rank=32, seed=0, extra: dict | None = None):
    """DUO's released layout: ``unet.<diffusers path>.attn1.to_q.lora.down.weight``, no alpha."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for m in ATTN1:
        sd[f"unet.{m.diffusers}.lora.down.weight"] = torch.randn(rank, m.shape[1], generator=g) * 0.1
        sd[f"unet.{m.diffusers}.lora.up.weight"] = torch.randn(m.shape[0], rank, generator=g) * 0.1
    sd.update(extra or {})
    save_file(sd, str(path))
    return sd


def patch_graph(ckpt, loader: dict, name="patches", sample=False):
    g = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}, "2": loader,
         "3": {"class_type": "SafeT2ITestDumpPatches", "inputs": {"model": ["2", 0], "clip": ["2", 1], "name": name}}}
    if loader["class_type"].startswith("SafeT2I"):
        g["4"] = {"class_type": "PreviewAny", "inputs": {"source": ["2", 2]}}
    if sample:
        g.update({
            "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": "a woman on a beach"}},
            "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": ""}},
            "7": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "8": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "positive": ["5", 0], "negative": ["6", 0],
                                                       "latent_image": ["7", 0], "seed": 3, "steps": 4, "cfg": 5.0,
                                                       "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
            "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 2]}},
            "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": name}},
        })
    return g


def ours(name, strength_model=1.0, strength_clip=1.0, allow_partial=False):
    return {"class_type": "SafeT2ILoadSafetyLoRA", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "lora_name": name, "strength_model": strength_model,
        "strength_clip": strength_clip, "allow_partial": allow_partial}}


def stock(name):
    return {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": name,
                                                   "strength_model": 1.0, "strength_clip": 1.0}}


def patched(entry):
    return json.loads(entry["outputs"]["3"]["text"][0])


def report(entry):
    return json.loads(entry["outputs"]["4"]["text"][0])


def error_text(entry) -> str:
    assert entry["status"]["status_str"] == "error"
    return json.dumps(entry["status"]["messages"])


def test_duo_layout_is_fully_patched_where_the_stock_loader_patches_nothing(comfy, tiny_checkpoint):
    sd = duo_file(comfy.base / "loras" / "duo_tiny.safetensors")
    stock_entry = run_ok(comfy, patch_graph(tiny_checkpoint, stock("duo_tiny.safetensors"), "stock", sample=True))
    assert patched(stock_entry)["unet"] == []            # the silent failure users never see
    assert "lora key not loaded" in comfy.log.read_text()

    entry = run_ok(comfy, patch_graph(tiny_checkpoint, ours("duo_tiny.safetensors"), "ours", sample=True))
    expected = sorted(f"diffusion_model.{m.ldm}.weight" for m in ATTN1)
    assert len(expected) == 4 * 4
    assert patched(entry)["unet"] == expected            # exactly the 4×N self-attention weights, nothing else
    rep = report(entry)
    assert rep["matched"] == rep["targets"] == rep["applied"] == 16 and rep["unmatched"] == []
    assert rep["formats"] == ["diffusers"] and rep["scales"] == [1.0]
    assert sorted(w["host"] for w in rep["weights"]) == expected and {w["status"] for w in rep["weights"]} == {"matched"}

    dump = load_file(str(comfy.output_dir / "ours.safetensors"))
    for m in ATTN1:
        key = f"diffusion_model.{m.ldm}.weight"
        base = dump[f"unet/base/{key}"].double().numpy()
        want = base + (sd[f"unet.{m.diffusers}.lora.up.weight"].double().numpy()
                       @ sd[f"unet.{m.diffusers}.lora.down.weight"].double().numpy())
        np.testing.assert_allclose(dump[f"unet/patched/{key}"].double().numpy(), want, atol=2e-5, rtol=1e-5)

    plain = run_ok(comfy, patch_graph(tiny_checkpoint, {"class_type": "LoraLoader", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "lora_name": "duo_tiny.safetensors", "strength_model": 0.0,
        "strength_clip": 0.0}}, "plain", sample=True))
    assert np.abs(images(comfy, stock_entry)[0] - images(comfy, plain)[0]).max() == 0   # stock: no effect at all
    assert np.abs(images(comfy, entry)[0] - images(comfy, plain)[0]).max() > 3          # ours: the image changes


def test_kohya_ldm_names_with_alpha_and_text_encoder_keys(comfy, tiny_checkpoint):
    g = torch.Generator().manual_seed(1)
    sd, rank, alpha = {}, 4, 2.0
    attn2 = [m for m in unet_modules(TINY) if ".attn2.to_k" in m.diffusers or ".attn2.to_v" in m.diffusers]
    for m in attn2:
        k = "lora_unet_" + m.ldm.replace(".", "_")
        sd[k + ".lora_down.weight"] = torch.randn(rank, m.shape[1], generator=g) * 0.1
        sd[k + ".lora_up.weight"] = torch.randn(m.shape[0], rank, generator=g) * 0.1
        sd[k + ".alpha"] = torch.tensor(alpha)
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    sd[te + ".lora_down.weight"] = torch.randn(rank, 768, generator=g) * 0.1
    sd[te + ".lora_up.weight"] = torch.randn(768, rank, generator=g) * 0.1
    sd[te + ".alpha"] = torch.tensor(alpha)
    save_file(sd, str(comfy.base / "safety_models" / "kohya_ldm.safetensors"))
    entry = run_ok(comfy, patch_graph(tiny_checkpoint, ours("kohya_ldm.safetensors", 0.5, 2.0), "kohya"))
    keys = patched(entry)
    assert keys["unet"] == sorted(f"diffusion_model.{m.ldm}.weight" for m in attn2)
    assert len(keys["clip"]) == 1 and keys["clip"][0].endswith("text_model.encoder.layers.0.self_attn.q_proj.weight")
    rep = report(entry)
    assert rep["scales"] == [0.5] and rep["by_component"] == {"unet": {"matched": 8, "targets": 8},
                                                             "te1": {"matched": 1, "targets": 1}}
    dump = load_file(str(comfy.output_dir / "kohya.safetensors"))
    for m in attn2[:2]:
        key = f"diffusion_model.{m.ldm}.weight"
        k = "lora_unet_" + m.ldm.replace(".", "_")
        delta = sd[k + ".lora_up.weight"].double() @ sd[k + ".lora_down.weight"].double() * (alpha / rank)
        want = dump[f"unet/base/{key}"].double() + 0.5 * delta
        torch.testing.assert_close(dump[f"unet/patched/{key}"].double(), want, atol=2e-5, rtol=1e-5)
    ck = keys["clip"][0]
    delta = sd[te + ".lora_up.weight"].double() @ sd[te + ".lora_down.weight"].double() * (alpha / rank)
    torch.testing.assert_close(dump[f"clip/patched/{ck}"].double(), dump[f"clip/base/{ck}"].double() + 2.0 * delta,
                               atol=2e-5, rtol=1e-5)


def test_wrong_architecture_partial_files_and_pickles_fail_clearly(comfy, tiny_checkpoint):
    g = torch.Generator().manual_seed(2)
    sdxl = {"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora.down.weight": torch.randn(4, 2048, generator=g),
            "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora.up.weight": torch.randn(640, 4, generator=g)}
    save_file(sdxl, str(comfy.base / "loras" / "sdxl_only.safetensors"))
    # it fits SDXL completely and the model is SD1.x: refused by its shapes, also with allow_partial
    for partial in (False, True):
        text = error_text(comfy.run(patch_graph(tiny_checkpoint, ours("sdxl_only.safetensors", allow_partial=partial),
                                                "x")))
        assert "is made for SDXL" in text and "the model is SD1.x" in text and "even with allow_partial" in text, text

    bogus = "unet.up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_q"
    duo_file(comfy.base / "loras" / "duo_partial.safetensors", rank=4, extra={
        bogus + ".lora.down.weight": torch.randn(4, 320, generator=g), bogus + ".lora.up.weight": torch.randn(320, 4, generator=g)})
    text = error_text(comfy.run(patch_graph(tiny_checkpoint, ours("duo_partial.safetensors"), "x")))
    assert "only 16 of its 17" in text and bogus in text and "allow_partial" in text
    entry = run_ok(comfy, patch_graph(tiny_checkpoint, ours("duo_partial.safetensors", allow_partial=True), "partial"))
    rep = report(entry)
    assert rep["matched"] == 16 and rep["applied"] == 16 and rep["unmatched"][0]["key"].startswith(bogus)
    assert "PARTIAL" in "\n".join(entry["outputs"]["2"]["text"])

    # a generic release name (DUO's gun.safetensors) on other contents: loaded as an unknown file,
    # the preview text says which name would have it checked against the manifest
    duo_file(comfy.base / "loras" / "gun.safetensors", rank=4, seed=5)
    entry = run_ok(comfy, patch_graph(tiny_checkpoint, ours("gun.safetensors"), "gun"))
    assert report(entry)["manifest"] is None
    assert "rename it to duo_violence_gun.safetensors" in "\n".join(entry["outputs"]["2"]["text"])

    torch.save({"w": torch.zeros(2)}, comfy.base / "safety_models" / "old.ckpt")
    text = error_text(comfy.run(patch_graph(tiny_checkpoint, ours("old.ckpt"), "x")))
    assert "safet2i convert" in text and "pickled" in text
    text = error_text(comfy.run(patch_graph(tiny_checkpoint, ours("../../etc/passwd"), "x")))
    assert "etc/passwd" in text


def _tiny_sd(comfy, tiny_checkpoint):
    return load_file(str(comfy.base / "checkpoints" / tiny_checkpoint))


def full_graph(ckpt, name, out, allow_partial=False):
    g = patch_graph(ckpt, {"class_type": "SafeT2ILoadSafetyWeights", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "weights_name": name, "allow_partial": allow_partial}}, out, sample=True)
    return g


def test_full_unet_weights_in_diffusers_and_ldm_names(comfy, tiny_checkpoint):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    ckpt = _tiny_sd(comfy, tiny_checkpoint)
    g = torch.Generator().manual_seed(4)
    unet = {k: v.float() + 0.02 * torch.randn(v.shape, generator=g) for k, v in ckpt.items()
            if k.startswith("model.diffusion_model.")}
    save_file(unet, str(comfy.base / "safety_models" / "esd_like_ldm.safetensors"))
    config = {"block_out_channels": [320], "layers_per_block": 1, "down_block_types": ["CrossAttnDownBlock2D"],
              "up_block_types": ["CrossAttnUpBlock2D"], "transformer_layers_per_block": 1, "cross_attention_dim": 768,
              "in_channels": 4, "out_channels": 4, "attention_head_dim": 8, "use_linear_projection": False,
              "class_embed_type": None, "addition_embed_type": None}
    diffusers_sd = convert_ldm_unet_checkpoint(dict(unet), config)
    assert diffusers_sd and all(not k.startswith("model.") for k in diffusers_sd)
    save_file({k: v.contiguous() for k, v in diffusers_sd.items()}, str(comfy.base / "safety_models" / "esd_like_diffusers.safetensors"))

    duo_file(comfy.base / "loras" / "duo_tiny.safetensors")
    base = run_ok(comfy, patch_graph(tiny_checkpoint, {"class_type": "LoraLoader", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "lora_name": "duo_tiny.safetensors", "strength_model": 0.0,
        "strength_clip": 0.0}}, "fullbase", sample=True))
    for name in ("esd_like_ldm.safetensors", "esd_like_diffusers.safetensors"):
        out = name.split(".")[0]
        entry = run_ok(comfy, full_graph(tiny_checkpoint, name, out))
        rep = report(entry)
        assert rep["component"] == "unet" and rep["replaced_fraction"] == 1.0 and rep["unmatched"] == []
        assert rep["applied"] == rep["targets"] == len(unet) == rep["host_weights"]
        dump = load_file(str(comfy.output_dir / f"{out}.safetensors"))
        for k, v in list(unet.items())[::25]:
            host = k[len("model."):]
            torch.testing.assert_close(dump[f"unet/patched/{host}"], v.float())
        assert np.abs(images(comfy, entry)[0] - images(comfy, base)[0]).max() > 0


def test_full_text_encoder_weights(comfy, tiny_checkpoint):
    ckpt = _tiny_sd(comfy, tiny_checkpoint)
    prefix = "cond_stage_model.transformer."
    g = torch.Generator().manual_seed(5)
    te = {k[len(prefix):]: v.float() + 0.01 * torch.randn(v.shape, generator=g) for k, v in ckpt.items()
          if k.startswith(prefix + "text_model.") and v.is_floating_point()}  # HF CLIPTextModel keys
    assert te and all(k.startswith("text_model.") for k in te)
    save_file(te, str(comfy.base / "safety_models" / "advunlearn_like.safetensors"))
    entry = run_ok(comfy, full_graph(tiny_checkpoint, "advunlearn_like.safetensors", "te_full"))
    rep = report(entry)
    assert rep["component"] == "text_encoder" and rep["unmatched"] == [] and rep["applied"] == len(te)
    assert rep["replaced_fraction"] > 0.99
    assert len(patched(entry)["clip"]) == len(te) and patched(entry)["unet"] == []
    dump = load_file(str(comfy.output_dir / "te_full.safetensors"))
    for host in patched(entry)["clip"]:
        hf = "text_model." + host.split("text_model.", 1)[1]
        torch.testing.assert_close(dump[f"clip/patched/{host}"], te[hf])


def test_cli_kohya_conversion_is_loaded_fully_by_the_stock_loader(comfy, tiny_checkpoint, tmp_path):
    from safet2i.cli import main

    src = tmp_path / "duo_tiny.safetensors"
    duo_file(src)
    out = comfy.base / "loras" / "duo_tiny_kohya.safetensors"
    # the tiny file patches 4 of SD1's 16 attention weights: no real architecture fits it, so
    # converting it needs --allow-unknown (issue 14: a converter never launders a refusal)
    assert main(["lora", "convert", str(src), "--to", "kohya", "--out", str(out)]) == 4
    assert not out.exists()
    assert main(["lora", "convert", str(src), "--to", "kohya", "--out", str(out), "--allow-unknown"]) == 0
    assert main(["lora", "convert", str(src), "--to", "kohya", "--out", str(out), "--allow-unknown"]) == 4  # never overwrites
    entry = run_ok(comfy, patch_graph(tiny_checkpoint, stock("duo_tiny_kohya.safetensors"), "stock_kohya"))
    assert patched(entry)["unet"] == sorted(f"diffusion_model.{m.ldm}.weight" for m in ATTN1)
    ours_entry = run_ok(comfy, patch_graph(tiny_checkpoint, ours("duo_tiny_kohya.safetensors"), "ours_kohya"))
    a = load_file(str(comfy.output_dir / "stock_kohya.safetensors"))
    b = load_file(str(comfy.output_dir / "ours_kohya.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert report(ours_entry)["formats"] == ["kohya"]


def _chain_graph(ckpt, first: dict, second_name: str, name: str):
    g = patch_graph(ckpt, first, name)
    g["12"] = {"class_type": "SafeT2ILoadSafetyLoRA", "inputs": {
        "model": ["2", 0], "clip": ["2", 1], "lora_name": second_name, "strength_model": 1.0, "strength_clip": 1.0,
        "allow_partial": False}}
    g["3"]["inputs"].update(model=["12", 0], clip=["12", 1])
    g["13"] = {"class_type": "PreviewAny", "inputs": {"source": ["12", 2]}}
    return g


def test_chained_loras_on_the_same_weights_each_prove_their_own_patches(comfy, tiny_checkpoint):
    a = duo_file(comfy.base / "loras" / "chain_a.safetensors", rank=4, seed=7)
    b = duo_file(comfy.base / "loras" / "chain_b.safetensors", rank=8, seed=8)
    for first in (ours("chain_a.safetensors"), stock("chain_a.safetensors")):
        if first["class_type"] == "LoraLoader":   # the stock loader patches nothing of DUO's keys: use kohya names
            from safet2i.lora import load_lora, to_kohya
            save_file(to_kohya(load_lora(comfy.base / "loras" / "chain_a.safetensors").targets),
                      str(comfy.base / "loras" / "chain_a_kohya.safetensors"))
            first = stock("chain_a_kohya.safetensors")
        entry = run_ok(comfy, _chain_graph(tiny_checkpoint, first, "chain_b.safetensors", "chain"))
        second = json.loads(entry["outputs"]["13"]["text"][0])
        assert second["applied"] == second["matched"] == 16 and second["host_arch"] == "sd1"
        dump = load_file(str(comfy.output_dir / "chain.safetensors"))
        assert patched(entry)["unet"] == sorted(f"diffusion_model.{m.ldm}.weight" for m in ATTN1)
        for m in ATTN1:
            key = f"diffusion_model.{m.ldm}.weight"
            want = dump[f"unet/base/{key}"].double()
            for sd in (a, b):
                want = want + sd[f"unet.{m.diffusers}.lora.up.weight"].double() @ sd[f"unet.{m.diffusers}.lora.down.weight"].double()
            torch.testing.assert_close(dump[f"unet/patched/{key}"].double(), want, atol=2e-5, rtol=1e-5)


def test_negative_or_zero_strengths_are_refused(comfy, tiny_checkpoint):
    duo_file(comfy.base / "loras" / "duo_strength.safetensors", rank=4)
    text = error_text(comfy.run(patch_graph(tiny_checkpoint, ours("duo_strength.safetensors", -1.0), "x")))
    assert "strength_model = -1.0 is negative" in text and "INVERTS" in text
    text = error_text(comfy.run(patch_graph(tiny_checkpoint, ours("duo_strength.safetensors", 0.0), "x")))
    assert "strength_model = 0 switches off its 16 UNet patches" in text
    text = error_text(comfy.run(patch_graph(tiny_checkpoint, ours("duo_strength.safetensors", 1.0, -0.5), "x")))
    assert "strength_clip = -0.5 is negative" in text
    entry = run_ok(comfy, patch_graph(tiny_checkpoint, ours("duo_strength.safetensors", 1.0, 0.0), "zero_clip"))
    assert report(entry)["applied"] == 16          # no text-encoder weights in the file: clip 0 is fine
    g = torch.Generator().manual_seed(9)
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    save_file({te + ".lora_down.weight": torch.randn(2, 768, generator=g), te + ".lora_up.weight": torch.randn(768, 2, generator=g)},
              str(comfy.base / "loras" / "te_only.safetensors"))
    text = error_text(comfy.run(patch_graph(tiny_checkpoint, ours("te_only.safetensors", 1.0, 0.0), "x")))
    assert "strength_clip = 0 switches off its 1 text-encoder patches" in text


def _transformers_clip_l_keys() -> list[str]:
    """Keys of a transformers CLIPTextModel with CLIP-L's config (built on the meta device): the layout
    AdvUnlearn's text encoder is released in."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=77, projection_dim=768)
    with torch.device("meta"):
        model = CLIPTextModel(cfg)
    return list(model.state_dict())


def test_advunlearn_text_encoder_as_released_replaces_100_percent(comfy, tiny_checkpoint):
    """AdvUnlearn's text encoder is a transformers CLIPTextModel file: no text_projection (ComfyUI's CLIP-L
    has one) and, from transformers < 4.31, a position_ids buffer. Laid out as transformers writes it
    (key set from the installed transformers' CLIPTextModel), named as the manifest expects."""
    ckpt = _tiny_sd(comfy, tiny_checkpoint)
    v5 = [k for k in _transformers_clip_l_keys() if not k.endswith("position_ids")]
    keys = [k if k.startswith("text_model.") else "text_model." + k for k in v5]   # transformers 4.x files
    assert len(keys) == 196
    prefix = "cond_stage_model.transformer."
    assert all(prefix + k in ckpt for k in keys)
    assert prefix + "text_projection.weight" in ckpt and "text_projection.weight" not in keys  # host-only weight
    g = torch.Generator().manual_seed(6)
    te = {k: ckpt[prefix + k].float() + 0.01 * torch.randn(ckpt[prefix + k].shape, generator=g) for k in keys}
    old = dict(te, **{"text_model.embeddings.position_ids": torch.arange(77, dtype=torch.int64)[None]})
    new = {k[len("text_model."):]: v for k, v in te.items()} if not v5[0].startswith("text_model.") else dict(te)
    cases = [("advunlearn_nudity_text_encoder.safetensors", te, [], "advunlearn-nudity"),
             ("AdvUnlearn-nudity.safetensors", old, ["text_model.embeddings.position_ids"], "advunlearn-nudity"),
             ("advunlearn_saved_by_transformers5.safetensors", new, [], None)]
    for name, sd, ignored, entry_name in cases:
        save_file(sd, str(comfy.base / "safety_models" / name))
        entry = run_ok(comfy, full_graph(tiny_checkpoint, name, "adv"))
        rep = report(entry)
        assert rep["manifest"] == entry_name and rep["manifest_check"] == ("unverified" if entry_name else "unknown")
        assert rep["replaced_fraction"] == 1.0 and rep["host_weights"] == len(keys) == rep["applied"], rep
        assert rep["ignored"] == ignored and rep["unmatched"] == [] and rep["host_arch"] == "sd1"
        dump = load_file(str(comfy.output_dir / "adv.safetensors"))
        assert len(patched(entry)["clip"]) == len(keys)
        for host in patched(entry)["clip"]:
            torch.testing.assert_close(dump[f"clip/patched/{host}"], te["text_model." + host.split("text_model.", 1)[1]])
    # a file missing a layer under the release's name is refused by the manifest's min_coverage
    (comfy.base / "safety_models" / "short").mkdir()
    short = {k: v for k, v in te.items() if ".layers.11." not in k}
    save_file(short, str(comfy.base / "safety_models" / "short" / "advunlearn_nudity_text_encoder.safetensors"))
    text = error_text(comfy.run(full_graph(tiny_checkpoint, "short/advunlearn_nudity_text_encoder.safetensors", "adv2")))
    assert "named like 'advunlearn-nudity'" in text and "expected 100%" in text
    # the same file under no release's name: refused as a partial file (the core's whole-part rule,
    # as in A1111), unless allow_partial, which loads it and reports what was left as it was
    save_file(short, str(comfy.base / "safety_models" / "short_unnamed.safetensors"))
    text = error_text(comfy.run(full_graph(tiny_checkpoint, "short_unnamed.safetensors", "adv3")))
    assert "partial file" in text and "allow_partial" in text and "layers.11." in text
    entry = run_ok(comfy, full_graph(tiny_checkpoint, "short_unnamed.safetensors", "adv4", allow_partial=True))
    rep = report(entry)
    assert rep["applied"] == len(short) and len(rep["missing"]) == len(keys) - len(short) and rep["allow_partial"]
    assert rep["replaced_fraction"] < 1.0 and "PARTIAL" in "\n".join(entry["outputs"]["2"]["text"])
