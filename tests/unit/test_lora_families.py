"""Model layer for diffusion transformers: SD3/SD3.5, Flux.1, Qwen-Image, Wan 2.1/2.2.

References, none of them safet2i: the real diffusers classes' modules (tiny configs, and every
released size on the meta device), diffusers' own ``load_lora_weights`` + ``fuse_lora`` (its own
kohya / ComfyUI / PEFT converters), and scale·B·A computed here in float64 from the file's own
tensors. ComfyUI's own key map is checked in tests/integration/test_comfy_lora_families.py.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lora_fixtures import (DIT_LAYOUTS, DIT_TINY, NATIVE_LAYOUTS, Factor, dit_family, dit_linear_shapes, make_factors,
                           tiny_dit, write_dit_layout)
from safet2i.errors import ModelLoadError, SafeT2IError
from safet2i.lora import (CoverageError, check_for_host, convert_lora, detect_format, inspect_lora, load_lora,
                          manifest)
from safet2i.lora import dit_arch as D
from safet2i.lora.keys import LoraFormatError, normalise_dit, parse, to_native_kohya

# --------------------------------------------------------------------------- architecture


@pytest.mark.parametrize("key", sorted(DIT_TINY))
def test_inventory_is_the_real_classes_linear_modules(key):
    model = tiny_dit(key, "meta")
    inv = D.build(dit_family(key), model.config)
    assert {k: m.shape for k, m in inv.modules.items()} == dit_linear_shapes(model)


@pytest.mark.parametrize("name", sorted(D.DIT_ARCHITECTURES))
def test_released_sizes_are_the_real_classes_at_those_configs(name):
    import diffusers

    a = D.DIT_ARCHITECTURES[name]
    cls = {"flux": "FluxTransformer2DModel", "sd3": "SD3Transformer2DModel", "qwen-image": "QwenImageTransformer2DModel",
           "wan": "WanTransformer3DModel"}[a.family]
    kw = dict(a.config_dict)
    if a.family == "wan":
        kw["patch_size"] = tuple(kw["patch_size"])
    with torch.device("meta"):
        model = getattr(diffusers, cls)(**kw)
    inv = D.arch_inventory(name)
    assert {k: m.shape for k, m in inv.modules.items()} == dit_linear_shapes(model)
    assert D.match_config(a.family, model.config) == name


def test_released_sizes_differ_and_native_names_are_consistent():
    sigs = {}
    for name in D.DIT_ARCHITECTURES:
        inv = D.arch_inventory(name)
        sig = tuple(sorted(D.shape_signature(inv).items()))
        assert sig not in sigs, (name, sigs.get(sig))
        sigs[sig] = name
        owned = set()
        for nat in inv.natives.values():
            assert nat.shape[0] == sum(p.rows for p in nat.pieces)
            assert [p.start for p in nat.pieces] == list(np.cumsum([0] + [p.rows for p in nat.pieces[:-1]]))
            for p in nat.pieces:
                assert inv.modules[p.diffusers].shape == (p.rows, *nat.shape[1:])
                owned.add(p.diffusers)
        assert owned == set(inv.modules)    # every module lives in exactly one native weight
        # a name that is both a diffusers and a native name is the same module in both
        for n in set(inv.modules) & set(inv.natives):
            assert inv.natives[n].pieces == (D.Piece(n, 0, inv.modules[n].shape[0]),), n


def test_flux_sd3_stacks_and_swaps():
    inv = D.build("flux", DIT_TINY["flux"][1])
    h = 16
    qkv = inv.natives["double_blocks.0.img_attn.qkv"]
    assert [(p.diffusers, p.start, p.rows) for p in qkv.pieces] == [
        ("transformer_blocks.0.attn.to_q", 0, h), ("transformer_blocks.0.attn.to_k", h, h),
        ("transformer_blocks.0.attn.to_v", 2 * h, h)]
    lin1 = inv.natives["single_blocks.1.linear1"]
    assert [p.diffusers.rsplit(".", 1)[-1] for p in lin1.pieces] == ["to_q", "to_k", "to_v", "proj_mlp"]
    assert lin1.shape == (3 * h + 4 * h, h)
    assert inv.natives["final_layer.adaLN_modulation.1"].pieces[0].swap
    sd3 = D.build("sd3", DIT_TINY["sd3"][1])
    assert sd3.natives["joint_blocks.2.context_block.adaLN_modulation.1"].pieces[0].swap      # last block
    assert not sd3.natives["joint_blocks.1.context_block.adaLN_modulation.1"].fused
    assert "joint_blocks.0.x_block.attn2.qkv" in sd3.natives and "joint_blocks.1.x_block.attn2.qkv" not in sd3.natives


# --------------------------------------------------------------------------- factor algebra


def _native_truth(inv, factors: list[Factor]) -> dict[str, np.ndarray]:
    """{diffusers module: ΔW} of native-named factors, rows cut from the native ΔW in float64 here."""
    out = {}
    for f in factors:
        full = f.delta64()
        for p in inv.natives[f.name].pieces:
            rows = full[p.start:p.start + p.rows]
            if p.swap:
                rows = np.concatenate([rows[p.rows // 2:], rows[:p.rows // 2]])
            out[p.diffusers] = rows
    return out


@pytest.mark.parametrize("key", ["flux", "sd3"])
def test_split_of_stacked_native_lora_is_exact(key):
    inv = D.build(key, DIT_TINY[key][1])
    fused = {n: nat.shape for n, nat in inv.natives.items() if nat.fused}
    factors = make_factors(fused, rank=3, seed=4, alpha=1.5)
    targets = normalise_dit(parse(write_dit_layout(factors, "kohya-native")), inv)
    truth = _native_truth(inv, factors)
    assert {t.module for t in targets} == set(truth)
    by_src = {f.name: f for f in factors}
    for t in targets:
        np.testing.assert_array_equal(t.delta(torch.float64).numpy(), truth[t.module])  # bit for bit
        src = by_src[inv.owner[t.module]]
        assert torch.equal(t.down, src.down) and t.alpha == 1.5 and t.rank == 3     # same A, alpha, rank


@pytest.mark.parametrize("key", ["flux", "sd3"])
def test_fuse_of_separate_targets_has_the_same_delta(key):
    inv = D.build(key, DIT_TINY[key][1])
    shapes = {n: m.shape for n, m in inv.modules.items() if len(m.shape) == 2}
    rng = np.random.default_rng(0)
    # different ranks and alphas per module; some pieces of stacked weights left out
    dropped = {n for n in shapes if n.endswith((".to_v", ".add_k_proj")) and "single" not in n}
    factors = []
    for i, (n, shp) in enumerate(sorted(shapes.items())):
        if n in dropped:
            continue
        factors += make_factors({n: shp}, rank=int(rng.integers(1, 4)), seed=i, alpha=float(rng.uniform(0.5, 3)))
    sd = write_dit_layout(factors, "peft-transformer")
    for f in factors:   # PEFT files carry no alpha: fold it in the test's own truth instead
        f.up, f.alpha = f.up * (f.alpha / f.down.shape[0]), None
    targets = normalise_dit(parse(write_dit_layout(factors, "peft-transformer")), inv)
    native = to_native_kohya(targets, inv)
    assert all(k.startswith("lora_unet_") for k in native)
    back = normalise_dit(parse(native), inv)
    got = {t.module: t.delta(torch.float64).numpy() for t in back}
    want = {f.name: f.delta64() for f in factors}
    assert set(got) == set(want)          # left-out pieces stay unpatched (zero rows dropped)
    for n, d in want.items():
        np.testing.assert_allclose(got[n], d, rtol=1e-6, atol=1e-9 * np.abs(d).max())
    assert sd  # the PEFT layout was written


def test_fuse_after_split_is_bit_exact():
    inv = D.build("flux", DIT_TINY["flux"][1])
    factors = make_factors({n: nat.shape for n, nat in inv.natives.items()}, rank=2, seed=9, alpha=3.0)
    sd = write_dit_layout(factors, "kohya-native")
    back = to_native_kohya(normalise_dit(parse(sd), inv), inv)
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert torch.equal(back[k].to(v.dtype), v), k


def test_dora_on_stacked_weight_is_refused():
    inv = D.build("flux", DIT_TINY["flux"][1])
    f = make_factors({"double_blocks.0.img_attn.qkv": inv.natives["double_blocks.0.img_attn.qkv"].shape})[0]
    sd = write_dit_layout([f], "comfy-native")
    sd["diffusion_model.double_blocks.0.img_attn.qkv.dora_scale"] = torch.ones(48, 1)
    with pytest.raises(LoraFormatError, match="cannot be split exactly"):
        normalise_dit(parse(sd), inv)


# --------------------------------------------------------------------------- key formats


@pytest.mark.parametrize("layout", sorted(DIT_LAYOUTS))
@pytest.mark.parametrize("key", ["flux", "sd3", "qwen-image", "wan", "wan-i2v"])
def test_every_layout_parses_to_every_module(key, layout):
    inv = D.build(dit_family(key), DIT_TINY[key][1])
    names = inv.natives if layout in NATIVE_LAYOUTS else inv.modules
    shapes = {n: (x.shape) for n, x in names.items()}
    factors = make_factors(shapes, seed=1)
    targets = normalise_dit(parse(write_dit_layout(factors, layout)), inv)
    truth = _native_truth(inv, factors) if layout in NATIVE_LAYOUTS else {f.name: f.delta64() for f in factors}
    assert {t.module for t in targets} == set(inv.modules) == set(truth)
    assert all(t.naming == "diffusers" and t.component == "unet" for t in targets)
    for t in targets:
        np.testing.assert_allclose(t.delta(torch.float64).numpy(), truth[t.module], rtol=0, atol=0)


def test_format_names():
    inv = D.build("flux", DIT_TINY["flux"][1])
    f = make_factors({"double_blocks.0.img_attn.qkv": inv.natives["double_blocks.0.img_attn.qkv"].shape})
    assert detect_format(write_dit_layout(f, "kohya-native")) == ["Flux BFL/ComfyUI names", "kohya"]
    g = make_factors({"transformer_blocks.0.attn.add_k_proj": (16, 16)})
    assert detect_format(write_dit_layout(g, "peft-transformer")) == ["diffusers-PEFT", "transformer (diffusers) names"]
    w = make_factors({"blocks.0.self_attn.q": (16, 16)})
    assert "Wan original/ComfyUI names" in detect_format(write_dit_layout(w, "comfy-native"))
    s = make_factors({"joint_blocks.0.x_block.attn.qkv": (48, 16)})
    assert "SD3 MMDiT (SAI/ComfyUI) names" in detect_format(write_dit_layout(s, "kohya-native"))


def test_unknown_transformer_keys_and_bias_diffs_fail_closed():
    with pytest.raises(LoraFormatError, match="unrecognised LoRA key"):
        parse({"diffusion_model.blocks.0.self_attn.norm_q.diff": torch.ones(4)})
    with pytest.raises(LoraFormatError, match="cannot tell which model part"):
        parse({"transformerx.foo.lora_A.weight": torch.ones(2, 4), "transformerx.foo.lora_B.weight": torch.ones(4, 2)})


# --------------------------------------------------------------------------- real sizes, no host


def _eraseanything(tmp_path, name="ea.safetensors", dtype=torch.bfloat16):
    """EraseAnything's released layout (tomguluson92/EraseAnything, train_flux_lora.py + config.yaml:
    FluxPipeline.save_lora_weights of PEFT target_modules attn.add_k_proj / attn.add_q_proj, r = 8,
    lora_alpha = r): transformer.transformer_blocks.<0..18>.attn.add_{k,q}_proj.lora_{A,B}.weight."""
    g = torch.Generator().manual_seed(0)
    sd = {}
    for i in range(19):
        for p in ("add_k_proj", "add_q_proj"):
            stem = f"transformer.transformer_blocks.{i}.attn.{p}"
            sd[stem + ".lora_A.weight"] = (torch.randn(8, 3072, generator=g) * 0.01).to(dtype)
            sd[stem + ".lora_B.weight"] = (torch.randn(3072, 8, generator=g) * 0.01).to(dtype)
    path = tmp_path / name
    save_file(sd, str(path))
    return path


def test_eraseanything_layout_is_recognised_and_held_to_its_family(tmp_path):
    path = _eraseanything(tmp_path)
    info = inspect_lora(path, base="flux-dev")
    assert info["formats"] == ["diffusers-PEFT", "transformer (diffusers) names"]
    assert info["targets"] == 38 and info["ranks"] == [8] and info["scales"] == [1.0]
    # add_q/add_k [3072, 3072] exist in Flux dev/schnell and (blocks 0..18) in Qwen-Image
    assert info["architectures"] == ["flux-dev", "flux-schnell", "qwen-image"]
    assert info["load_check"] == "ok"
    for base, why in (("sd3-medium", "made for"), ("sdxl", "module names"), ("wan-14b", "module names")):
        assert inspect_lora(path, base=base)["load_check"].startswith("REFUSED"), base
        with pytest.raises((ModelLoadError, CoverageError), match=why):
            check_for_host(load_lora(path), base)


def test_eraseanything_manifest_entry(tmp_path):
    e = next(x for x in manifest.entries() if x.name == "eraseanything-flux-nudity")
    assert e.arch == "flux-dev" and e.expected["targets"] == 38 and e.expected["rank"] == 8 and len(e.sha256) == 64
    # the layout's contents satisfy the entry (sha256 aside: this is not the released file)
    lf = load_lora(_eraseanything(tmp_path))
    assert manifest.verify(e, "", lf.components, [t.module for t in lf.targets], lf.ranks) == "unverified"
    # a different file under the release's distinctive name: refused by its sha256
    with pytest.raises(ModelLoadError, match="sha256"):
        load_lora(_eraseanything(tmp_path, "eraseanything_flux_nudity.safetensors")).verify_manifest()


def test_kohya_flux_native_file_fits_flux_only_and_converts_back(tmp_path):
    inv = D.arch_inventory("flux-dev")
    picks = ["double_blocks.3.img_attn.qkv", "single_blocks.10.linear1", "double_blocks.0.txt_attn.proj"]
    factors = make_factors({n: inv.natives[n].shape for n in picks}, rank=2, seed=3, std=0.05)
    save_file(write_dit_layout(factors, "kohya-native"), str(tmp_path / "k.safetensors"))
    lf = load_lora(tmp_path / "k.safetensors")
    assert lf.architectures == ["flux-dev", "flux-schnell"]
    assert len(lf.targets) == 3 + 4 + 1 and all(t.naming == "diffusers" for t in lf.targets)   # split
    rep = convert_lora(tmp_path / "k.safetensors", tmp_path / "out.safetensors")
    assert rep["check"] == "shape"
    from safetensors.torch import load_file

    out = load_file(str(tmp_path / "out.safetensors"))
    src = write_dit_layout(factors, "kohya-native")
    for k, v in src.items():
        assert torch.equal(out[k], v), k       # split then fused with a shared down: the same bytes


# --------------------------------------------------------------------------- diffusers hosts

_PIPES = {}


def _pipe(key, tmp_path_factory):
    import tiny_families as tf

    if key not in _PIPES:
        build = {"flux": tf.tiny_flux, "sd3": tf.tiny_sd3, "qwen-image": tf.tiny_qwen_image, "wan": tf.tiny_wan}[key]
        _PIPES[key] = build(tmp_path_factory.mktemp(key))
    return _PIPES[key]


def _params(pipe):
    return {n: p.detach().clone() for n, p in pipe.transformer.named_parameters()}


@pytest.mark.parametrize("layout", sorted(DIT_LAYOUTS))
@pytest.mark.parametrize("key", ["flux", "sd3", "qwen-image", "wan"])
def test_load_safety_lora_is_base_plus_strength_delta_and_undo_restores(key, layout, tmp_path, tmp_path_factory):
    from safet2i.diffusers_adapter import host_arch, load_safety_lora

    pipe = _pipe(key, tmp_path_factory)
    assert host_arch(pipe).startswith(f"{key} (")          # a tiny model: no released size
    inv = D.build(key, pipe.transformer.config)
    names = inv.natives if layout in NATIVE_LAYOUTS else inv.modules
    factors = make_factors({n: x.shape for n, x in names.items()}, rank=3, seed=2, alpha=None)
    truth = _native_truth(inv, factors) if layout in NATIVE_LAYOUTS else {f.name: f.delta64() for f in factors}
    save_file(write_dit_layout(factors, layout), str(tmp_path / "l.safetensors"))
    before = _params(pipe)
    handle = load_safety_lora(pipe, tmp_path / "l.safetensors", strength=0.6)
    try:
        assert len(handle.coverage.applied) == len(truth) and not handle.coverage.unmatched
        after = _params(pipe)
        for n, v in after.items():
            mod = n[:-len(".weight")]
            if n.endswith(".weight") and mod in truth:
                ref = before[n].double().numpy() + 0.6 * truth[mod]
                np.testing.assert_allclose(v.double().numpy(), ref, atol=2e-6, rtol=1e-6)
            else:
                assert torch.equal(v, before[n]), n
    finally:
        handle.undo()
    assert all(torch.equal(v, before[n]) for n, v in _params(pipe).items())


@pytest.mark.parametrize("key,other", [("flux", "sd3"), ("sd3", "flux"), ("wan", "qwen-image"), ("qwen-image", "wan")])
def test_another_familys_lora_is_refused_and_nothing_changes(key, other, tmp_path, tmp_path_factory):
    from safet2i.diffusers_adapter import load_safety_lora

    pipe = _pipe(key, tmp_path_factory)
    inv = D.build(other, _pipe(other, tmp_path_factory).transformer.config)
    only = {n: nat.shape for n, nat in inv.natives.items() if "blocks" in n}
    save_file(write_dit_layout(make_factors(only, seed=5), "comfy-native"), str(tmp_path / "x.safetensors"))
    before = _params(pipe)
    with pytest.raises(SafeT2IError, match="module names|patches NOTHING"):
        load_safety_lora(pipe, tmp_path / "x.safetensors")
    assert all(torch.equal(v, before[n]) for n, v in _params(pipe).items())


def test_sd_unet_lora_on_flux_is_refused(tmp_path, tmp_path_factory):
    from lora_fixtures import duo_state

    from safet2i.diffusers_adapter import load_safety_lora

    pipe = _pipe("flux", tmp_path_factory)
    save_file(duo_state("sd1", rank=2), str(tmp_path / "duo.safetensors"))
    before = _params(pipe)
    with pytest.raises(SafeT2IError, match="made for|module names"):
        load_safety_lora(pipe, tmp_path / "duo.safetensors")
    assert all(torch.equal(v, before[n]) for n, v in _params(pipe).items())


def test_partial_file_is_refused_then_allowed(tmp_path, tmp_path_factory):
    from safet2i.diffusers_adapter import load_safety_lora

    pipe = _pipe("wan", tmp_path_factory)
    inv = D.build("wan", pipe.transformer.config)
    shapes = {n: m.shape for n, m in inv.modules.items() if ".attn1." in n}
    factors = make_factors(shapes, seed=6)
    sd = write_dit_layout(factors, "peft-transformer")
    sd["transformer.blocks.7.attn1.to_q.lora_A.weight"] = factors[0].down.clone()   # no block 7 here
    sd["transformer.blocks.7.attn1.to_q.lora_B.weight"] = factors[0].up.clone()
    save_file(sd, str(tmp_path / "p.safetensors"))
    before = _params(pipe)
    with pytest.raises(CoverageError, match="only 8 of its 9"):
        load_safety_lora(pipe, tmp_path / "p.safetensors")
    assert all(torch.equal(v, before[n]) for n, v in _params(pipe).items())
    h = load_safety_lora(pipe, tmp_path / "p.safetensors", allow_partial=True)
    assert len(h.coverage.applied) == 8
    h.undo()


# Formats diffusers itself converts (lora_conversion_utils): its load_lora_weights + fuse_lora is
# an independent implementation of the same merge.
_DIFFUSERS_REF = [("flux", "peft-transformer"), ("sd3", "peft-transformer"),
                  ("qwen-image", "peft-transformer"), ("qwen-image", "comfy-native"), ("wan", "comfy-native"),
                  ("wan", "peft-transformer")]


@pytest.mark.parametrize("key,layout", _DIFFUSERS_REF)
def test_same_weights_as_diffusers_own_loader(key, layout, tmp_path, tmp_path_factory):
    pytest.importorskip("peft")
    from safet2i.diffusers_adapter import load_safety_lora

    pipe = _pipe(key, tmp_path_factory)
    inv = D.build(key, pipe.transformer.config)
    if layout in NATIVE_LAYOUTS:
        shapes = {n: nat.shape for n, nat in inv.natives.items() if n.startswith(("double_blocks", "single_blocks",
                                                                                 "blocks", "transformer_blocks"))}
    else:
        shapes = {n: m.shape for n, m in inv.modules.items() if n.startswith(("transformer_blocks", "blocks",
                                                                             "single_transformer_blocks"))}
    factors = make_factors(shapes, rank=2, seed=7, alpha=3.0 if layout in NATIVE_LAYOUTS else None)
    sd = write_dit_layout(factors, layout)
    save_file(sd, str(tmp_path / "r.safetensors"))
    before = _params(pipe)
    handle = load_safety_lora(pipe, tmp_path / "r.safetensors", strength=1.0)
    ours = _params(pipe)
    handle.undo()
    pipe.load_lora_weights({k: v.clone() for k, v in sd.items()}, adapter_name="ref")
    try:
        pipe.fuse_lora(lora_scale=1.0, adapter_names=["ref"])
        theirs = {n.replace(".base_layer.", "."): v for n, v in _params(pipe).items() if ".lora_" not in n}
    finally:
        pipe.unload_lora_weights()
        with torch.no_grad():   # diffusers' unfuse subtracts (not bit-exact): restore the shared tiny pipeline
            for n, p in pipe.transformer.named_parameters():
                p.copy_(before[n])
    changed = 0
    for n, v in ours.items():
        torch.testing.assert_close(v, theirs[n], atol=2e-6, rtol=1e-5, msg=n)
        changed += not torch.equal(v, before[n])
    assert changed == len(_native_truth(inv, factors) if layout in NATIVE_LAYOUTS else factors)


def test_kohya_flux_split_matches_diffusers_own_converter():
    """diffusers' kohya Flux converter hard-codes Flux.1's widths (3072, linear1 = 3·3072 + 12288),
    so it is compared at the real size, on the state dict: blocks 0 and every top-level module."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    inv = D.arch_inventory("flux-dev")
    picks = [n for n in inv.natives if n.startswith(("double_blocks.0.", "single_blocks.0.")) or "blocks" not in n]
    factors = make_factors({n: inv.natives[n].shape for n in picks}, rank=2, seed=1, alpha=3.0, std=0.05)
    for f in factors:   # diffusers 0.42 drops the .alpha of final_layer.* (ComfyUI and we apply it): alpha = rank there
        if f.name.startswith("final_layer."):
            f.alpha = None
    sd = write_dit_layout(factors, "kohya-native")
    theirs = _convert_kohya_flux_lora_to_diffusers({k: v.clone() for k, v in sd.items()})
    ref = {}
    for k in theirs:
        if k.endswith(".lora_A.weight"):
            m = k.removeprefix("transformer.")[:-len(".lora_A.weight")]
            ref[m] = theirs[k.replace("lora_A", "lora_B")].double() @ theirs[k].double()   # alpha folded in by diffusers
    ours = {t.module: t.delta(torch.float64) for t in normalise_dit(parse(sd), inv)}
    assert set(ours) == set(ref) and len(ours) == sum(len(inv.natives[n].pieces) for n in picks)
    for m, d in ours.items():
        # diffusers folds alpha/rank into float32 factors: float32 rounding only
        torch.testing.assert_close(d, ref[m], rtol=1e-6, atol=1e-8, msg=m)


def test_host_arch_names_released_sizes():
    from safet2i.diffusers_adapter import host_arch

    import diffusers

    for name, a in D.DIT_ARCHITECTURES.items():
        cls = {"flux": "FluxTransformer2DModel", "sd3": "SD3Transformer2DModel",
               "qwen-image": "QwenImageTransformer2DModel", "wan": "WanTransformer3DModel"}[a.family]
        kw = dict(a.config_dict)
        if a.family == "wan":
            kw["patch_size"] = tuple(kw["patch_size"])
        with torch.device("meta"):
            tr = getattr(diffusers, cls)(**kw)
        assert host_arch(types.SimpleNamespace(transformer=tr)) == name


# --------------------------------------------------------------------------- ComfyUI node helpers (pure)


def _node_helpers(monkeypatch):
    """nodes/lora_nodes.py imported with stand-ins for ComfyUI's modules (only its pure helpers are used)."""
    import importlib
    import sys
    from pathlib import Path

    latest = types.ModuleType("comfy_api.latest")
    latest.io = types.SimpleNamespace(ComfyNode=type("ComfyNode", (), {}))
    latest.ui = types.SimpleNamespace()
    folder_paths = types.ModuleType("folder_paths")
    folder_paths.folder_names_and_paths, folder_paths.models_dir = {}, "/nonexistent"
    folder_paths.get_filename_list = lambda folder: []
    pack = types.ModuleType("_lora_fam_pack")
    pack.__path__ = [str(Path(__file__).resolve().parents[2])]
    stubs = {"comfy_api": types.ModuleType("comfy_api"), "comfy_api.latest": latest, "folder_paths": folder_paths,
             "_lora_fam_pack": pack}
    for name, mod in list(sys.modules.items()):
        if name == "safet2i" or name.startswith("safet2i."):
            stubs["_lora_fam_pack." + name] = mod
    for name, mod in stubs.items():
        monkeypatch.setitem(sys.modules, name, mod)
    mod = importlib.import_module("_lora_fam_pack.nodes.lora_nodes")
    for name in [n for n in sys.modules if n.startswith("_lora_fam_pack.nodes")]:
        monkeypatch.delitem(sys.modules, name)
    return mod


def test_comfy_config_to_architecture(monkeypatch):
    mod = _node_helpers(monkeypatch)
    arch = mod.comfy_transformer_arch
    flux = dict(image_model="flux", in_channels=16, out_channels=16, patch_size=2, vec_in_dim=768, context_in_dim=4096,
                hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38, axes_dim=[16, 56, 56],
                theta=10000, qkv_bias=True, guidance_embed=True)
    assert arch("flux", flux) == "flux-dev"
    assert arch("flux", {**flux, "guidance_embed": False}) == "flux-schnell"
    assert arch("flux", {**flux, "depth": 2}).startswith("flux (")
    sd3 = dict(in_channels=16, out_channels=16, patch_size=2, depth=24, adm_in_channels=2048,
               context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 1536}},
               x_block_self_attn_layers=[])
    assert arch("sd3", sd3) == "sd3-medium"
    assert arch("sd3", {**sd3, "x_block_self_attn_layers": list(range(13))}) == "sd3.5-medium"
    assert arch("sd3", {**sd3, "depth": 38, "context_embedder_config": {"params": {"in_features": 4096,
                                                                                    "out_features": 2432}}}) == "sd3.5-large"
    assert arch("qwen-image", dict(image_model="qwen_image", in_channels=64, num_layers=60)) == "qwen-image"
    wan = dict(image_model="wan2.1", model_type="t2v", dim=5120, num_heads=40, ffn_dim=13824, num_layers=40,
               freq_dim=256, out_dim=16, patch_size=(1, 2, 2), in_dim=16)
    assert arch("wan", wan) == "wan-14b"
    assert arch("wan", {**wan, "model_type": "i2v", "in_dim": 36}) == "wan2.1-i2v-14b"
    assert arch("wan", {**wan, "dim": 1536, "num_heads": 12, "ffn_dim": 8960, "num_layers": 30}) == "wan2.1-1.3b"
    assert arch("wan", {**wan, "dim": 3072, "num_heads": 24, "ffn_dim": 14336, "num_layers": 30,
                        "out_dim": 48}) == "wan2.2-5b"
    # key-map entries: plain, an offset slice of a stacked weight, a row function
    key, shape = mod._key_map_entry(("diffusion_model.double_blocks.0.img_attn.qkv.weight", (0, 16, 16)))
    assert key.endswith("qkv.weight") and shape((48, 16)) == (16, 16)
    assert mod._key_map_entry(("k", None, abs))[1]((8, 4)) == (8, 4)
    assert mod._key_map_entry("k")[1]((8, 4)) == (8, 4)
    t = types.SimpleNamespace(component="unet", module="blocks.3.attn1.to_q", naming="diffusers")
    assert "diffusion_model.blocks.3.self_attn.q" in mod._candidates(t)
    assert "transformer.blocks.3.attn1.to_q" in mod._candidates(t)
