"""The safety-LoRA layer through the stand-in's built-in Lora extension (all four variants):
``fakewebui/extensions-builtin/Lora`` (a reading of A1111's ``Lora``, Forge's
``sd_forge_lora`` and reForge's ``Lora``) parses the ``<lora:…>`` tag the script adds, matches the
converted file's kohya keys against the toy model's layers (``_toy.LORA_UNET_LAYERS`` /
``LORA_TE_LAYERS``, SD1 names) and records what it loaded where upstream does (A1111
``networks.loaded_networks[…].modules``, Forge ``lora_patches``, reForge ``patches`` +
``current_lora_hash``); ``after_extra_networks_activate`` then proves it. The LoRA is a
synthetic DUO-layout (diffusers ``….lora.down.weight``) file."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from safetensors.torch import save_file

from conftest import VARIANTS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from lora_fixtures import make_specs, write_layout  # noqa: E402

from safet2i.lora.arch import inventory  # noqa: E402

TOY_UNET = [f"down_blocks.0.attentions.0.transformer_blocks.0.{a}.{m}" for a in ("attn1", "attn2")
            for m in ("to_q", "to_k", "to_v", "to_out.0")]
TOY_TE = [f"text_model.encoder.layers.0.self_attn.{m}" for m in ("q_proj", "k_proj", "v_proj", "out_proj")]
#: In SD1 (so SafeT2I's coverage check accepts it) but not among the toy's layers.
NOT_IN_TOY = "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q"


def write_duo(extra=(), name="duo_toy.safetensors") -> str:
    from modules import paths

    inv = inventory("sd1")
    specs = make_specs([inv["unet"][n] for n in TOY_UNET + list(extra)], "unet", seed=1) + \
        make_specs([inv["te1"][n] for n in TOY_TE], "te1", seed=2)
    folder = Path(paths.models_path) / "safety_models"
    folder.mkdir(parents=True, exist_ok=True)
    save_file(write_layout(specs, "diffusers"), str(folder / name))
    return f"safety_models/{name}"


def lora_args(webui, choice, strength=0.8, **kw):
    return webui.ui_args(filter_enabled=False, lora_enabled=True, lora_file=choice, lora_strength=strength, **kw)


def mechanism_counts(webui, lora) -> tuple[int, int]:
    """(UNet, text encoder) weights the webui's own mechanism loaded for our file."""
    import networks
    sd = webui.shared.sd_model
    if webui.variant.startswith("a1111"):
        net = next(n for n in networks.loaded_networks if n.name == lora.name)
        assert net.te_multiplier == net.unet_multiplier == lora.strength
        return (sum(k.startswith("diffusion_model_") for k in net.modules),
                sum(k.startswith("transformer_") for k in net.modules))
    fo = sd.forge_objects_after_applying_lora
    if webui.variant == "forge":
        ident = (str(lora.filename), lora.strength, 1.0, False)
        return len(fo.unet.lora_patches[ident]), len(fo.clip.patcher.lora_patches[ident])
    assert str(lora.filename) in sd.current_lora_hash
    return len(fo.unet.patches), len(fo.clip.patcher.patches)


@pytest.mark.parametrize("variant", VARIANTS)
def test_converted_lora_reaches_the_webuis_mechanism_and_is_verified(start, variant):
    webui = start(variant)
    import networks
    p, processed = webui.txt2img("a photo", steps=2, args=lora_args(webui, write_duo()))
    job = p._safet2i_job
    assert job.failed is None, job.failed
    lora = job.lora
    assert lora.converted and lora.filename.parent.name == "safet2i-converted" and lora.filename.is_file()
    assert networks.available_networks[lora.name].filename == str(lora.filename)
    # the tag reached the webui's parser, and the mechanism matched every target weight
    assert [e.items[0] for e in p.extra_network_data["lora"]] == [lora.name]
    assert mechanism_counts(webui, lora) == (len(TOY_UNET), len(TOY_TE))
    info = processed.infotexts[0]
    assert "blocked" not in info
    assert "SafeT2I LoRA: safety_models/duo_toy.safetensors" in info
    assert f"loaded {len(TOY_UNET) + len(TOY_TE)}/{len(TOY_UNET) + len(TOY_TE)}" in info
    assert f"Lora hashes: \"{lora.name}: " in info       # the webui's own infotext names it too


@pytest.mark.parametrize("variant", VARIANTS)
def test_keys_the_webui_does_not_match_block_the_images(start, variant):
    webui = start(variant)
    p, processed = webui.txt2img("a photo", steps=2, args=lora_args(webui, write_duo(extra=[NOT_IN_TOY])))
    job = p._safet2i_job
    n = len(TOY_UNET) + len(TOY_TE)
    assert job.lora.targets == n + 1        # SafeT2I's coverage check accepts it: SD1 has that layer
    assert mechanism_counts(webui, job.lora) == (len(TOY_UNET), len(TOY_TE))   # the webui skipped one
    assert job.failed and f"matched only {n} of the {n + 1} target weights" in job.failed
    assert "blocked" in processed.infotexts[0]


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_mechanism_that_raises_blocks_the_images(start, variant, monkeypatch):
    webui = start(variant)
    import networks

    def broken(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(networks, "load_networks", broken)    # the webui displays the error and goes on
    p, processed = webui.txt2img("a photo", steps=2, args=lora_args(webui, write_duo()))
    assert p._safet2i_job.failed and "safety LoRA" in p._safet2i_job.failed
    assert "blocked" in processed.infotexts[0]


def _spy(monkeypatch):
    lora_layer = sys.modules["safet2i_a1111.lora"]
    passes = []
    real = lora_layer.verify_loaded

    def spy(p, lora, *a, **k):
        passes.append(bool(getattr(p, "is_hr_pass", False)))
        return real(p, lora, *a, **k)

    monkeypatch.setattr(lora_layer, "verify_loaded", spy)
    return passes


@pytest.mark.parametrize("variant", VARIANTS)
def test_hires_pass_gets_the_lora_and_is_verified(start, variant, monkeypatch):
    webui = start(variant)
    passes = _spy(monkeypatch)
    p, processed = webui.txt2img("a photo", steps=2, enable_hr=True, hr_scale=2.0,
                                 args=lora_args(webui, write_duo()))
    job = p._safet2i_job
    assert job.failed is None, job.failed
    assert passes == [False, True]
    assert [e.items[0] for e in p.hr_extra_network_data["lora"]] == [job.lora.name]
    assert mechanism_counts(webui, job.lora) == (len(TOY_UNET), len(TOY_TE))
    assert "blocked" not in processed.infotexts[0]


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_hires_pass_that_never_activates_extra_networks_blocks_the_images(start, variant, monkeypatch):
    webui = start(variant)
    passes = _spy(monkeypatch)
    from modules import extra_networks
    real = extra_networks.activate

    def first_pass_only(p, data):
        if not getattr(p, "is_hr_pass", False):
            real(p, data)

    monkeypatch.setattr(webui.processing.extra_networks, "activate", first_pass_only)
    p, processed = webui.txt2img("a photo", steps=2, enable_hr=True, hr_scale=2.0,
                                 args=lora_args(webui, write_duo()))
    assert passes == [False]
    assert p._safet2i_job.failed and "hires pass did not activate extra networks" in p._safet2i_job.failed
    assert "blocked" in processed.infotexts[0]
