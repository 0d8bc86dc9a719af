"""SafeT2I Load Safety LoRA on SD3, SD3.5, Flux.1 [dev], Qwen-Image and Wan 2.1 in a real ComfyUI.

The models are the tiny ones of ``test_comfy_families.py`` (UNETLoader files for SD3, SD3.5 and Wan;
``SafeT2ITestTinyModel`` for Flux and Qwen-Image). The LoRA files are written here for each tiny
model's shapes, and their names come from ComfyUI itself, never from safet2i's inventories:

* native layouts (kohya ``lora_unet_<native>`` with alpha, ComfyUI/BFL ``diffusion_model.<native>``):
  one LoRA per 2-d/4-d ``diffusion_model.*`` weight of the loaded model (Flux's fused
  ``img_attn.qkv`` / ``txt_attn.qkv`` / ``linear1``, SD3's ``attn.qkv`` and SD3.5's ``attn2.qkv``
  among them);
* diffusers/PEFT ``transformer.<path>`` for Flux, SD3 and Qwen-Image: one LoRA per name of
  ComfyUI's own LoRA key map (``model_lora_keys_unet``) whose weight is 2-d/4-d, sized from the
  map's slice (stacked q/k/v/mlp rows) or the whole weight;
* Wan's diffusers/PEFT names: the native file renamed by diffusers' own converter
  (``_convert_non_diffusers_wan_lora_to_diffusers``; ComfyUI's key map has no diffusers names for Wan).

Each file is loaded with the node and checked against (1) its report (every target matched and
applied, nothing unmatched), (2) the weights ComfyUI computes when it loads the model for sampling
(``comfy_pack_lora_probe.py``), equal to ``W + strength·ΔW`` with ΔW computed here in float64 from
the file's tensors and ComfyUI's own slice / row-swap rules, and (3) where ComfyUI's stock
``LoraLoaderModelOnly`` loads the format, bit-identical to its weights. Then refusals (another
family's LoRA, a partial file, a Flux.1-sized file on another Flux size) and sampled pixels.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from .test_comfy_families import (FLUX_SAMPLING, SD3_LATENT, WAN_LATENT, family_files, graph,  # noqa: F401
                                   pixels, run_ok, tiny, unet)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from lora_fixtures import Factor, duo_state, make_factors, write_dit_layout  # noqa: E402

pytestmark = pytest.mark.integration

# family -> (model node, SafeT2ITestTinyCLIP family)
MODELS = {
    "sd3": (unet("tiny_sd3.safetensors")["m"], "sd3"),
    "sd35": (unet("tiny_sd35.safetensors")["m"], "sd3"),
    "flux": (tiny("flux_dev")["m"], "flux"),
    "qwen": (tiny("qwen_image")["m"], "qwen_image"),
    "wan": (unet("tiny_wan21_t2v.safetensors")["m"], "wan"),
}
RANK, ALPHA = 2, 3.0        # native layouts write alpha 3 (scale 1.5); PEFT files none (scale 1)
STRENGTH = 0.7


def ours(name: str, strength: float = STRENGTH, allow_partial: bool = False, model=("m", 0)) -> dict:
    return {"class_type": "SafeT2ILoadSafetyLoRA", "inputs": {
        "model": list(model), "clip": ["clip", 0], "lora_name": name, "strength_model": strength,
        "strength_clip": 1.0, "allow_partial": allow_partial}}


def stock(name: str, strength: float = STRENGTH, model=("m", 0)) -> dict:
    return {"class_type": "LoraLoaderModelOnly", "inputs": {"model": list(model), "lora_name": name,
                                                            "strength_model": strength}}


def probe_graph(fam: str, loader: dict | None, name: str) -> dict:
    model, clip = MODELS[fam]
    g = {"m": model, "clip": {"class_type": "SafeT2ITestTinyCLIP", "inputs": {"family": clip, "seed": 0}}}
    src = ["m", 0]
    if loader is not None:
        g["lora"] = loader
        src = ["lora", 0]
        if loader["class_type"] == "SafeT2ILoadSafetyLoRA":
            g["rep"] = {"class_type": "PreviewAny", "inputs": {"source": ["lora", 2]}}
    g["probe"] = {"class_type": "SafeT2ITestLoraProbe", "inputs": {"model": src, "name": name}}
    return g


def probed(comfy, entry, name: str) -> tuple[dict, dict]:
    info = json.loads(entry["outputs"]["probe"]["text"][0])
    path = comfy.output_dir / f"{name}.safetensors"
    return info, (load_file(str(path)) if info["patches"] else {})


def report(entry) -> dict:
    return json.loads(entry["outputs"]["rep"]["text"][0])


def error_text(entry) -> str:
    assert entry["status"]["status_str"] == "error", json.dumps(entry["status"])[:2000]
    return json.dumps(entry["status"]["messages"])


@pytest.fixture(scope="module")
def hosts(comfy, family_files) -> dict:
    """Per family, what ComfyUI's loaded model holds: weight shapes and ``transformer.*`` key map."""
    out = {}
    for fam in MODELS:
        info, _ = probed(comfy, run_ok(comfy, probe_graph(fam, None, f"host_{fam}")), f"host_{fam}")
        assert info["patches"] == {}
        out[fam] = info
    return out


def native_shapes(host: dict) -> dict[str, tuple[int, ...]]:
    """{native module: shape} of every 2-d/4-d diffusion_model weight (what a native LoRA can patch)."""
    return {k[len("diffusion_model."):-len(".weight")]: tuple(v) for k, v in host["shapes"].items()
            if k.endswith(".weight") and len(v) in (2, 4)}


def diffusers_shapes(host: dict) -> dict[str, tuple[int, ...]]:
    """{diffusers module: shape} from ComfyUI's key map: a slice's rows, else the whole weight."""
    out = {}
    for k, (weight, off, _fn) in host["key_map"].items():
        shape = host["shapes"].get(weight)
        if shape is None:
            continue                    # SD3's map names attn2 in every block; only SD3.5's dual blocks have it
        if len(shape) not in (2, 4):
            continue                    # norm scales (1-d): not LoRA targets
        if off is not None:
            shape = [*shape[:off[0]], off[2], *shape[off[0] + 1:]]
        out[k[len("transformer."):]] = tuple(shape)
    return out


def _swap(d: np.ndarray) -> np.ndarray:      # ComfyUI's swap_scale_shift: (shift, scale) -> (scale, shift)
    h = d.shape[0] // 2
    return np.concatenate([d[h:], d[:h]])


def expected_deltas(host: dict, factors: list[Factor], naming: str) -> dict[str, np.ndarray]:
    """{ComfyUI weight key: ΔW (float64, strength 1)} of a file, placed by ComfyUI's own key map."""
    out: dict[str, np.ndarray] = {}
    for f in factors:
        d = f.delta64()
        if naming == "native":
            key, off, fn = f"diffusion_model.{f.name}.weight", None, None
        else:
            key, off, fn = host["key_map"][f"transformer.{f.name}"]
        full = out.setdefault(key, np.zeros(host["shapes"][key]))
        if fn is not None:
            assert fn == "swap_scale_shift", fn
            d = _swap(d)
        if off is None:
            full += d
        else:
            assert off[0] == 0
            full[off[1]:off[1] + off[2]] += d
    return out


def wan_diffusers_file(native: list[Factor]) -> dict[str, torch.Tensor]:
    """Wan's diffusers/PEFT layout of native factors, renamed by diffusers' own converter."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_wan_lora_to_diffusers

    sd = {k: v for k, v in write_dit_layout(native, "comfy-native").items() if not k.endswith(".alpha")}
    out = _convert_non_diffusers_wan_lora_to_diffusers(sd)
    assert all(k.startswith("transformer.") for k in out) and len(out) == len(sd)
    return out


# (family, layout, stock LoraLoaderModelOnly loads it)
CASES = [
    ("sd3", "peft-transformer", True), ("sd3", "kohya-native", True), ("sd3", "comfy-native", True),
    ("sd35", "peft-transformer", True), ("sd35", "kohya-native", True), ("sd35", "comfy-native", True),
    ("flux", "peft-transformer", True), ("flux", "kohya-native", True), ("flux", "comfy-native", True),
    ("qwen", "peft-transformer", True), ("qwen", "kohya-native", True), ("qwen", "comfy-native", True),
    ("wan", "peft-transformer", False), ("wan", "kohya-native", True), ("wan", "comfy-native", True),
]


def build_file(comfy, hosts, fam: str, layout: str, seed: int = 0, std: float = 0.2):
    """(file name, factors, naming of the factors, ΔW per ComfyUI weight) for one family and layout."""
    host = hosts[fam]
    name = f"fam_{fam}_{layout}_{seed}.safetensors"
    if layout == "peft-transformer" and fam != "wan":
        factors = make_factors(diffusers_shapes(host), rank=RANK, seed=seed, std=std)
        sd, naming = write_dit_layout(factors, layout), "diffusers"
    else:
        factors = make_factors(native_shapes(host), rank=RANK, seed=seed, std=std,
                               alpha=None if layout == "peft-transformer" else ALPHA)
        naming = "native"
        sd = wan_diffusers_file(factors) if layout == "peft-transformer" else write_dit_layout(factors, layout)
    save_file(sd, str(comfy.base / "loras" / name))
    return name, factors, expected_deltas(host, factors, naming)


@pytest.mark.parametrize("fam,layout,stock_loads", CASES, ids=[f"{f}-{lay}" for f, lay, _ in CASES])
def test_node_patches_every_target_as_comfyui_computes_it(comfy, hosts, fam, layout, stock_loads):
    name, factors, want = build_file(comfy, hosts, fam, layout)
    tag = f"ours_{fam}_{layout}"
    entry = run_ok(comfy, probe_graph(fam, ours(name), tag))
    rep = report(entry)
    n = len(factors)
    stacked = layout == "peft-transformer" and fam in ("sd3", "sd35", "flux")
    # (a) every target matched and applied, nothing unmatched; a stacked weight patched once per piece
    assert rep["targets"] == rep["matched"] == rep["applied"] == n, rep
    family = {"sd35": "sd3", "qwen": "qwen-image"}.get(fam, fam)
    assert rep["unmatched"] == [] and rep["host_arch"].startswith(f"{family} (")     # tiny: no released size
    assert {w["host"] for w in rep["weights"]} == set(want)
    fmt = {"peft-transformer": "diffusers-PEFT", "kohya-native": "kohya", "comfy-native": "diffusers-PEFT"}
    assert fmt[layout] in rep["formats"], rep["formats"]
    info, dump = probed(comfy, entry, tag)
    assert set(info["patches"]) == set(want)
    if stacked:
        pieces = {}
        for f in factors:
            k = hosts[fam]["key_map"][f"transformer.{f.name}"][0]
            pieces[k] = pieces.get(k, 0) + 1
        assert info["patches"] == pieces and max(pieces.values()) > 1
    else:
        assert set(info["patches"].values()) == {1}
    # (b) the weights ComfyUI computes are W + strength·ΔW, ΔW in float64 from the file's tensors
    for key, d in want.items():
        base = dump[f"base/{key}"].double().numpy()
        np.testing.assert_allclose(dump[f"patched/{key}"].double().numpy(), base + STRENGTH * d,
                                   rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(d).max())), err_msg=key)
    # ... and the same bits as ComfyUI's stock loader, where it loads the format
    entry = run_ok(comfy, probe_graph(fam, stock(name), f"stock_{fam}_{layout}"))
    s_info, s_dump = probed(comfy, entry, f"stock_{fam}_{layout}")
    if stock_loads:
        assert s_info["patches"] == info["patches"]
        for k in dump:
            assert torch.equal(dump[k], s_dump[k]), k
    else:
        assert s_info["patches"] == {}                      # stock ComfyUI: "lora key not loaded" for all
        assert "lora key not loaded: transformer.blocks.0.attn1.to_q" in comfy.log.read_text()


def test_refusals_are_clear_errors(comfy, hosts):
    flux_file, _, _ = build_file(comfy, hosts, "flux", "kohya-native", seed=11)
    text = error_text(comfy.run(probe_graph("sd3", ours(flux_file), "x")))
    assert "has Flux.1 module names" in text and "the model is SD3" in text and "even with allow_partial" in text
    save_file(duo_state("sd1", rank=2), str(comfy.base / "loras" / "fam_sd15_duo.safetensors"))
    for allow in (False, True):
        g = probe_graph("flux", ours("fam_sd15_duo.safetensors", allow_partial=allow), "x")
        text = error_text(comfy.run(g))
        assert "Stable Diffusion UNet (SD1/SD2/SDXL) module names" in text and "the model is Flux.1" in text, text
    # a Flux.1 [dev]-sized file (EraseAnything's layout: add_q/add_k [3072, 3072] x 19 blocks) on a small Flux
    g = torch.Generator().manual_seed(0)
    ea = {}
    for i in range(19):
        for p in ("add_k_proj", "add_q_proj"):
            stem = f"transformer.transformer_blocks.{i}.attn.{p}"
            ea[stem + ".lora_A.weight"] = torch.randn(8, 3072, generator=g) * 0.01
            ea[stem + ".lora_B.weight"] = torch.randn(3072, 8, generator=g) * 0.01
    save_file(ea, str(comfy.base / "loras" / "fam_flux_full_size.safetensors"))
    text = error_text(comfy.run(probe_graph("flux", ours("fam_flux_full_size.safetensors", allow_partial=True),
                                            "x")))
    assert "patches NOTHING" in text and "shape" in text, text
    # a partial file: refused without allow_partial (naming the key), loaded and reported with it
    name, factors, want = build_file(comfy, hosts, "flux", "peft-transformer", seed=12)
    sd = load_file(str(comfy.base / "loras" / name))
    extra = "transformer.transformer_blocks.7.attn.to_q"           # the tiny Flux has one double block
    sd[extra + ".lora_A.weight"], sd[extra + ".lora_B.weight"] = factors[0].down.clone(), factors[0].up.clone()
    save_file(sd, str(comfy.base / "loras" / "fam_flux_partial.safetensors"))
    text = error_text(comfy.run(probe_graph("flux", ours("fam_flux_partial.safetensors"), "x")))
    assert f"only {len(factors)} of its {len(factors) + 1}" in text and extra in text and "allow_partial" in text
    entry = run_ok(comfy, probe_graph("flux", ours("fam_flux_partial.safetensors", allow_partial=True),
                                      "partial"))
    rep = report(entry)
    assert rep["matched"] == rep["applied"] == len(factors) and rep["targets"] == len(factors) + 1
    assert len(rep["unmatched"]) == 1 and rep["unmatched"][0]["key"].startswith(extra), rep["unmatched"]
    assert "PARTIAL" in "\n".join(entry["outputs"]["lora"]["text"])
    info, _ = probed(comfy, entry, "partial")
    assert set(info["patches"]) == set(want)
    # strength 0 (and negative) for a file with denoiser targets: refused, never a silent no-op
    name_w, _, _ = build_file(comfy, hosts, "wan", "kohya-native", seed=13)
    text = error_text(comfy.run(probe_graph("wan", ours(name_w, 0.0), "x")))
    assert "strength_model = 0 switches off its" in text
    text = error_text(comfy.run(probe_graph("wan", ours(name_w, -0.5), "x")))
    assert "strength_model = -0.5 is negative" in text


def _sampled(fam: str, loader: dict | None) -> dict:
    """The family's customary sampling graph (test_comfy_families) with ``loader`` between model and sampler."""
    nodes = {"m": MODELS[fam][0]}
    if loader is not None:
        nodes = {"m0": MODELS[fam][0], "m": {**loader, "inputs": {**loader["inputs"], "model": ["m0", 0]}}}
    if fam == "flux":
        return graph(nodes, "flux", FLUX_SAMPLING, SD3_LATENT, "tiny_taesd16.safetensors", guidance=3.5)
    return graph(nodes, "wan", {"class_type": "ModelSamplingSD3", "inputs": {"shift": 8.0}}, WAN_LATENT,
                 "tiny_wan21_vae.safetensors", cfg=5.0)


@pytest.mark.parametrize("fam", ["flux", "wan"])
def test_sampled_pixels(comfy, hosts, fam):
    """The node's model samples like the stock loader's (same file, same strength) and unlike the plain
    model; the stock loader at strength 0 gives the plain model's pixels (the node refuses 0)."""
    name, _, _ = build_file(comfy, hosts, fam, "kohya-native", seed=21, std=0.05)
    plain = pixels(comfy, run_ok(comfy, _sampled(fam, None)), "save")
    zero = pixels(comfy, run_ok(comfy, _sampled(fam, stock(name, 0.0))), "save")
    assert np.array_equal(zero, plain)
    mine = pixels(comfy, run_ok(comfy, _sampled(fam, ours(name, 0.8))), "save")
    theirs = pixels(comfy, run_ok(comfy, _sampled(fam, stock(name, 0.8))), "save")
    assert np.array_equal(mine, theirs)
    assert np.abs(mine - plain).max() > 3
