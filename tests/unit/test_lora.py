"""safet2i.lora: module inventories, key layouts of real LoRA releases, coverage, merging, file safety.

Everything is built from configs (meta-device diffusers/transformers models for full-size
names and shapes, tiny real models for numbers); no downloads.
"""

from __future__ import annotations

import copy
import json
import os
import re
import types

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from safet2i.errors import ModelLoadError, SafeT2IError
from safet2i.lora import load_lora
from safet2i.lora.arch import ARCHITECTURES, TextConfig, UNetConfig, inventory, text_modules, unet_modules
from safet2i.lora.coverage import (
    CoverageError, check, detect_architectures, full_matches, merged, require_full, resolver_for,
)
from safet2i.lora.files import convert_pickle, read_safetensors
from safet2i.lora.keys import LoraFormatError, Target, detect_format, kohya_name, parse, to_diffusers_naming, to_kohya

from lora_fixtures import (
    CLIP_KW, FORMAT_NAMES, LAYOUTS, LDM_NAMED, SDXL_REFINER_KW, TINY_SDXL_UNET_KW, UNET_KW, WRITES_ALPHA, Spec,
    expected_module, hf_text_name, host_resolver, layout_accepts, make_specs, meta_clip, meta_unet,
    meta_unet_named, patchable, shapes, tiny_text_modules, tiny_unet_modules, write_layout,
)

ATTN1 = r".*attn1\.(to_q|to_k|to_v|to_out\.0)"


class Payload:
    """A custom class: torch.load(weights_only=True) must refuse to rebuild it."""

    def __init__(self):
        self.w = torch.ones(2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tiny_diffusers import tiny_components

    c = tiny_components(tmp_path_factory.mktemp("tiny"))
    return c["unet"], c["text_encoder"]


def _sd1_specs(kohya_alpha: float | None = 1.0):
    unet = make_specs(unet_modules(ARCHITECTURES["sd1"].unet), rank=2, seed=1, alpha=kohya_alpha)
    te = make_specs(text_modules(ARCHITECTURES["sd1"].text["te1"]), "te1", rank=2, seed=2, alpha=kohya_alpha)
    return unet + te


@pytest.fixture(scope="module")
def sd1_specs():
    return _sd1_specs()


def _inv(arch, pred=lambda name: True, comp="unet"):
    return [m for name, m in inventory(arch)[comp].items() if pred(name)]


def _snapshot(targets):
    snap = {(t.component, t.module): t for t in targets}
    assert len(snap) == len(targets), "two targets patch the same module"
    return snap


def _same_targets(a: list[Target], b: list[Target]):
    da, db = _snapshot(a), _snapshot(b)
    assert set(da) == set(db)
    for k, ta in da.items():
        tb = db[k]
        assert (ta.naming, ta.rank, ta.scale) == (tb.naming, tb.rank, pytest.approx(tb.scale, rel=1e-12)), k
        assert torch.equal(ta.down, tb.down) and torch.equal(ta.up, tb.up), k
        assert (ta.dora_scale is None) == (tb.dora_scale is None), k
        if ta.dora_scale is not None:
            assert torch.equal(ta.dora_scale, tb.dora_scale) and ta.dora_kind == tb.dora_kind, k


# ============================================================================ 1. inventories

@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_unet_inventory_equals_real_diffusers_unet(arch):
    unet = meta_unet_named(arch)
    real = patchable(unet)
    assert len(real) == {"sd1": 282, "sd2": 282, "sdxl": 794}[arch]
    assert shapes(unet_modules(ARCHITECTURES[arch].unet)) == real
    assert shapes(unet_modules(UNetConfig.from_diffusers(unet.config))) == real
    assert UNetConfig.from_diffusers(unet.config) == ARCHITECTURES[arch].unet
    # attribute-style configs (not a dict) read the same
    ns = types.SimpleNamespace(**dict(unet.config))
    assert UNetConfig.from_diffusers(ns) == ARCHITECTURES[arch].unet
    assert {k: m.shape for k, m in inventory(arch)["unet"].items()} == real


@pytest.mark.parametrize("kw", [SDXL_REFINER_KW, TINY_SDXL_UNET_KW], ids=["sdxl-refiner", "tiny-sdxl"])
def test_unet_inventory_from_diffusers_other_layouts(kw):
    unet = meta_unet(kw)
    assert shapes(unet_modules(UNetConfig.from_diffusers(unet.config))) == patchable(unet)


def test_tiny_unet_and_text_inventory(tiny):
    unet, text = tiny
    assert unet.config.layers_per_block == 1
    assert shapes(tiny_unet_modules(unet)) == patchable(unet)
    real_text = {hf_text_name(n): s for n, s in patchable(text).items()}
    assert shapes(tiny_text_modules(text)) == real_text


@pytest.mark.parametrize("which", list(CLIP_KW))
def test_text_inventory_equals_real_clip(which):
    model = meta_clip(which)
    linears = {hf_text_name(n): m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {n: tuple(m.weight.shape) for n, m in linears.items()} == shapes(text_modules(CLIP_KW[which][2]))
    if which == "openclip-bigg":
        assert linears["text_projection"].bias is None and tuple(linears["text_projection"].weight.shape) == (1280, 1280)
    else:
        assert "text_projection" not in linears
    # and they are the text encoders the named architectures use
    use = {"clip-l": [("sd1", "te1"), ("sdxl", "te1")], "openclip-h": [("sd2", "te1")],
           "openclip-bigg": [("sdxl", "te2")]}[which]
    for arch, comp in use:
        assert ARCHITECTURES[arch].text[comp] == CLIP_KW[which][2]


# ============================================================================ 2. LDM names

@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl", "tiny", "tiny-sdxl"])
def test_ldm_names_agree_with_diffusers_converter(arch, tiny):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet = {"tiny": lambda: tiny[0], "tiny-sdxl": lambda: meta_unet(TINY_SDXL_UNET_KW)}.get(
        arch, lambda: meta_unet_named(arch))()
    mods = unet_modules(UNetConfig.from_diffusers(unet.config))
    ckpt = {}
    for i, m in enumerate(mods):
        ckpt[f"model.diffusion_model.{m.ldm}.weight"] = torch.tensor(float(2 * i))
        ckpt[f"model.diffusion_model.{m.ldm}.bias"] = torch.tensor(float(2 * i + 1))
    assert len({m.ldm for m in mods}) == len(mods)
    out = convert_ldm_unet_checkpoint(ckpt, dict(unet.config))
    wrong = [m.diffusers for i, m in enumerate(mods)
             if m.diffusers + ".weight" not in out or float(out[m.diffusers + ".weight"]) != 2 * i
             or float(out[m.diffusers + ".bias"]) != 2 * i + 1]
    assert wrong == []
    assert len(out) == 2 * len(mods)  # nothing invented, nothing dropped


# ============================================================================ 3. layouts

def _expected_scale(layout, s: Spec):
    return s.scale if layout in WRITES_ALPHA else 1.0


@pytest.mark.parametrize("layout", LAYOUTS)
def test_parse_every_layout_full_size_sd1(layout, sd1_specs):
    specs = [s for s in sd1_specs if layout_accepts(layout, s)]
    sd = write_layout(specs, layout)
    assert detect_format(sd) == FORMAT_NAMES[layout]
    targets = parse(sd)
    assert len(targets) == len(specs)
    by = {(t.component, t.module): t for t in targets}
    inv = inventory("sd1")
    for s in specs:
        module, naming = expected_module(layout, s)
        t = by[(s.component, module)]
        assert t.naming == naming
        assert torch.equal(t.down, s.down) and torch.equal(t.up, s.up)
        assert t.scale == pytest.approx(_expected_scale(layout, s))
        assert t.weight_shape == inv[s.component][s.diffusers].shape
        assert len(t.source_keys) == (3 if layout in WRITES_ALPHA else 2)
    if layout in WRITES_ALPHA:
        assert {t.scale for t in targets} == {0.5}  # alpha 1, rank 2
    # LDM names → diffusers names through the inventory
    to_diffusers_naming(targets, "sd1")
    assert {(t.component, t.module, t.naming) for t in targets} == {(s.component, s.diffusers, "diffusers")
                                                                     for s in specs}
    assert full_matches(targets) == ["sd1"]  # attn2.to_k in=768, conv proj_in, CLIP-L text: SD1 only


@pytest.mark.parametrize("layout", LAYOUTS)
def test_to_kohya_round_trips_every_layout(layout, sd1_specs, tmp_path):
    specs = [s for s in sd1_specs if layout_accepts(layout, s)]
    targets = parse(write_layout(specs, layout))
    kohya = to_kohya(targets)
    assert all(re.match(r"^lora_(unet|te)_[A-Za-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$", k) for k in kohya)
    assert sum(k.endswith(".alpha") for k in kohya) == len(targets)
    save_file(kohya, str(tmp_path / "k.safetensors"))
    back = parse(read_safetensors(tmp_path / "k.safetensors").tensors)
    assert detect_format(kohya) == (["LDM/ComfyUI names", "kohya"] if layout in LDM_NAMED else ["kohya"])
    _same_targets(back, targets)  # same names, naming, tensors, scale (alpha=rank written when absent)
    to_diffusers_naming(back, "sd1")
    to_diffusers_naming(targets, "sd1")
    _same_targets(back, targets)


def test_all_layouts_merge_to_the_same_weights_on_a_tiny_unet(tiny):
    """Every layout of the same weights patches exactly the target weights of a real diffusers UNet
    + CLIP text encoder to W + strength·scale·B·A (float64 reference), and nothing else."""
    unet, text = tiny
    resolve, params = host_resolver(unet, text)
    specs = make_specs(tiny_unet_modules(unet), rank=3, seed=5) + \
        make_specs(tiny_text_modules(text), "te1", rank=3, seed=6)
    strength = 0.7
    results = {}
    for layout in LAYOUTS:
        use = [s for s in specs if layout_accepts(layout, s)]
        targets = parse(write_layout(use, layout))
        cov = check(targets, resolve, "tiny")
        require_full(cov, layout)
        by_target = {s.target: s.host_key for s in cov.statuses}
        host_keys = [by_target[t.name] for t in targets]
        assert sorted(host_keys) == sorted(f"{s.component}.{s.diffusers}" for s in use), layout
        weights = {f"{c}.{n}": w.detach().clone() for c, p in params.items() for n, w in p.items()}
        before = {k: v.clone() for k, v in weights.items()}
        for t, hk in zip(targets, host_keys):
            weights[hk] = merged(weights[hk], t, strength)
        changed = {k for k in weights if not torch.equal(weights[k], before[k])}
        assert changed == set(host_keys), layout
        for s in use:
            hk = f"{s.component}.{s.diffusers}"
            want = before[hk].double().numpy() + strength * s.delta64()
            assert weights[hk].dtype == torch.float32
            np.testing.assert_allclose(weights[hk].double().numpy(), want, rtol=1e-6, atol=1e-6, err_msg=hk)
        results[layout] = {k: weights[k] for k in host_keys}
    first = results["diffusers"]
    for layout, res in results.items():
        for k, v in res.items():
            assert torch.equal(v, first[k]), (layout, k)


@pytest.mark.parametrize("layout", ["kohya", "kohya-ldm"])
def test_kohya_alpha_scale_merges_numerically(tiny, layout):
    unet, _ = tiny
    resolve, params = host_resolver(unet)
    specs = make_specs(tiny_unet_modules(unet), rank=2, seed=9, alpha=3.0)  # scale 1.5
    targets = parse(write_layout(specs, layout))
    assert {t.scale for t in targets} == {1.5}
    for t in targets:
        key, shape = resolve(t)
        s = next(x for x in specs if f"unet.{x.diffusers}" == key)
        w = params["unet"][key.split(".", 1)[1]]
        got = merged(w, t, 0.25).double().numpy()
        np.testing.assert_allclose(got, w.detach().double().numpy() + 0.25 * s.delta64(), rtol=1e-6, atol=1e-7)


def _peft_layers(model):
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def _randomise_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_A" in n or "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif "lora_magnitude_vector" in n:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)


def test_duo_release_layout_from_real_peft_and_diffusers_tiny(tiny, tmp_path):
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    unet = copy.deepcopy(tiny[0])
    # the release's rank (methods.md §3: r = alpha = 32); the tiny UNet's attention width is 64, so 32 fits
    unet.add_adapter(LoraConfig(r=32, lora_alpha=32, init_lora_weights="gaussian", target_modules=ATTN1))
    _randomise_lora(unet, seed=3)
    layers = _peft_layers(unet)
    sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=sd)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    wf = read_safetensors(path)
    assert all(re.match(r"^unet\..*\.attn1\.(to_q|to_k|to_v|to_out\.0)\.lora\.(down|up)\.weight$", k)
               for k in wf.tensors), list(wf.tensors)[:3]
    assert detect_format(wf.tensors) == ["diffusers"]
    targets = parse(wf.tensors)
    attn1 = {m.diffusers: m for m in tiny_unet_modules(tiny[0]) if ".attn1." in m.diffusers}
    assert {t.module for t in targets} == set(attn1) and len(attn1) == 16
    assert all(t.component == "unet" and t.naming == "diffusers" and t.scale == 1.0 and t.rank == 32
               for t in targets)
    for t in targets:
        layer = layers[t.module]
        assert torch.equal(t.down, layer.lora_A["default"].weight) and torch.equal(t.up, layer.lora_B["default"].weight)
        assert not torch.equal(t.up, torch.zeros_like(t.up))
        w = layer.base_layer.weight.detach()
        want = w + layer.get_delta_weight("default")  # PEFT's own effective weight
        torch.testing.assert_close(merged(w, t, 1.0), want, rtol=1e-5, atol=1e-6)
    lf = load_lora(path)
    assert lf.formats == ["diffusers"] and lf.alpha_source == "none (scale 1.0)" and lf.ranks == {32}


def test_duo_release_layout_full_size_sd1(tmp_path):
    """The real DUO pipeline (PEFT on a full-size SD1 UNet, attn1 only, diffusers save) → 64 targets,
    fits SD1 and SD2 (same self-attention shapes), only partly SDXL."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    unet = meta_unet(UNET_KW["sd1"])
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian", target_modules=ATTN1))
    g = torch.Generator().manual_seed(0)
    for name, mod in unet.named_modules():
        if name.endswith(("lora_A.default", "lora_B.default")):
            mod.to_empty(device="cpu")
            with torch.no_grad():
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * 0.05)
    sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=sd)
    lf = load_lora(tmp_path / "pytorch_lora_weights.safetensors")
    assert lf.formats == ["diffusers"] and len(lf.targets) == 64
    assert {t.module for t in lf.targets} == {m.diffusers for m in _inv("sd1", lambda n: ".attn1." in n)}
    assert lf.architectures == ["sd1", "sd2"] and full_matches(lf.targets) == ["sd1", "sd2"]
    require_full(check(lf.targets, resolver_for("sd1"), "sd1"), "duo")
    require_full(check(lf.targets, resolver_for("sd2"), "sd2"), "duo")
    cov = check(lf.targets, resolver_for("sdxl"), "SDXL")
    assert len(cov.matched) == 20
    with pytest.raises(CoverageError, match=r"would patch only 20 of its 64 .*unet\.down_blocks\.0\.attentions"):
        require_full(cov, "duo")
    require_full(cov, "duo", allow_partial=True)


def test_real_peft_adapter_with_adapter_config_alpha(tiny, tmp_path):
    """PeftModel.save_pretrained: base_model.model.<path>.lora_A.weight + adapter_config.json (lora_alpha)."""
    from peft import LoraConfig, get_peft_model

    unet = copy.deepcopy(tiny[0])
    pm = get_peft_model(unet, LoraConfig(r=2, lora_alpha=6, target_modules=r".*attn[12]\.(to_q|to_v)"))
    _randomise_lora(pm, seed=4)
    layers = _peft_layers(pm.base_model.model)
    pm.save_pretrained(str(tmp_path))
    path = tmp_path / "adapter_model.safetensors"
    assert all(k.startswith("base_model.model.") for k in load_file(str(path)))
    assert read_safetensors(path).adapter_config["lora_alpha"] == 6
    lf = load_lora(path)
    assert lf.alpha_source == "adapter_config.json" and {t.scale for t in lf.targets} == {3.0}
    assert {t.module for t in lf.targets} == set(layers)
    for t in lf.targets:
        layer = layers[t.module]
        w = layer.base_layer.weight.detach()
        torch.testing.assert_close(merged(w, t, 1.0), w + layer.get_delta_weight("default"), rtol=1e-5, atol=1e-6)
    # the same file without its adapter_config.json has scale 1
    os.remove(tmp_path / "adapter_config.json")
    assert {t.scale for t in load_lora(path).targets} == {1.0}


def _peft_dora(tiny, tmp_path, target_modules):
    from peft import LoraConfig, get_peft_model

    unet = copy.deepcopy(tiny[0])
    base = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    pm = get_peft_model(unet, LoraConfig(r=2, lora_alpha=6, use_dora=True, target_modules=target_modules))
    _randomise_lora(pm, seed=8)
    pm.save_pretrained(str(tmp_path))
    lf = load_lora(tmp_path / "adapter_model.safetensors")
    fused = pm.merge_and_unload().state_dict()
    return lf, base, fused


def _check_peft_dora(lf, base, fused, n):
    assert "DoRA" in lf.formats and "diffusers-PEFT" in lf.formats
    assert len(lf.targets) == n and all(t.dora_kind == "peft" and t.scale == 3.0 for t in lf.targets)
    changed = {k for k in fused if not torch.equal(fused[k], base[k])}
    assert changed == {t.module + ".weight" for t in lf.targets}
    for t in lf.targets:
        w = base[t.module + ".weight"]
        torch.testing.assert_close(merged(w, t, 1.0), fused[t.module + ".weight"], rtol=1e-5, atol=1e-6)
        # strength: W + s·(m·V/‖V‖ − W), float64 reference
        w64 = w.double().numpy()
        v = w64 + 3.0 * (t.up.double().flatten(1).numpy() @ t.down.double().flatten(1).numpy()).reshape(w64.shape)
        norm = np.sqrt((v.reshape(v.shape[0], -1) ** 2).sum(1)).reshape(-1, *[1] * (v.ndim - 1))
        m = t.dora_scale.double().numpy().reshape(-1, *[1] * (v.ndim - 1))
        np.testing.assert_allclose(merged(w, t, 0.5).double().numpy(), w64 + 0.5 * (m * v / norm - w64),
                                   rtol=1e-5, atol=1e-6)
    with pytest.raises(LoraFormatError, match="PEFT DoRA"):
        to_kohya(lf.targets)


def test_peft_dora_linear_merge_equals_peft(tiny, tmp_path):
    lf, base, fused = _peft_dora(tiny, tmp_path, r".*(attn1\.(to_q|to_out\.0)|attn2\.to_k)")
    _check_peft_dora(lf, base, fused, 12)


def test_peft_dora_conv_merge_equals_peft(tiny, tmp_path):
    lf, base, fused = _peft_dora(tiny, tmp_path, r".*resnets\.0\.conv1")
    _check_peft_dora(lf, base, fused, 5)


def _comfy_dora64(w, delta, m, strength):
    """ComfyUI weight_decompose (float64, eps omitted), written independently."""
    v = w + delta
    if m.shape[0] == w.shape[0]:
        norm = np.sqrt((w.reshape(w.shape[0], -1) ** 2).sum(1)).reshape(-1, *[1] * (w.ndim - 1))
    else:
        axes = tuple(i for i in range(v.ndim) if i != 1)
        norm = np.sqrt((v ** 2).sum(axis=axes, keepdims=True))
    return w + strength * (m * v / norm - w)


@pytest.mark.parametrize("axis", ["output", "input"])
@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv3x3"])
def test_kohya_dora_scale_follows_comfyui(axis, conv, tmp_path):
    g = torch.Generator().manual_seed(11)
    if conv:
        mod, shape = "down_blocks.0.resnets.0.conv1", (320, 320, 3, 3)
    else:
        mod, shape = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", (320, 768)
    m = next(x for x in unet_modules(ARCHITECTURES["sd1"].unet) if x.diffusers == mod)
    s = make_specs([m], rank=4, seed=12, alpha=2.0)[0]
    ones = [1] * (len(shape) - 2)
    s.dora = (torch.rand((shape[0], 1, *ones) if axis == "output" else (1, shape[1], *ones), generator=g) + 0.5)
    sd = write_layout([s], "kohya")
    assert "DoRA" in detect_format(sd) and any(k.endswith(".dora_scale") for k in sd)
    (t,) = parse(sd)
    assert t.dora_kind == "kohya" and t.scale == 0.5
    w = torch.randn(shape, generator=g) * 0.1
    for strength in (1.0, 0.6):
        want = _comfy_dora64(w.double().numpy(), s.delta64(), s.dora.double().numpy(), strength)
        np.testing.assert_allclose(merged(w, t, strength).double().numpy(), want, rtol=1e-5, atol=1e-6)
    back = parse(to_kohya([t]))
    _same_targets(back, [t])


@pytest.mark.parametrize("layout", ["kohya", "peft-unet", "kohya-ldm"])
def test_conv_lora_3x3_down_1x1_up(layout):
    mods = _inv("sd1", lambda n: n.endswith(("resnets.0.conv1", "conv_shortcut")) or n in ("conv_in", "conv_out"))
    specs = make_specs(mods, rank=3, seed=2, alpha=6.0)
    targets = parse(write_layout(specs, layout))
    to_diffusers_naming(targets, "sd1")
    for s in specs:
        (t,) = [t for t in targets if t.module == s.diffusers]
        assert t.weight_shape == s_shape(s) == inventory("sd1")["unet"][s.diffusers].shape
        np.testing.assert_allclose(t.delta().numpy(), s.delta64() / s.scale * _expected_scale(layout, s),
                                   rtol=1e-12)
    assert any(s.down.shape[2:] == (3, 3) and s.up.shape[2:] == (1, 1) for s in specs)


def s_shape(s: Spec):
    return (s.up.shape[0], s.down.shape[1], *s.down.shape[2:])


def _sdxl_deep_modules():
    unet = _inv("sdxl", lambda n: "transformer_blocks.9." in n or n.endswith("attn2.to_k"))
    te1 = _inv("sdxl", lambda n: "layers.11." in n, "te1")
    te2 = _inv("sdxl", lambda n: "layers.31." in n or n == "text_projection", "te2")
    return unet, te1, te2


@pytest.mark.parametrize("layout", ["kohya", "kohya-ldm", "peft-unet", "diffusers"])
def test_sdxl_kohya_text_encoders_and_deep_transformer_blocks(layout):
    unet, te1, te2 = _sdxl_deep_modules()
    assert any(m.diffusers == "text_projection" for m in te2)
    specs = make_specs(unet, rank=2, seed=1, alpha=4.0) + make_specs(te1, "te1", seed=2, alpha=4.0) + \
        make_specs(te2, "te2", seed=3, alpha=4.0)
    sd = write_layout(specs, layout, sdxl=True)
    if layout.startswith("kohya"):
        assert any(k.startswith("lora_te1_text_model_encoder_layers_11_") for k in sd)
        assert "lora_te2_text_projection.lora_down.weight" in sd
        assert any(k.startswith(("lora_unet_input_blocks_8_1_transformer_blocks_9_",
                                 "lora_unet_down_blocks_2_attentions_1_transformer_blocks_9_")) for k in sd)
    else:
        assert any(k.startswith("text_encoder_2.text_model.encoder.layers.31.") for k in sd)
    targets = parse(sd)
    assert len(targets) == len(specs)
    assert {t.component for t in targets} == {"unet", "te1", "te2"}
    assert {t.scale for t in targets} == ({2.0} if layout.startswith("kohya") else {1.0})
    assert full_matches(targets) == ["sdxl"]
    to_diffusers_naming(targets, "sdxl")
    assert {(t.component, t.module) for t in targets} == {(s.component, s.diffusers) for s in specs}
    kohya = to_kohya(targets)
    assert any(k.startswith("lora_te1_") for k in kohya) and not any(k.startswith("lora_te_t") for k in kohya)
    back = parse(kohya)
    to_diffusers_naming(back, "sdxl")
    _same_targets(back, targets)


def test_sdxl_text_only_file_with_te1_uses_the_single_encoder_prefix():
    # an SDXL text-only file with te1 only uses kohya's single-encoder prefix
    _, te1, _ = _sdxl_deep_modules()
    t1 = parse(write_layout(make_specs(te1, "te1"), "kohya", sdxl=True))
    assert all(k.startswith("lora_te_") for k in to_kohya(t1))
    assert kohya_name(t1[0], single_text_encoder=False).startswith("lora_te1_")


TE_STEM = "text_model.encoder.layers.0.self_attn.q_proj"
TE_VARIANTS = {
    "kohya": lambda a, b: {f"lora_te_{TE_STEM.replace('.', '_')}.lora_down.weight": a,
                           f"lora_te_{TE_STEM.replace('.', '_')}.lora_up.weight": b},
    "peft": lambda a, b: {f"text_encoder.{TE_STEM}.lora_A.weight": a, f"text_encoder.{TE_STEM}.lora_B.weight": b},
    "diffusers": lambda a, b: {f"text_encoder.{TE_STEM}.lora.down.weight": a,
                               f"text_encoder.{TE_STEM}.lora.up.weight": b},
    "linear-layer": lambda a, b: {f"text_encoder.{TE_STEM}.lora_linear_layer.down.weight": a,
                                  f"text_encoder.{TE_STEM}.lora_linear_layer.up.weight": b},
    "bare": lambda a, b: {f"{TE_STEM}.lora_A.weight": a, f"{TE_STEM}.lora_B.weight": b},
}


def _te_spec():
    (m,) = _inv("sd1", lambda n: n == TE_STEM, "te1")
    (s,) = make_specs([m], "te1", rank=2)
    return s.down, s.up


@pytest.mark.parametrize("name", list(TE_VARIANTS))
def test_text_encoder_key_variants(name):
    a, b = _te_spec()
    (t,) = parse(TE_VARIANTS[name](a, b))
    assert (t.component, t.module, t.naming) == ("te1", TE_STEM, "diffusers"), name
    assert torch.equal(t.down, a) and torch.equal(t.up, b)


def test_a_kohya_clip_l_file_fits_sd1_and_sdxl():
    a, b = _te_spec()
    assert full_matches(parse(TE_VARIANTS["kohya"](a, b))) == ["sd1", "sdxl"]  # CLIP-L is SD1's and SDXL's first encoder


@pytest.mark.parametrize("suffix", ["", ".default"], ids=["no-adapter-name", "default-adapter"])
@pytest.mark.parametrize("prefix", ["unet.", "base_model.model.", "", "diffusion_model."])
def test_peft_prefixes_and_default_adapter_name(prefix, suffix):
    (m,) = _inv("sd1", lambda n: n == "up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_v")
    (s,) = make_specs([m], rank=2, seed=4)
    path = m.ldm if prefix == "diffusion_model." else m.diffusers
    sd = {f"{prefix}{path}.lora_A{suffix}.weight": s.down, f"{prefix}{path}.lora_B{suffix}.weight": s.up}
    (t,) = parse(sd)
    assert (t.component, t.module) == ("unet", path) and t.scale == 1.0
    to_diffusers_naming([t], "sd1")
    assert t.module == m.diffusers


def test_old_attention_processor_names():
    base = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.processor"
    mods = {m.diffusers: m for m in _inv("sd1", lambda n: n.startswith("mid_block.attentions.0.transformer_blocks.0.attn1."))}
    sd = {}
    for short, full in (("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v"), ("to_out", "to_out.0")):
        sd[f"{base}.{short}_lora.down.weight"] = torch.randn(2, 1280)
        sd[f"{base}.{short}_lora.up.weight"] = torch.randn(1280, 2)
    targets = parse(sd)
    assert detect_format(sd) == ["diffusers attn-processor (old)"]
    assert {t.module for t in targets} == set(mods) and len(targets) == 4
    assert {t.module for t in targets if t.source_keys[0].endswith("to_out_lora.down.weight")} == \
        {"mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0"}


# ---------------------------------------------------------------------------- architecture detection

def _file(arch, pred, layout="diffusers", comp="unet", seed=0):
    return parse(write_layout(make_specs(_inv(arch, pred, comp), comp, seed=seed), layout))


def _sd1_attn1_and_attn2_k(n):
    return ".attn1." in n or n.endswith("attn2.to_k")


SHAPE_CASES = {   # id: (arch the file is made from, module filter, layout, component), the bases it fits
    "sd1-attn1": (("sd1", lambda n: ".attn1." in n), ["sd1", "sd2"]),
    "sd1-attn1-and-attn2-k": (("sd1", _sd1_attn1_and_attn2_k), ["sd1"]),
    "sd2-attn2-k": (("sd2", lambda n: n.endswith("attn2.to_k")), ["sd2"]),
    "sd2-proj-in": (("sd2", lambda n: n.endswith("proj_in")), ["sd2"]),      # Linear in SD2, 1×1 conv in SD1
    "sd1-proj-in": (("sd1", lambda n: n.endswith("proj_in")), ["sd1"]),
    "sdxl-attn1": (("sdxl", lambda n: ".attn1." in n), ["sdxl"]),
    "sd2-text-kohya": (("sd2", lambda n: "layers.22." in n, "kohya", "te1"), ["sd2"]),
}


@pytest.mark.parametrize("case", list(SHAPE_CASES))
def test_detect_architecture_by_shapes(case):
    args, fits = SHAPE_CASES[case]
    assert full_matches(_file(*args)) == fits


def test_detected_architectures_list_the_full_match_first_and_why_others_fail():
    covs = detect_architectures(_file("sd1", _sd1_attn1_and_attn2_k))
    assert next(iter(covs)) == "sd1" and not covs["sd1"].unmatched
    assert covs["sd2"].unmatched and all(s.reason.startswith("shape") for s in covs["sd2"].unmatched)


def test_require_full_names_unmatched_keys():
    sd1_k = _file("sd1", lambda n: n.endswith("attn2.to_k"))
    cov = check(sd1_k, resolver_for("sdxl"), "SDXL 1.0")
    assert not cov.matched
    with pytest.raises(CoverageError, match=r"patches NOTHING in SDXL 1\.0.*unet\.down_blocks\.\S+attn2\.to_k\.lora\.down\.weight"):
        require_full(cov, "x.safetensors")
    with pytest.raises(CoverageError, match="NOTHING"):
        require_full(cov, "x.safetensors", allow_partial=True)

    ok = write_layout(make_specs(_inv("sd1", lambda n: ".attn1." in n)), "diffusers")
    bogus = "unet.down_blocks.0.attentions.0.transformer_blocks.1.attn1.to_q"   # SD1 has one block per attention
    ok[bogus + ".lora.down.weight"], ok[bogus + ".lora.up.weight"] = torch.zeros(2, 320), torch.zeros(320, 2)
    targets = parse(ok)
    assert full_matches(targets) == []
    cov = check(targets, resolver_for("sd1"), "SD1")
    with pytest.raises(CoverageError, match=r"only 64 of its 65 .*" + re.escape(bogus) + r".*no such weight"):
        require_full(cov, "partial.safetensors")
    require_full(cov, "partial.safetensors", allow_partial=True)
    d = cov.as_dict()
    assert d["matched"] == 64 and d["targets"] == 65 and d["unmatched"][0]["key"] == bogus + ".lora.down.weight"
    assert "64/65" in cov.summary()
    with pytest.raises(CoverageError, match="no LoRA targets"):
        require_full(check([], resolver_for("sd1"), "SD1"), "empty")


# ============================================================================ 4. bad files

@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin", ".PT"])
def test_read_refuses_pickle_suffixes(tmp_path, suffix):
    p = tmp_path / f"model{suffix}"
    torch.save({"w": torch.ones(2)}, p)
    with pytest.raises(ModelLoadError, match=rf"model{re.escape(suffix)}.*safet2i convert"):
        read_safetensors(p)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_read_refuses_pickle_named_safetensors(tmp_path, zip_format):
    p = tmp_path / "evil.safetensors"
    torch.save({"w": torch.ones(2)}, p, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(ModelLoadError, match=r"evil\.safetensors.*pickle content") as e:
        read_safetensors(p)
    assert "safet2i convert" in str(e.value)


def _good_file(tmp_path):
    p = tmp_path / "good.safetensors"
    save_file({"a.lora_down.weight": torch.randn(4, 64), "b": torch.randn(64, 64)}, str(p))
    return p


@pytest.mark.parametrize("damage", ["empty", "half", "header-cut", "random", "tiny", "missing"])
def test_read_refuses_damaged_files(tmp_path, damage):
    good = _good_file(tmp_path)
    data = good.read_bytes()
    p = tmp_path / "bad.safetensors"
    content = {"empty": b"", "half": data[: len(data) // 2], "header-cut": data[:20],
               "random": np.random.default_rng(0).bytes(4096), "tiny": b"abc", "missing": None}[damage]
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(ModelLoadError, match=r"bad\.safetensors") as e:
        read_safetensors(p)
    assert isinstance(e.value, SafeT2IError)
    if damage == "empty":
        assert "empty" in str(e.value)
    assert read_safetensors(good).tensors.keys() == {"a.lora_down.weight", "b"}


_K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


@pytest.mark.parametrize("case,match", [
    ("nan-down", r"attn1\.to_q: down tensor contains NaN"),
    ("inf-up", r"attn1\.to_q: up tensor contains NaN or infinite"),
    ("down-only", r"attn1\.to_q: has down but no up tensor .*" + _K),
    ("up-only", r"attn1\.to_q: has up but no down tensor"),
    ("rank-mismatch", r"inconsistent shapes down \(4, 320\) up \(320, 2\)"),
    ("dims-mismatch", r"inconsistent shapes"),
    ("3d", r"inconsistent shapes"),
    ("unknown-suffix", r"unrecognised LoRA key 'lora_unet_x\.weight'"),
    ("unknown-part", r"cannot tell which model part .*vae\.decoder"),
    ("optimizer", r"unrecognised LoRA key 'step'"),
    ("duplicate", r"two down tensors"),
    ("empty", r"no tensors"),
])
def test_parse_refuses_bad_state_dicts(case, match):
    a, b = torch.randn(2, 320), torch.randn(320, 2)
    sd = {f"{_K}.lora_down.weight": a, f"{_K}.lora_up.weight": b}
    if case == "nan-down":
        a[0, 3] = float("nan")
    elif case == "inf-up":
        b[5, 1] = float("-inf")
    elif case == "down-only":
        del sd[f"{_K}.lora_up.weight"]
    elif case == "up-only":
        del sd[f"{_K}.lora_down.weight"]
    elif case == "rank-mismatch":
        sd[f"{_K}.lora_down.weight"] = torch.randn(4, 320)
    elif case == "dims-mismatch":
        sd[f"{_K}.lora_up.weight"] = torch.randn(320, 2, 1, 1)
    elif case == "3d":
        sd = {f"{_K}.lora_down.weight": torch.randn(2, 320, 1), f"{_K}.lora_up.weight": torch.randn(320, 2, 1)}
    elif case == "unknown-suffix":
        sd["lora_unet_x.weight"] = torch.zeros(1)
    elif case == "unknown-part":
        sd["vae.decoder.conv_in.lora_A.weight"] = torch.zeros(2, 4)
    elif case == "optimizer":
        sd["step"] = torch.tensor(3)
    elif case == "duplicate":  # the same module in kohya and diffusers naming
        sd["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight"] = a
    elif case == "empty":
        sd = {}
    with pytest.raises(LoraFormatError, match=match) as e:
        parse(sd)
    assert isinstance(e.value, SafeT2IError)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_parse_refuses_non_finite_alpha(bad):
    sd = {f"{_K}.lora_down.weight": torch.randn(2, 320), f"{_K}.lora_up.weight": torch.randn(320, 2),
          f"{_K}.alpha": torch.tensor(bad)}
    with pytest.raises(LoraFormatError, match="alpha"):
        parse(sd)


def test_load_lora_names_the_file(tmp_path):
    p = tmp_path / "weird_release.safetensors"
    save_file({"lora_unet_x.weight": torch.zeros(1)}, str(p))
    with pytest.raises(LoraFormatError, match=r"weird_release\.safetensors: unrecognised LoRA key"):
        load_lora(p)


def test_convert_pickle_round_trip_and_no_overwrite(tmp_path):
    sd = {"lora_unet_a.lora_down.weight": torch.randn(2, 8), "lora_unet_a.lora_up.weight": torch.randn(8, 2),
          "lora_unet_a.alpha": torch.tensor(1.0), "half": torch.randn(3, 3).half()}
    src = tmp_path / "x.pt"
    torch.save(sd, src)
    dst = convert_pickle(src)
    assert dst == tmp_path / "x.safetensors"
    wf = read_safetensors(dst)
    assert wf.tensors.keys() == sd.keys()
    assert all(torch.equal(wf.tensors[k], v) and wf.tensors[k].dtype == v.dtype for k, v in sd.items())
    assert wf.metadata["converted_by"] == "safet2i convert" and len(wf.sha256) == 64
    before = dst.read_bytes()
    with pytest.raises(ModelLoadError, match="already exists"):
        convert_pickle(src)
    assert dst.read_bytes() == before
    torch.save({"other": torch.zeros(1)}, src)
    assert convert_pickle(src, overwrite=True) == dst and load_file(str(dst)).keys() == {"other"}
    # Lightning / CompVis checkpoints: tensors under "state_dict", other entries ignored
    ck = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.out.2.weight": torch.ones(4, 2)}, "epoch": 3}, ck)
    out = convert_pickle(ck, tmp_path / "model_conv.safetensors")
    assert load_file(str(out)).keys() == {"model.diffusion_model.out.2.weight"}
    with pytest.raises(ModelLoadError, match="no such file"):
        convert_pickle(tmp_path / "nope.pt")


def test_convert_pickle_refuses_custom_objects(tmp_path):
    src = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "payload": Payload()}, src)
    with pytest.raises(ModelLoadError, match=r"evil\.pt: cannot be read safely with torch\.load\(weights_only=True\)"):
        convert_pickle(src)
    assert sorted(os.listdir(tmp_path)) == ["evil.pt"]  # no output, no partial file


def test_adapter_config_is_read(tmp_path):
    sd = write_layout(make_specs(_inv("sd1", lambda n: ".attn1." in n), rank=4), "peft-base")
    p = tmp_path / "adapter_model.safetensors"
    save_file(sd, str(p))
    assert read_safetensors(p).adapter_config is None
    assert load_lora(p).alpha_source == "none (scale 1.0)"
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "peft_type": "LORA"}))
    wf = read_safetensors(p)
    assert wf.adapter_config["lora_alpha"] == 8
    lf = load_lora(p)
    assert lf.alpha_source == "adapter_config.json" and {t.scale for t in lf.targets} == {2.0}
    assert lf.architectures == ["sd1", "sd2"]
    # <stem>.adapter_config.json next to a renamed file
    other = tmp_path / "sub"
    other.mkdir()
    q = other / "duo_peft.safetensors"
    save_file(sd, str(q))
    (other / "duo_peft.adapter_config.json").write_text(json.dumps({"lora_alpha": 2}))
    assert {t.scale for t in load_lora(q).targets} == {0.5}
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="adapter_config.json"):
        read_safetensors(p)


# ---------------------------------------------------------------------------- which adapter config, PEFT rules

def _attn1_file(path, rank=4, seed=0):
    sd = write_layout(make_specs(_inv("sd1", lambda n: ".attn1." in n), rank=rank, seed=seed), "peft-base")
    save_file(sd, str(path))
    return sd


def test_a_stray_adapter_config_never_changes_another_files_scale(tmp_path):
    from safet2i.lora import inspect_lora

    duo = tmp_path / "duo_nudity_beta500.safetensors"
    _attn1_file(duo, rank=32)
    # a PEFT config of some other adapter in the same folder: must not touch the DUO file (scale 1)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 32, "lora_alpha": 8, "peft_type": "LORA"}))
    assert read_safetensors(duo).adapter_config is None and read_safetensors(duo).adapter_config_path is None
    lf = load_lora(duo)
    assert {t.scale for t in lf.targets} == {1.0} and lf.alpha_source == "none (scale 1.0)" and lf.adapter_config is None
    info = inspect_lora(duo)
    assert info["adapter_config"] is None and info["scales"] == [1.0]
    # PEFT's own layout (adapter_model.safetensors) does use the folder's adapter_config.json
    peft = tmp_path / "adapter_model.safetensors"
    _attn1_file(peft, rank=32)
    lf = load_lora(peft)
    assert {t.scale for t in lf.targets} == {0.25} and lf.alpha_source == "adapter_config.json"
    assert inspect_lora(peft)["adapter_config"] == str(tmp_path / "adapter_config.json")
    # the file's own <stem>.adapter_config.json wins over the generic one, for both files
    (tmp_path / "duo_nudity_beta500.adapter_config.json").write_text(json.dumps({"r": 32, "lora_alpha": 64}))
    (tmp_path / "adapter_model.adapter_config.json").write_text(json.dumps({"r": 32, "lora_alpha": 16}))
    assert {t.scale for t in load_lora(duo).targets} == {2.0}
    lf = load_lora(peft)
    assert {t.scale for t in lf.targets} == {0.5} and lf.alpha_source == "adapter_model.adapter_config.json"
    assert lf.entry is None and load_lora(duo).entry.name == "duo-nudity-b500"
    assert inspect_lora(duo)["adapter_config"] == str(tmp_path / "duo_nudity_beta500.adapter_config.json")


def _peft_expected_scale(module: str, cfg: dict) -> float:
    """PEFT's rule written out independently: first pattern key whose regex matches the module name as a
    dot-bounded suffix; alpha / r, or alpha / sqrt(r) with use_rslora."""
    def pick(patterns, default):
        for key, value in patterns.items():
            if re.fullmatch(rf"(?:.*\.)?(?:{key})", module):
                return value
        return default
    r = pick(cfg.get("rank_pattern", {}), cfg["r"])
    alpha = pick(cfg.get("alpha_pattern", {}), cfg["lora_alpha"])
    return alpha / (r ** 0.5) if cfg.get("use_rslora") else alpha / r


def test_peft_config_rslora_rank_and_alpha_patterns(tmp_path):
    mods = _inv("sd1", lambda n: n.startswith("down_blocks.0.attentions.0.") and (".attn1." in n or ".attn2." in n))
    cfg = {"r": 4, "lora_alpha": 8, "use_rslora": True,
           # first matching key wins: attn1.to_q → 2 (not 8); "q" matches no module (dot boundary)
           "rank_pattern": {"attn1.to_q": 2, "to_q": 8, "q": 16},
           "alpha_pattern": {r"attn2\.to_(k|v)": 3, "to_out.0": 5}}
    specs = []
    for m in mods:
        r = 2 if m.diffusers.endswith("attn1.to_q") else 8 if m.diffusers.endswith("to_q") else 4
        specs += make_specs([m], rank=r, seed=len(specs))
    p = tmp_path / "adapter_model.safetensors"
    save_file(write_layout(specs, "peft-base"), str(p))
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    lf = load_lora(p)
    assert "use_rslora" in lf.alpha_source and len(lf.targets) == len(mods) == 8
    seen = set()
    for t in lf.targets:
        want = _peft_expected_scale(t.module, cfg)
        assert t.scale == pytest.approx(want, rel=1e-12), t.module
        seen.add(round(want, 6))
        w = torch.randn(t.weight_shape, dtype=torch.float64)
        torch.testing.assert_close(merged(w, t, 1.0), w + want * (t.up.double() @ t.down.double()))
    assert len(seen) >= 4  # 8/√2, 8/√8, 3/√4, 5/√4, 8/√4: the patterns really differ
    # kohya conversion keeps the rsLoRA scale (alpha written = scale · rank)
    back = {(t.component, t.module): t.scale for t in parse(to_kohya(lf.targets))}
    to_diffusers_naming(lf.targets, "sd1")
    for t in lf.targets:
        assert back[("unet", t.module)] == pytest.approx(t.scale, rel=1e-6)  # alpha stored as float32


def test_peft_config_rank_must_match_the_tensors(tmp_path):
    p = tmp_path / "adapter_model.safetensors"
    _attn1_file(p, rank=4)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 8}))
    with pytest.raises(LoraFormatError, match=r"adapter_model\.safetensors: adapter_config\.json: r = 8 for module "
                                              r"\S+attn1\.to_[qkv].*have rank 4"):
        load_lora(p)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "rank_pattern": {"to_v": 2}}))
    with pytest.raises(LoraFormatError, match=r"rank_pattern\['to_v'\] = 2 for module \S+attn1\.to_v"):
        load_lora(p)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "rank_pattern": {"attn9.to_v": 2}}))
    assert {t.scale for t in load_lora(p).targets} == {2.0}


def test_real_peft_adapter_with_rslora_and_patterns(tiny, tmp_path):
    """PEFT itself builds the adapter (use_rslora, rank_pattern, alpha_pattern) and saves it; our merge of the
    saved file equals PEFT's own delta and scaling for every layer."""
    from peft import LoraConfig, get_peft_model

    unet = copy.deepcopy(tiny[0])
    cfg = LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=r".*attn[12]\.(to_q|to_k|to_v)",
                     rank_pattern={"attn2.to_k": 4}, alpha_pattern={"to_v": 6})
    pm = get_peft_model(unet, cfg)
    _randomise_lora(pm, seed=11)
    layers = _peft_layers(pm.base_model.model)
    pm.save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["use_rslora"] is True and saved["rank_pattern"] == {"attn2.to_k": 4}
    lf = load_lora(tmp_path / "adapter_model.safetensors")
    assert {t.module for t in lf.targets} == set(layers) and {t.rank for t in lf.targets} == {4, 8}
    for t in lf.targets:
        layer = layers[t.module]
        assert t.scale == pytest.approx(layer.scaling["default"], rel=1e-12), t.module
        assert t.scale == pytest.approx(_peft_expected_scale(t.module, saved), rel=1e-12)
        w = layer.base_layer.weight.detach()
        torch.testing.assert_close(merged(w, t, 1.0), w + layer.get_delta_weight("default"), rtol=1e-5, atol=1e-6)
    assert {round(t.scale, 6) for t in lf.targets} == {round(16 / 8 ** 0.5, 6), round(16 / 2, 6), round(6 / 8 ** 0.5, 6)}
