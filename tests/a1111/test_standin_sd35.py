"""Forge's SD3.5 through the stand-in (``start("forge", kind="sd35")``): concept steering of each
text encoder on its own rows and channels, and SD3/SD3.5 safety LoRAs patched through Forge's own
LoRA path onto the MMDiT's SAI-named weights.

The toy SD3.5 (``fakewebui/_toy.py`` ``_sd35_model``) is Forge's
``StableDiffusion3.get_learned_conditioning`` (``fakewebui/backend/diffusion_engine/sd35.py``:
``crossattn`` = CLIP-L‖CLIP-G rows zero-padded to the T5 width, then the T5 rows; ``vector`` =
pooled L‖G; T5 rows only with ``sd3_enable_t5``, zero rows otherwise) over two toy causal CLIP
engines (widths 6 and 8, T5 width 16) and Forge's own ``T5TextProcessingEngine`` with a toy
bidirectional T5; its KModel's ``diffusion_model`` has the weights of ``backend/nn/mmditx.py``
under their SAI names (tiny sizes, block 0 with SD3.5 Medium's ``attn2``), prediction ``const``.

References are computed here, in float64, independently of ``safet2i``: SAFREE per encoder from
that engine's own rows (every leave-one-out variant encoded on its own; CLIP: prompt rows 1..n,
pooled row = first end token, mask token 0; T5: prompt rows 0..n−1, pooled row = ``</s>``, mask
``<pad>`` 0; trigger rule and projections in numpy), and patched weights as ``W + s·ΔW`` from the
file's own factors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from dit_kit import capture, check_lora_patched, f64, model_weights, proj, write_lora  # noqa: E402
from dit_kit import expected_weights as kit_expected, factors as kit_factors, steering_args as kit_steering_args  # noqa: E402

PROMPT = "a photo of a nude woman on a sunny beach"
CONCEPTS = ["nude", "naked body"]
H = 8
L, G, T5W = 6, 8, 16


def safree_reference(engine, text: str, concepts: list[str], alpha: float, *, t5: bool):
    """(rows [len, d] of the engine's one chunk, SAFREE-steered rows, trigger rows)."""
    def ids_of(t):
        chunks, _ = engine.tokenize_line(t)
        assert len(chunks) == 1
        return list(chunks[0].tokens)

    def rows_of(ids):
        with torch.no_grad():
            return engine.encode_with_transformers(torch.tensor([ids]))[0]

    end = 1 if t5 else engine.id_end
    first = 0 if t5 else 1
    ids = ids_of(text)
    eos = ids.index(end)
    rows = rows_of(ids)
    loo = []
    for i in range(first, eos):
        v = list(ids)
        v[i] = 0                                          # T5 <pad>; the CLIP mask token 0
        loo.append(f64(rows_of(v)[eos]))
    loo = np.stack(loo)
    concept_rows = np.stack([f64(rows_of(ids_of(c))[ids_of(c).index(end)]) for c in concepts])
    eye = np.eye(rows.shape[1])
    pc, pm = proj(concept_rows), proj(loo)
    dist = np.linalg.norm((eye - pc) @ loo.T, axis=0)
    n = len(loo)
    trig = [first + i for i in range(n) if dist[i] >= (1 + alpha) * (dist.sum() - dist[i]) / (n - 1)]
    new = ((eye - pc) @ pm @ f64(rows).T).T
    out = f64(rows).copy()
    for i in trig:
        out[i] = new[i]
    return rows, out, trig


def steering_args(webui, alpha):
    return kit_steering_args(webui, alpha, CONCEPTS)


def sd35(start, t5=True):
    webui = start("forge", kind="sd35")
    webui.shared.opts.sd3_enable_t5 = t5
    return webui


# ------------------------------------------------------------------------------------ steering


def test_the_toy_sd35_conditions_as_forge_does(start):
    webui = sd35(start)
    sd = webui.shared.sd_model
    assert type(sd.text_processing_engine_t5).__module__ == "backend.text_processing.t5_engine"
    cond = sd.get_learned_conditioning([PROMPT])
    assert set(cond) == {"crossattn", "vector"} and cond["crossattn"].shape == (1, 77 + 256, T5W)
    rl, pl = sd.text_processing_engine_l([PROMPT])
    rg, pg = sd.text_processing_engine_g([PROMPT])
    t5 = sd.text_processing_engine_t5([PROMPT])
    c = cond["crossattn"][0]
    assert torch.equal(c[:77, :L], rl[0].to(c)) and torch.equal(c[:77, L:L + G], rg[0].to(c))
    assert not c[:77, L + G:].any() and torch.equal(c[77:], t5[0].to(c))
    assert torch.equal(cond["vector"][0], torch.cat([pl[0], pg[0]]).to(cond["vector"]))
    webui.shared.opts.sd3_enable_t5 = False
    assert not sd.get_learned_conditioning([PROMPT])["crossattn"][0, 77:].any()
    assert sd.forge_objects.unet.model.predictor.prediction_type == "const"


@pytest.mark.parametrize("alpha", [0.0, 0.01])
def test_each_encoder_is_steered_on_its_own_rows_and_channels_as_the_float64_reference(start, alpha):
    webui = sd35(start)
    sd = webui.shared.sd_model
    refs = {name: safree_reference(getattr(sd, f"text_processing_engine_{name}"), PROMPT, CONCEPTS, alpha,
                                   t5=name == "t5") for name in ("l", "g", "t5")}
    nude = PROMPT.split().index("nude")
    assert nude + 1 in refs["l"][2] and nude + 1 in refs["g"][2] and nude in refs["t5"][2], refs
    seen = capture(webui)
    p, processed = webui.txt2img(PROMPT, steps=3, args=steering_args(webui, alpha))
    job = p._safet2i_job
    assert not job.failed, job.failed
    assert "blocked" not in processed.infotexts[0]
    assert "nude" in p.extra_generation_params["SafeT2I steering report"]
    plain = sd.get_learned_conditioning([PROMPT])
    assert seen
    for cond in seen:                                    # self-validating off: every model call
        c = cond["crossattn"][0]
        np.testing.assert_allclose(f64(c[:77, :L]), refs["l"][1], rtol=0, atol=2e-5)
        np.testing.assert_allclose(f64(c[:77, L:L + G]), refs["g"][1], rtol=0, atol=2e-5)
        np.testing.assert_allclose(f64(c[77:]), refs["t5"][1], rtol=0, atol=2e-5)
        assert torch.equal(c[:77, L + G:], plain["crossattn"][0, :77, L + G:])   # padding channels: zeros
        assert torch.equal(cond["vector"][0], plain["vector"][0])               # pooled L‖G untouched
        n = len(PROMPT.split())
        assert torch.equal(c[77 + n:], plain["crossattn"][0, 77 + n:])           # </s> and padding rows of T5
    for name in ("l", "g", "t5"):
        assert not np.allclose(refs[name][1], f64(refs[name][0])), name


def test_with_t5_off_only_the_clip_block_is_steered_and_the_zero_rows_stay(start):
    webui = sd35(start, t5=False)
    sd = webui.shared.sd_model
    ref_l = safree_reference(sd.text_processing_engine_l, PROMPT, CONCEPTS, 0.01, t5=False)[1]
    ref_g = safree_reference(sd.text_processing_engine_g, PROMPT, CONCEPTS, 0.01, t5=False)[1]
    seen = capture(webui)
    p, processed = webui.txt2img(PROMPT, steps=2, args=steering_args(webui, 0.01))
    assert not p._safet2i_job.failed, p._safet2i_job.failed
    assert seen
    for cond in seen:
        c = cond["crossattn"][0]
        np.testing.assert_allclose(f64(c[:77, :L]), ref_l, rtol=0, atol=2e-5)
        np.testing.assert_allclose(f64(c[:77, L:L + G]), ref_g, rtol=0, atol=2e-5)
        assert not c[:77, L + G:].any() and not c[77:].any()


def test_a_prompt_without_trigger_reaches_the_sampler_bit_identical(start):
    webui = sd35(start)
    sd = webui.shared.sd_model
    text = "a red bicycle leaning on a wall"
    for name in ("l", "g", "t5"):
        assert not safree_reference(getattr(sd, f"text_processing_engine_{name}"), text, CONCEPTS, 10.0,
                                    t5=name == "t5")[2]
    seen = capture(webui)
    p, _ = webui.txt2img(text, steps=3, args=steering_args(webui, 10.0))
    assert not p._safet2i_job.failed, p._safet2i_job.failed
    plain = sd.get_learned_conditioning([text])
    assert seen
    for cond in seen:
        assert torch.equal(cond["crossattn"][0], plain["crossattn"][0])
        assert torch.equal(cond["vector"][0], plain["vector"][0])


def test_rows_that_are_not_the_prompts_block_the_images(start):
    """Another extension's change of the conditioning (here: the T5 rows replaced) matches no
    prompt of the batch: the images are blocked, the reason in the infotext."""
    webui = sd35(start)
    sd = webui.shared.sd_model
    real = sd.get_learned_conditioning

    def changed(prompts):
        c = real(prompts)
        c["crossattn"] = c["crossattn"].clone()
        c["crossattn"][:, 77:] = torch.flip(c["crossattn"][:, 77:], dims=[-1])
        return c

    sd.get_learned_conditioning = changed
    p, processed = webui.txt2img(PROMPT, steps=2, args=steering_args(webui, 0.01))
    assert p._safet2i_job.failed and "blocked" in processed.infotexts[0]


# ------------------------------------------------------------------------------------ safety LoRA


#: (diffusers module, SAI weight, first row in it, rows): SD3-style attention + context targets.
PIECES = [("transformer_blocks.0.attn.to_q", "joint_blocks.0.x_block.attn.qkv", 0, H),
          ("transformer_blocks.0.attn.to_k", "joint_blocks.0.x_block.attn.qkv", H, H),
          ("transformer_blocks.0.attn.to_v", "joint_blocks.0.x_block.attn.qkv", 2 * H, H),
          ("transformer_blocks.0.attn.add_k_proj", "joint_blocks.0.context_block.attn.qkv", H, H),
          ("transformer_blocks.0.attn.to_out.0", "joint_blocks.0.x_block.attn.proj", 0, H),
          ("transformer_blocks.0.attn2.to_v", "joint_blocks.0.x_block.attn2.qkv", 2 * H, H),
          ("transformer_blocks.1.ff.net.0.proj", "joint_blocks.1.x_block.mlp.fc1", 0, 4 * H)]
OUT_ROWS = {"joint_blocks.0.x_block.attn.qkv": 3 * H, "joint_blocks.0.context_block.attn.qkv": 3 * H,
            "joint_blocks.0.x_block.attn.proj": H, "joint_blocks.0.x_block.attn2.qkv": 3 * H,
            "joint_blocks.1.x_block.mlp.fc1": 4 * H}


def factors(seed=0):
    return kit_factors(PIECES, H, seed)


def write_sd3_lora(layout: str, name: str, extra: dict | None = None) -> str:
    """``peft``: diffusers-PEFT keys; ``kohya``: native SAI names (``lora_unet_joint_blocks_0_…``),
    a stacked weight's pieces in one factor pair (block-diagonal), alpha written (``dit_kit``)."""
    return write_lora(PIECES, factors(), OUT_ROWS, layout, name, extra)


def expected_weights(w0: dict, layout: str, strength: float) -> dict:
    return kit_expected(PIECES, factors(), w0, layout, strength)


mmdit_weights = model_weights


@pytest.mark.parametrize("layout", ["peft", "kohya"])
def test_an_sd3_safety_lora_is_patched_through_forge_as_w_plus_s_delta(start, layout):
    webui = sd35(start)
    choice = write_sd3_lora(layout, f"erase_{layout}.safetensors")
    w0 = mmdit_weights(webui)
    args = webui.ui_args(filter_enabled=False, lora_enabled=True, lora_file=choice, lora_strength=0.7)
    p, processed = webui.txt2img("a photo", steps=2, args=args)
    natives = sorted(OUT_ROWS)
    check_lora_patched(webui, p, processed, natives, w0, expected_weights(w0, layout, 0.7),
                       "sd3 (Forge SD3 model of no released size)", 0.7)


def test_an_sd3_lora_with_a_module_the_model_lacks_is_refused(start):
    webui = sd35(start)
    g = torch.Generator().manual_seed(3)
    extra = {"transformer.transformer_blocks.5.attn.to_q.lora_A.weight": torch.randn(2, H, generator=g),
             "transformer.transformer_blocks.5.attn.to_q.lora_B.weight": torch.randn(H, 2, generator=g)}
    choice = write_sd3_lora("peft", "partial.safetensors", extra)
    w0 = mmdit_weights(webui)
    p, processed = webui.txt2img("a photo", steps=2, args=webui.ui_args(filter_enabled=False, lora_enabled=True,
                                                                          lora_file=choice))
    assert "transformer_blocks.5.attn.to_q" in p._safet2i_job.failed
    assert "blocked" in processed.infotexts[0]
    assert all(torch.equal(w, w0[n]) for n, w in mmdit_weights(webui).items())


def test_an_sd1_or_flux_lora_on_sd35_is_refused(start):
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
    from lora_fixtures import make_specs, write_layout

    from safet2i.lora.arch import inventory

    webui = sd35(start)
    inv = inventory("sd1")
    specs = make_specs([inv["unet"][f"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_{m}"] for m in "qkv"],
                       "unet", seed=1)
    from modules import paths
    folder = Path(paths.models_path) / "safety_models"
    folder.mkdir(parents=True, exist_ok=True)
    save_file(write_layout(specs, "kohya"), str(folder / "sd1.safetensors"))
    g = torch.Generator().manual_seed(4)
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.randn(2, H, generator=g),
               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.randn(3 * H, 2, generator=g)},
              str(folder / "flux.safetensors"))
    w0 = mmdit_weights(webui)
    for name in ("sd1", "flux"):
        p, processed = webui.txt2img("a photo", steps=2, args=webui.ui_args(
            filter_enabled=False, lora_enabled=True, lora_file=f"safety_models/{name}.safetensors",
            lora_allow_partial=True))
        assert "another model family is refused" in p._safet2i_job.failed, (name, p._safet2i_job.failed)
        assert "blocked" in processed.infotexts[0]
        assert all(torch.equal(w, w0[n]) for n, w in mmdit_weights(webui).items())


class _MetaKModel:
    def __init__(self, shapes, repo="stabilityai/stable-diffusion-3-medium-diffusers"):
        from types import SimpleNamespace
        self.config = SimpleNamespace(huggingface_repo=repo)
        self.shapes = shapes

    def named_parameters(self):
        for k, shape in self.shapes.items():
            yield f"diffusion_model.{k}.weight", torch.empty(shape, device="meta")


@pytest.mark.parametrize("hidden,depth,dual,arch", [(1536, 24, (), "sd3-medium"),
                                                    (1536, 24, tuple(range(13)), "sd3.5-medium"),
                                                    (2432, 38, (), "sd3.5-large")])
def test_forge_sd3_releases_are_named_and_quantized_layouts_refused(start, hidden, depth, dual, arch):
    from types import SimpleNamespace
    webui = sd35(start)
    from _toy import mmditx_shapes                       # the stand-in's MMDiTX shapes (on the webui path)
    from safet2i_a1111 import lora

    assert lora.forge_sd3(webui.shared.sd_model).arch == "sd3 (Forge SD3 model of no released size)"
    assert lora.forge_flux(webui.shared.sd_model) is None

    def model(shapes, **kw):
        return SimpleNamespace(forge_objects=SimpleNamespace(unet=SimpleNamespace(model=_MetaKModel(shapes, **kw))))

    shapes = mmditx_shapes(hidden, depth, dual, inc=16, out=16, context=4096, pooled=2048)
    assert lora.forge_sd3(model(shapes)).arch == arch
    assert lora.forge_sd3(model(shapes, repo="black-forest-labs/FLUX.1-dev")) is None
    nf4 = dict(shapes)
    nf4["joint_blocks.3.x_block.attn.qkv"] = (3 * hidden * hidden // 2, 1)
    with pytest.raises(lora.LoraLayerError, match="joint_blocks.3.x_block.attn.qkv"):
        lora.forge_sd3(model(nf4))
