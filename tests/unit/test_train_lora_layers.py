"""LoRA layers of the trainers (safet2i.train.lora_layers): the layer's forward pass against a
float64 reference, injection into a real SD1 UNet layout, and the saved files read back by
every loader SafeT2I has (the core parser, the diffusers host, the A1111 layer), plus
metadata and manifest entries.

References are computed here from the layers' own parameters in float64 (the LoRA equation
W + (alpha/rank)·B·A), and module sets are counted from ``named_modules`` directly.
"""

from __future__ import annotations

import copy
import json
import re
import struct
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lora_fixtures import host_resolver, meta_unet_named
from safetensors.torch import load_file
from tiny_diffusers import tiny_sd_pipeline

from safet2i.errors import ModelLoadError, SafeT2IError
from safet2i.lora import check, check_for_host, detect_architectures, load_lora
from safet2i.lora import manifest as M
from safet2i.train import lora_layers as LL
from safet2i.train.lora_layers import (
    TARGET_PRESETS,
    LoRALinear,
    LoraSet,
    inject_lora,
    lora_metadata,
    manifest_entry,
    save_lora,
)

PROJ = ("to_q", "to_k", "to_v")


def attn_names(model: torch.nn.Module, which: tuple[str, ...]) -> list[str]:
    """Linear modules ``…<attn>.to_q|to_k|to_v|to_out.0`` for attn in ``which``, from the module tree."""
    out = []
    for n, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear):
            continue
        parts = n.split(".")
        if (len(parts) >= 2 and parts[-2] in which and parts[-1] in PROJ) or \
                (len(parts) >= 3 and parts[-3] in which and parts[-2:] == ["to_out", "0"]):
            out.append(n)
    return sorted(out)


def randomize_up(lset: LoraSet, seed: int = 7, std: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lset.modules.values():
            m.up.copy_(torch.randn(m.up.shape, generator=g, dtype=torch.float64).to(m.up.dtype) * std)


def ref_delta(layer: LoRALinear) -> torch.Tensor:
    """(alpha / rank)·B·A in float64 from the layer's parameters."""
    return (layer.alpha / layer.rank) * (layer.up.detach().double() @ layer.down.detach().double())


def meta(**kw) -> dict[str, str]:
    base = {"method": "DUO", "base_model": "tiny", "base_sha256": "0" * 64, "data_sha256": "1" * 64, "arch": "sd1",
            "hyper": {"rank": 4, "alpha": 2.0, "lr": 1e-4}}
    base.update(kw)
    return lora_metadata(**base)


# ----------------------------------------------------------------------------- the layer

def _linear(in_f=12, out_f=10, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Linear(in_f, out_f).to(dtype)


def test_layer_starts_as_the_base_and_then_adds_scaled_BA_exactly_as_in_float64():
    base = _linear()
    x = torch.randn(3, 5, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want_base = base(x)
    layer = LoRALinear(base, rank=3, alpha=6.0, generator=torch.Generator().manual_seed(0))
    assert layer.down.shape == (3, 12) and layer.up.shape == (10, 3) and layer.scale == 2.0
    assert layer.down.requires_grad and layer.up.requires_grad and layer.down.dtype == torch.float32
    assert not bool(torch.any(layer.up != 0))
    with torch.no_grad():
        assert torch.equal(layer(x), want_base)                     # B = 0: unchanged at step 0
    with torch.no_grad():
        layer.up.copy_(torch.randn(10, 3, generator=torch.Generator().manual_seed(2)))
        got = layer(x)
    w, b = base.weight.detach().double(), base.bias.detach().double()
    ref = x.double() @ w.T + b + x.double() @ ref_delta(layer).T
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    assert float((got - want_base).abs().max()) > 0.1              # the LoRA does change the output


def test_gaussian_init_is_seeded_with_std_one_over_rank():
    a = LoRALinear(_linear(4096, 8), 4, 4.0, torch.Generator().manual_seed(3))
    b = LoRALinear(_linear(4096, 8), 4, 4.0, torch.Generator().manual_seed(3))
    c = LoRALinear(_linear(4096, 8), 4, 4.0, torch.Generator().manual_seed(4))
    assert torch.equal(a.down, b.down) and not torch.equal(a.down, c.down)
    std = float(a.down.detach().double().std())
    assert abs(std - 1 / 4) < 0.25 * 0.03                          # 16384 draws of N(0, (1/4)²)
    assert abs(float(a.down.detach().double().mean())) < 0.01
    k = LoRALinear(_linear(4096, 8), 4, 4.0, torch.Generator().manual_seed(3), init="kaiming")
    bound = 1 / 4096 ** 0.5
    assert 0.9 * bound < float(k.down.detach().abs().max()) <= bound
    with pytest.raises(SafeT2IError, match="unknown LoRA init 'xavier'"):
        LoRALinear(_linear(), 2, 2.0, None, init="xavier")


def test_gradients_reach_only_the_lora_parameters_when_the_base_is_frozen():
    base = _linear()
    base.requires_grad_(False)
    layer = LoRALinear(base, 2, 2.0, torch.Generator().manual_seed(0))
    x = torch.randn(4, 12, generator=torch.Generator().manual_seed(1))
    layer(x).pow(2).sum().backward()
    assert layer.up.grad is not None and float(layer.up.grad.abs().max()) > 0
    # d/dB of sum(y²) with B = 0: 2·scale·yᵀ(xAᵀ), y = base(x) (float64 reference)
    y = base(x).detach().double()
    h = x.double() @ layer.down.detach().double().T
    torch.testing.assert_close(layer.up.grad.double(), 2 * layer.scale * y.T @ h, rtol=1e-5, atol=1e-5)
    assert base.weight.grad is None


def test_half_precision_base_keeps_float32_lora_parameters():
    base = _linear(dtype=torch.bfloat16)
    layer = LoRALinear(base, 2, 4.0, torch.Generator().manual_seed(0))
    assert layer.down.dtype == layer.up.dtype == torch.float32
    with torch.no_grad():
        layer.up.copy_(torch.randn(10, 2, generator=torch.Generator().manual_seed(5)))
    x = torch.randn(6, 12, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    with torch.no_grad():
        got = layer(x)
    assert got.dtype == torch.bfloat16
    xd = x.double()
    ref = xd @ base.weight.double().T + base.bias.double() + xd @ ref_delta(layer).T
    torch.testing.assert_close(got.double(), ref, rtol=0.05, atol=0.05)


def test_layer_refuses_bad_arguments():
    with pytest.raises(SafeT2IError, match=r"rank 11 .*\[1, 10\]"):
        LoRALinear(_linear(), 11, 1.0, None)
    with pytest.raises(SafeT2IError, match="rank 0"):
        LoRALinear(_linear(), 0, 1.0, None)
    with pytest.raises(SafeT2IError, match="alpha -1"):
        LoRALinear(_linear(), 2, -1.0, None)
    with pytest.raises(SafeT2IError, match="torch.nn.Linear"):
        LoRALinear(torch.nn.Conv2d(3, 3, 1), 2, 1.0, None)


# ----------------------------------------------------------------------------- a real UNet layout

def test_self_attention_preset_on_the_sd1_unet_wraps_exactly_the_64_attn1_projections():
    unet = copy.deepcopy(meta_unet_named("sd1"))      # the cached model stays untouched
    want = attn_names(unet, ("attn1",))
    presets = {"cross-attention": attn_names(unet, ("attn2",)), "attention": attn_names(unet, ("attn1", "attn2"))}
    assert len(want) == len(presets["cross-attention"]) == 64 and len(presets["attention"]) == 128
    frozen = next(p for n, p in unet.named_parameters() if n.startswith("conv_in"))
    frozen.requires_grad_(False)
    lset = inject_lora(unet, targets="self-attention", rank=4)
    assert list(lset.modules) == want and lset.component == "unet" and lset.rank == 4 and lset.alpha == 4.0
    assert sorted(n for n, m in unet.named_modules() if isinstance(m, LoRALinear)) == want
    modules = dict(unet.named_modules())
    for n in want:
        layer = lset.modules[n]
        assert modules[n] is layer and type(layer.base) is torch.nn.Linear
        out_f, in_f = layer.base.weight.shape
        assert layer.down.shape == (4, in_f) and layer.up.shape == (out_f, 4) and layer.down.device.type == "meta"
    assert [id(p) for p in lset.parameters()] == [id(p) for n in want for p in (lset.modules[n].down,
                                                                                   lset.modules[n].up)]
    assert not frozen.requires_grad and all(p.requires_grad for p in lset.parameters())
    with pytest.raises(SafeT2IError, match="already has 64 LoRA layers"):
        inject_lora(unet, targets="cross-attention")
    lset.remove()
    assert not any(isinstance(m, LoRALinear) for m in unet.modules())
    assert all(type(dict(unet.named_modules())[n]) is torch.nn.Linear for n in want)
    for preset, names in presets.items():             # the other presets, counted the same independent way
        s = inject_lora(unet, targets=preset, rank=2)
        assert list(s.modules) == names
        s.remove()


def test_injection_errors_name_the_cause():
    unet = copy.deepcopy(meta_unet_named("sd1"))
    with pytest.raises(SafeT2IError, match=r"match no nn.Linear .*attn"):
        inject_lora(unet, targets=r"attn9\.to_q$")
    with pytest.raises(SafeT2IError, match="neither a preset"):
        inject_lora(unet, targets="attn1.(to_q")
    with pytest.raises(SafeT2IError, match=r"rank 321 is larger than min\(in, out\) = 320 of target down_blocks\.0"):
        inject_lora(unet, rank=321)
    with pytest.raises(SafeT2IError, match="positive integer"):
        inject_lora(unet, rank=0)
    with pytest.raises(SafeT2IError, match="unknown LoRA init"):
        inject_lora(unet, init="normal")
    with pytest.raises(SafeT2IError, match="alpha"):
        inject_lora(unet, alpha=0.0)
    with pytest.raises(SafeT2IError, match="unknown component"):
        inject_lora(unet, component="vae")
    assert not any(isinstance(m, LoRALinear) for m in unet.modules())   # nothing half-injected


def test_disabled_gives_the_reference_model_and_is_restored_even_on_an_exception(tmp_path):
    unet = tiny_sd_pipeline(tmp_path).unet
    args = _unet_args()
    with torch.no_grad():
        base_out = unet(*args).sample
        lset = inject_lora(unet, targets="attention", rank=4, alpha=2.0, seed=1)
        assert torch.equal(unet(*args).sample, base_out)          # gaussian init: unchanged at step 0
        randomize_up(lset)
        live = unet(*args).sample
        assert float((live - base_out).abs().max()) > 1e-3
        with lset.disabled():
            assert torch.equal(unet(*args).sample, base_out)
        assert all(m.enabled for m in lset.modules.values())
        torch.testing.assert_close(unet(*args).sample, live, rtol=0, atol=0)
        with pytest.raises(RuntimeError, match="boom"), lset.disabled():
            raise RuntimeError("boom")
        assert all(m.enabled for m in lset.modules.values())
        lset.remove()
        assert torch.equal(unet(*args).sample, base_out)
        assert not any(isinstance(m, LoRALinear) for m in unet.modules())


def test_checkpoint_tensors_round_trip_and_strict_loading(tmp_path):
    unet = tiny_sd_pipeline(tmp_path).unet
    lset = inject_lora(unet, targets="self-attention", rank=2, seed=3)
    randomize_up(lset)
    saved = lset.tensors()
    assert set(saved) == {f"{p}.{x}" for p in lset.modules for x in ("down", "up")}
    assert all(v.device.type == "cpu" and v.is_contiguous() and not v.requires_grad for v in saved.values())
    first = next(iter(lset.modules))
    saved[f"{first}.up"].add_(1.0)                      # copies, not views of the parameters
    assert not torch.equal(saved[f"{first}.up"], lset.modules[first].up.detach())
    want = {k: v.clone() for k, v in saved.items()}
    with torch.no_grad():
        for p in lset.parameters():
            p.zero_()
    lset.load_tensors(saved)
    assert all(torch.equal(v, lset.tensors()[k]) for k, v in want.items())
    with pytest.raises(SafeT2IError, match=re.escape(f"{first}.down is missing")):
        lset.load_tensors({k: v for k, v in saved.items() if k != f"{first}.down"})
    with pytest.raises(SafeT2IError, match="extra.up is not a tensor of these"):
        lset.load_tensors(dict(saved, **{"extra.up": torch.zeros(1)}))
    with pytest.raises(SafeT2IError, match=re.escape(f"{first}.up has shape (3, 3)")):
        lset.load_tensors(dict(saved, **{f"{first}.up": torch.zeros(3, 3)}))


def _unet_args(seed: int = 0, ctx: int = 32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 4, 16, 16, generator=g), torch.tensor([500]), torch.randn(1, 7, ctx, generator=g))


# ----------------------------------------------------------------------------- SD1 files

def sd1_attention_skeleton(which=("attn1",)) -> torch.nn.Module:
    """Real (CPU, zero) Linear modules at exactly the SD1 UNet's attention paths and shapes, and
    nothing else: the SD1 UNet itself (860M parameters) is not needed to train-and-save a LoRA."""
    root = torch.nn.Module()
    meta_unet = meta_unet_named("sd1")
    for n in attn_names(meta_unet, which):
        m = dict(meta_unet.named_modules())[n]
        parent = root
        for p in n.split(".")[:-1]:
            parent = parent._modules.setdefault(p, torch.nn.Module())
        lin = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta").to_empty(device="cpu")
        torch.nn.init.zeros_(lin.weight)
        parent._modules[n.split(".")[-1]] = lin
    return root


@pytest.fixture(scope="module")
def sd1_lora(tmp_path_factory):
    """A rank-4 alpha-2 self-attention LoRA on SD1's 64 attn1 projections, up set to random values,
    saved in kohya format."""
    model = sd1_attention_skeleton()
    lset = inject_lora(model, targets="self-attention", rank=4, alpha=2.0, seed=11)
    randomize_up(lset, seed=12)
    path = save_lora(lset, tmp_path_factory.mktemp("sd1") / "trained_sd1.safetensors", metadata=meta())
    return lset, path


def test_kohya_file_holds_the_trained_tensors_under_kohya_names_of_sd1(sd1_lora):
    lset, path = sd1_lora
    sd = load_file(str(path))                       # independent of safet2i's parser
    want = {}
    for n, m in lset.modules.items():
        stem = "lora_unet_" + n.replace(".", "_")
        want[stem + ".lora_down.weight"] = m.down.detach()
        want[stem + ".lora_up.weight"] = m.up.detach()
        want[stem + ".alpha"] = torch.tensor(2.0)
    assert set(sd) == set(want) and len(want) == 3 * 64
    for k, v in want.items():
        assert torch.equal(sd[k], v), k


def test_kohya_file_reads_back_with_the_same_deltas_and_fits_sd1_completely(sd1_lora):
    lset, path = sd1_lora
    lf = load_lora(path)
    assert lf.formats == ["kohya"] and lf.components == {"unet": 64} and lf.ranks == {4}
    assert "sd1" in lf.architectures
    got = {t.module: t for t in lf.targets}
    assert sorted(got) == list(lset.modules)
    for n, layer in lset.modules.items():
        assert got[n].naming == "diffusers" and got[n].scale == 0.5
        torch.testing.assert_close(got[n].delta(torch.float64), ref_delta(layer), rtol=1e-12, atol=0)
    cov = detect_architectures(lf.targets)["sd1"]
    assert len(cov.matched) == 64 and not cov.unmatched
    # and against the module tree of a real diffusers SD1 UNet (meta device), resolved without safet2i's tables
    resolve, _ = host_resolver(meta_unet_named("sd1"))
    cov = check(lf.targets, resolve, "diffusers SD1 UNet")
    assert len(cov.matched) == 64 and not cov.unmatched
    assert len(check_for_host(lf, "sd1").matched) == 64


def test_a1111_layer_uses_the_kohya_file_as_is_with_full_coverage(sd1_lora, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "extension"))
    from safet2i_a1111 import lora as A1111

    _, path = sd1_lora
    folders = {"Lora": tmp_path / "Lora", "safety_models": tmp_path / "safety_models"}
    for d in folders.values():
        d.mkdir()
    (folders["Lora"] / "trained_sd1.safetensors").write_bytes(path.read_bytes())
    sd1 = SimpleNamespace(is_sd1=True, is_sd2=False, is_sdxl=False)
    lora = A1111.prepare("Lora/trained_sd1.safetensors", sd1, 0.8, folders=folders)
    assert lora.arch == "sd1" and lora.targets == lora.total == 64
    assert not lora.converted and lora.filename == folders["Lora"] / "trained_sd1.safetensors"
    assert lora.tag == "<lora:trained_sd1:0.8>"
    # in safety_models/ it is copied into the webui's Lora cache, complete
    (folders["safety_models"] / "trained_sd1.safetensors").write_bytes(path.read_bytes())
    copied = A1111.prepare("safety_models/trained_sd1.safetensors", sd1, folders=folders)
    assert copied.converted and copied.targets == copied.total == 64
    assert load_file(str(copied.filename)).keys() == load_file(str(path)).keys()


# ----------------------------------------------------------------------------- the diffusers host

@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_diffusers_host_merges_the_file_to_the_live_lora_output(tmp_path, fmt):
    from safet2i.diffusers_adapter import load_safety_lora

    pipe = tiny_sd_pipeline(tmp_path)
    args = _unet_args()
    names = attn_names(pipe.unet, ("attn1", "attn2"))
    assert len(names) == 32
    with torch.no_grad():
        base_out = pipe.unet(*args).sample
        lset = inject_lora(pipe.unet, targets="attention", rank=4, alpha=2.0, seed=1)
        assert list(lset.modules) == names
        randomize_up(lset)
        live = pipe.unet(*args).sample
    path = save_lora(lset, tmp_path / f"tiny_{fmt}.safetensors", fmt=fmt, metadata=meta())
    lset.remove()
    handle = load_safety_lora(pipe, path)
    assert not handle.coverage.unmatched and len(handle.coverage.applied) == 32
    assert sorted(handle.coverage.applied) == sorted(f"unet.{n}" for n in lset.modules)
    with torch.no_grad():
        merged = pipe.unet(*args).sample
    torch.testing.assert_close(merged, live, rtol=1e-5, atol=1e-5)
    assert float((merged - base_out).abs().max()) > 1e-3
    handle.undo()
    with torch.no_grad():
        assert torch.equal(pipe.unet(*args).sample, base_out)


def test_peft_file_folds_the_scale_into_lora_B(tmp_path):
    unet = tiny_sd_pipeline(tmp_path).unet
    lset = inject_lora(unet, targets="self-attention", rank=4, alpha=3.0, seed=2)
    randomize_up(lset)
    path = save_lora(lset, tmp_path / "p.safetensors", fmt="peft", metadata=meta())
    sd = load_file(str(path))
    assert set(sd) == {f"unet.{n}.lora_{x}.weight" for n in lset.modules for x in "AB"}
    for n, m in lset.modules.items():
        assert torch.equal(sd[f"unet.{n}.lora_A.weight"], m.down.detach())
        torch.testing.assert_close(sd[f"unet.{n}.lora_B.weight"].double(), 0.75 * m.up.detach().double(),
                                   rtol=1e-7, atol=0)
        # any loader at scale 1 (no alpha in the file) gets the trained change, up to float32 rounding
        # of scale·B (relative, in the Frobenius norm: single entries of B·A may cancel)
        got = sd[f"unet.{n}.lora_B.weight"].double() @ sd[f"unet.{n}.lora_A.weight"].double()
        assert float((got - ref_delta(m)).norm()) <= 1e-6 * float(ref_delta(m).norm())
    assert {t.scale for t in load_lora(path).targets} == {1.0}


def test_diffusers_own_loader_applies_the_peft_file_at_scale_one(tmp_path):
    pytest.importorskip("peft")
    pipe = tiny_sd_pipeline(tmp_path)
    args = _unet_args()
    lset = inject_lora(pipe.unet, targets="attention", rank=4, alpha=2.0, seed=1)
    randomize_up(lset)
    with torch.no_grad():
        live = pipe.unet(*args).sample
    path = save_lora(lset, tmp_path / "tiny_peft.safetensors", fmt="peft", metadata=meta())
    lset.remove()
    pipe.load_lora_weights(load_file(str(path)))
    with torch.no_grad():
        got = pipe.unet(*args).sample
    torch.testing.assert_close(got, live, rtol=1e-5, atol=1e-5)


def test_text_encoder_and_unet_sets_in_one_file(tmp_path):
    pipe = tiny_sd_pipeline(tmp_path)
    u = inject_lora(pipe.unet, targets="self-attention", rank=2, seed=1)
    t = inject_lora(pipe.text_encoder, component="te1", targets=r"self_attn\.(q_proj|v_proj)$", rank=2, seed=2)
    assert len(t.modules) == 2 * pipe.text_encoder.config.num_hidden_layers
    randomize_up(u, 3)
    randomize_up(t, 4)
    for fmt in ("kohya", "peft"):
        path = save_lora([u, t], tmp_path / f"both_{fmt}.safetensors", fmt=fmt, metadata=meta())
        sd = load_file(str(path))
        for n, m in t.modules.items():
            name = n if n.startswith("text_model.") else "text_model." + n   # the name LoRA files use
            key = ("lora_te_" + name.replace(".", "_") + ".lora_up.weight") if fmt == "kohya" \
                else f"text_encoder.{name}.lora_B.weight"
            want = m.up.detach().double() * (1.0 if fmt == "kohya" else m.scale)
            torch.testing.assert_close(sd[key].double(), want)
        assert load_lora(path).components == {"unet": len(u.modules), "te1": len(t.modules)}


# ----------------------------------------------------------------------------- saving rules

def _header(path: Path) -> dict:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n])


def test_metadata_round_trip(tmp_path):
    import safet2i

    unet = tiny_sd_pipeline(tmp_path).unet
    lset = inject_lora(unet, rank=4, alpha=2.0)
    randomize_up(lset)
    hyper = {"rank": 4, "alpha": 2.0, "beta": 500, "lr": 3e-5, "targets": "self-attention"}
    m = lora_metadata(method="DUO", base_model="CompVis/stable-diffusion-v1-4", base_sha256="ab" * 32, hyper=hyper,
                      data_sha256="cd" * 32, arch="sd1", extra={"steps": 1000, "note": "x"})
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in m.items())
    path = save_lora(lset, tmp_path / "m.safetensors", metadata=m)
    head = _header(path)["__metadata__"]
    assert {k: head[k] for k in m} == m
    assert json.loads(head["safet2i_hyper"]) == hyper and head["safet2i_hyper"] == json.dumps(hyper, sort_keys=True)
    assert head["safet2i_version"] == safet2i.__version__ and head["safet2i_method"] == "DUO"
    assert head["safet2i_base_sha256"] == "ab" * 32 and head["safet2i_data_sha256"] == "cd" * 32
    assert head["ss_network_module"] == "networks.lora" and head["ss_network_dim"] == "4"
    assert head["ss_network_alpha"] == "2.0" and head["steps"] == "1000" and head["note"] == "x"
    assert head["safet2i_format"] == "kohya"
    assert load_lora(path).metadata == head
    no_alpha = lora_metadata(method="x", base_model="x", base_sha256="", hyper={"rank": 8}, data_sha256="", arch="sd1")
    assert no_alpha["ss_network_alpha"] == "8"
    with pytest.raises(SafeT2IError, match="safet2i_arch"):
        lora_metadata(method="x", base_model="x", base_sha256="", hyper={}, data_sha256="", arch="sd1",
                      extra={"safet2i_arch": "sdxl"})
    with pytest.raises(SafeT2IError, match="strings to strings"):
        save_lora(lset, tmp_path / "m2.safetensors", metadata={"a": 1})


def test_existing_file_is_refused_unless_overwrite(tmp_path):
    unet = tiny_sd_pipeline(tmp_path).unet
    lset = inject_lora(unet, rank=2)
    randomize_up(lset, 1)
    path = save_lora(lset, tmp_path / "o.safetensors", metadata=meta())
    before = path.read_bytes()
    randomize_up(lset, 2)
    with pytest.raises(SafeT2IError, match="exists; pass overwrite=True"):
        save_lora(lset, path, metadata=meta())
    assert path.read_bytes() == before
    save_lora(lset, path, metadata=meta(), overwrite=True)
    assert path.read_bytes() != before
    n, m = next(iter(lset.modules.items()))
    assert torch.equal(load_file(str(path))["lora_unet_" + n.replace(".", "_") + ".lora_up.weight"], m.up.detach())
    with pytest.raises(SafeT2IError, match="safetensors"):
        save_lora(lset, tmp_path / "o.pt", metadata=meta())
    with pytest.raises(SafeT2IError, match="unknown LoRA file format"):
        save_lora(lset, tmp_path / "o2.safetensors", fmt="diffusers", metadata=meta())
    (tmp_path / "cfg.adapter_config.json").write_text('{"lora_alpha": 8}')
    with pytest.raises(SafeT2IError, match="PEFT config"):
        save_lora(lset, tmp_path / "cfg.safetensors", metadata=meta())


def test_untrained_partly_trained_or_diverged_loras_are_refused_and_nothing_is_written(tmp_path):
    unet = tiny_sd_pipeline(tmp_path).unet
    lset = inject_lora(unet, rank=2)
    path = tmp_path / "z.safetensors"
    with pytest.raises(SafeT2IError, match=r"every up matrix \(B\) of the 16 LoRA layers is zero: the LoRA is untrained"):
        save_lora(lset, path, metadata=meta())
    randomize_up(lset)
    last = list(lset.modules)[-1]
    with torch.no_grad():
        lset.modules[last].up.zero_()
    with pytest.raises(SafeT2IError, match=re.escape("1 of the 16 LoRA layers have an all-zero up matrix")) as exc:
        save_lora(lset, path, metadata=meta())
    assert last in str(exc.value)
    randomize_up(lset)
    with torch.no_grad():
        lset.modules[last].up[0, 0] = float("nan")
    with pytest.raises(SafeT2IError, match="NaN or infinite"):
        save_lora(lset, path, metadata=meta())
    randomize_up(lset, std=1e-9)         # a change no float16 weight can show: the loaders' rule
    with pytest.raises(SafeT2IError, match="refused by every loader"):
        save_lora(lset, path, metadata=meta())
    assert list(tmp_path.glob("*.safetensors")) == [] and not [p for p in tmp_path.iterdir() if "tmp" in p.name]


def test_a_file_that_reads_back_differently_is_removed(tmp_path, monkeypatch):
    unet = tiny_sd_pipeline(tmp_path).unet
    lset = inject_lora(unet, rank=2)
    randomize_up(lset)
    path = save_lora(lset, tmp_path / "r.safetensors", metadata=meta())
    before = path.read_bytes()
    real = LL.load_lora

    def tampered(p):
        lf = real(p)
        lf.targets[3].up = lf.targets[3].up * (1 + 1e-5)
        return lf

    monkeypatch.setattr(LL, "load_lora", tampered)
    randomize_up(lset, 9)
    with pytest.raises(SafeT2IError, match="read-back check failed.*differs"):
        save_lora(lset, path, metadata=meta(), overwrite=True)
    assert path.read_bytes() == before                       # the file that was there is kept
    with pytest.raises(SafeT2IError, match="read-back check failed"):
        save_lora(lset, tmp_path / "new.safetensors", metadata=meta())
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".safetensors" or "tmp" in p.name) == \
        ["r.safetensors"]


def test_several_formats_are_written_all_or_none(tmp_path, monkeypatch):
    unet = tiny_sd_pipeline(tmp_path).unet
    lset = inject_lora(unet, rank=2)
    randomize_up(lset, 3)
    paths = {"kohya": tmp_path / "k.safetensors", "peft": tmp_path / "k.peft.safetensors"}
    written = LL.save_lora_files(lset, paths, metadata=meta())
    assert written == list(paths.values())
    single = {fmt: LL.save_lora(lset, tmp_path / f"single-{fmt}.safetensors", fmt=fmt, metadata=meta())
              for fmt in paths}
    for fmt, p in paths.items():         # the same tensors and metadata as one save_lora call per format
        assert load_file(str(p)).keys() == load_file(str(single[fmt])).keys()
        assert all(torch.equal(load_file(str(p))[k], v) for k, v in load_file(str(single[fmt])).items())
        assert _header(p).get("__metadata__") == _header(single[fmt]).get("__metadata__")
    before = {p: p.read_bytes() for p in paths.values()}

    real = LL.save_lora

    def peft_fails(sets, path, *, fmt="kohya", **kw):
        if fmt == "peft":
            raise LL.LoraLayerError("disk full (test)")
        return real(sets, path, fmt=fmt, **kw)

    monkeypatch.setattr(LL, "save_lora", peft_fails)
    randomize_up(lset, 4)
    with pytest.raises(SafeT2IError, match="disk full"):
        LL.save_lora_files(lset, paths, metadata=meta(), overwrite=True)
    assert {p: p.read_bytes() for p in paths.values()} == before     # neither file changed
    new = {"kohya": tmp_path / "n.safetensors", "peft": tmp_path / "n.peft.safetensors"}
    with pytest.raises(SafeT2IError, match="disk full"):
        LL.save_lora_files(lset, new, metadata=meta())
    assert not any(p.exists() for p in new.values())                 # not the kohya file alone
    assert not [p for p in tmp_path.iterdir() if "tmp" in p.name or "staged" in p.name]
    monkeypatch.setattr(LL, "save_lora", real)
    with pytest.raises(SafeT2IError, match="exists; pass overwrite=True"):     # checked before any write
        LL.save_lora_files(lset, {"kohya": tmp_path / "fresh.safetensors", "peft": paths["peft"]}, metadata=meta())
    assert not (tmp_path / "fresh.safetensors").exists()


# ----------------------------------------------------------------------------- manifest entry

def test_manifest_entry_round_trip(sd1_lora, tmp_path):
    _, path = sd1_lora
    text = manifest_entry("duotest-nudity", "duotest_nudity_r4.safetensors", title="DUO nudity (local run)",
                          method="DUO: Direct Unlearning Optimization", paper="Park et al., arXiv 2407.21035",
                          arch="sd1", base_model="Stable Diffusion v1.4", lora_path=path)
    toml = tmp_path / "safety_models.toml"
    toml.write_text("schema = 1\n\n" + text)
    (entry,) = M.entries(toml)
    lf = load_lora(path)
    assert entry.name == "duotest-nudity" and entry.kind == "lora" and entry.arch == "sd1"
    assert entry.files == ["duotest_nudity_r4.safetensors"] and entry.sha256 == lf.sha256
    exp = entry.expected
    assert exp["components"] == ["unet"] and exp["targets"] == 64 and exp["rank"] == 4
    rx = re.compile(exp["module_regex"])
    unet = meta_unet_named("sd1")
    assert all(rx.search(n) for n in attn_names(unet, ("attn1",)))
    assert not any(rx.search(n) for n in attn_names(unet, ("attn2",)))
    assert M.find("duotest_nudity_r4.safetensors", "", toml) is entry
    assert M.find("renamed.safetensors", lf.sha256, toml) is entry
    lf.entry = entry
    assert lf.verify_manifest() == "verified" and len(check_for_host(lf, "sd1").matched) == 64
    # another trained file under the entry's name is refused by its sha256
    model = sd1_attention_skeleton()
    other = inject_lora(model, targets="self-attention", rank=4, alpha=2.0, seed=99)
    randomize_up(other, 98)
    lf2 = load_lora(save_lora(other, tmp_path / "duotest_nudity_r4.safetensors", metadata=meta()))
    lf2.entry = entry
    with pytest.raises(ModelLoadError, match="does not match the manifest"):
        lf2.verify_manifest()
    with pytest.raises(ModelLoadError, match="too generic"):
        manifest_entry("duotest-nudity", "my_lora.safetensors", title="t", method="m", paper="p", arch="sd1",
                       base_model="b", lora_path=path)
    with pytest.raises(SafeT2IError, match=r"does not fit SDXL.* completely \(it fits sd1, sd2\)"):
        manifest_entry("duotest-nudity", "duotest.safetensors", title="t", method="m", paper="p", arch="sdxl",
                       base_model="b", lora_path=path)


def test_module_regex_for_both_attentions():
    unet = meta_unet_named("sd1")
    both = attn_names(unet, ("attn1", "attn2"))
    rx = LL.module_regex(both)
    assert rx == r"(attn1|attn2)\.(to_k|to_out\.0|to_q|to_v)$"
    assert all(re.search(rx, n) for n in both)
    assert LL.module_regex(attn_names(unet, ("attn1",))) == r"attn1\.(to_k|to_out\.0|to_q|to_v)$"
    assert set(TARGET_PRESETS) == {"self-attention", "cross-attention", "attention"}
