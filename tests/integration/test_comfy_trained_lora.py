"""A LoRA trained with safet2i.train's layers, saved by save_lora, loaded in a real ComfyUI.

The LoRA is injected into a diffusers UNet2DConditionModel with the layout of the tiny
SD1.x-layout checkpoint (make_tiny_sd15.py: model_channels 320, one level with one res block
and one transformer block, context 768, 8 heads), so ComfyUI's own diffusers → LDM key map
resolves its module names: 4 transformer blocks (down, mid, two up) × 8 attention projections
(the "attention" preset) = 32 targets. ComfyUI's patched weights are compared with
base + (alpha/rank)·B·A computed here in float64 from the live layers' parameters.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from safet2i.lora.arch import unet_modules

from .test_comfy_guidance import run_ok
from .test_comfy_lora import TINY, ours, patch_graph, patched, report, stock

pytestmark = pytest.mark.integration

RANK, ALPHA = 4, 2.0


def tiny_diffusers_unet():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(320,),
        down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",), cross_attention_dim=768,
        attention_head_dim=8, norm_num_groups=32,
    ).eval()


def attention_names(unet) -> list[str]:
    out = []
    for n, m in unet.named_modules():
        parts = n.split(".")
        if isinstance(m, torch.nn.Linear) and ((len(parts) > 1 and parts[-2] in ("attn1", "attn2")
                                                and parts[-1] in ("to_q", "to_k", "to_v"))
                                               or (len(parts) > 2 and parts[-3] in ("attn1", "attn2")
                                                   and parts[-2:] == ["to_out", "0"])):
            out.append(n)
    return sorted(out)


@pytest.fixture(scope="module")
def trained(comfy):
    from safet2i.train.lora_layers import inject_lora, lora_metadata, save_lora

    unet = tiny_diffusers_unet()
    names = attention_names(unet)
    assert len(names) == 32
    ldm = {m.diffusers: m.ldm for m in unet_modules(TINY)}
    assert set(names) <= set(ldm)            # the diffusers layout is the checkpoint's
    lset = inject_lora(unet, targets="attention", rank=RANK, alpha=ALPHA, seed=3)
    assert list(lset.modules) == names
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for m in lset.modules.values():
            m.up.copy_(torch.randn(m.up.shape, generator=g) * 0.1)
    meta = lora_metadata(method="test", base_model="tiny_sd15", base_sha256="0" * 64,
                         hyper={"rank": RANK, "alpha": ALPHA}, data_sha256="1" * 64, arch="sd1")
    files = {fmt: save_lora(lset, comfy.base / "loras" / f"trained_tiny_{fmt}.safetensors", fmt=fmt, metadata=meta)
             for fmt in ("kohya", "peft")}
    deltas = {f"diffusion_model.{ldm[n]}.weight": (ALPHA / RANK) * (m.up.detach().double() @ m.down.detach().double())
              for n, m in lset.modules.items()}
    return files, deltas


def _check_weights(comfy, name: str, deltas: dict) -> None:
    dump = load_file(str(comfy.output_dir / f"{name}.safetensors"))
    for key, delta in deltas.items():
        want = dump[f"unet/base/{key}"].double() + delta
        np.testing.assert_allclose(dump[f"unet/patched/{key}"].double().numpy(), want.numpy(), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_trained_lora_is_fully_patched_by_our_loader(comfy, tiny_checkpoint, trained, fmt):
    files, deltas = trained
    entry = run_ok(comfy, patch_graph(tiny_checkpoint, ours(files[fmt].name), f"trained_{fmt}"))
    keys = patched(entry)
    assert keys["unet"] == sorted(deltas) and keys["clip"] == []          # every target, nothing else
    rep = report(entry)
    assert rep["matched"] == rep["targets"] == rep["applied"] == 32 and rep["unmatched"] == []
    assert rep["scales"] == ([ALPHA / RANK] if fmt == "kohya" else [1.0])
    assert {w["status"] for w in rep["weights"]} == {"matched"} and sorted(w["host"] for w in rep["weights"]) == keys["unet"]
    _check_weights(comfy, f"trained_{fmt}", deltas)


def test_trained_kohya_lora_is_fully_patched_by_the_stock_loader(comfy, tiny_checkpoint, trained):
    files, deltas = trained
    entry = run_ok(comfy, patch_graph(tiny_checkpoint, stock(files["kohya"].name), "trained_stock"))
    assert patched(entry)["unet"] == sorted(deltas)
    _check_weights(comfy, "trained_stock", deltas)
    # the PEFT-key file is for diffusers and SafeT2I's node: the stock loader skips its UNet keys
    # (why save_lora's default format is kohya)
    entry = run_ok(comfy, patch_graph(tiny_checkpoint, stock(files["peft"].name), "trained_stock_peft"))
    assert patched(entry)["unet"] == []
