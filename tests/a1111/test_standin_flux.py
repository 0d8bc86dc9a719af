"""Forge's Flux through the stand-in (``start("forge", kind="flux")``): concept steering on the T5
rows and a Flux safety LoRA patched through Forge's own LoRA path.

The toy Flux (``fakewebui/_toy.py`` ``_flux_model``) is Forge's ``Flux.get_learned_conditioning``
(``fakewebui/backend/diffusion_engine/flux.py``: ``crossattn`` = T5 rows, ``vector`` = CLIP-L
pooled, ``guidance``) over Forge's own ``T5TextProcessingEngine``
(``fakewebui/backend/text_processing``: no start token, ``</s>`` 1, ``<pad>`` 0 to 256 tokens) with
a toy bidirectional T5, and a KModel whose ``diffusion_model`` has the BFL-named Linear weights of
``backend/nn/flux.py`` (tiny sizes) and the ``const`` prediction type.

References are computed here, in float64, independently of ``safet2i``: SAFREE from the toy T5's
rows (every leave-one-out variant encoded on its own, pooled row = the first ``</s>``, trigger
rule and projections in numpy, as ``tests/unit/test_steering_families.py``), and the patched
weights as ``W + s·ΔW`` from the file's own factors."""

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
H, MLP = 8, 32


# ------------------------------------------------------------------------------------ references


def t5_reference(engine, text: str, concepts: list[str], alpha: float):
    """(rows [256, d] as the engine encodes them, SAFREE-steered rows, trigger rows)."""
    def ids_of(t):
        chunks, _ = engine.tokenize_line(t)
        assert len(chunks) == 1
        return list(chunks[0].tokens)

    def rows_of(ids):
        with torch.no_grad():
            return engine.encode_with_transformers(torch.tensor([ids]))[0]

    ids = ids_of(text)
    eos = ids.index(1)                                   # T5: prompt rows 0..n-1, pooled row = </s>
    rows = rows_of(ids)
    loo = []
    for i in range(eos):
        v = list(ids)
        v[i] = 0                                          # <pad>
        loo.append(f64(rows_of(v)[eos]))
    loo = np.stack(loo)
    concept_rows = np.stack([f64(rows_of(ids_of(c))[ids_of(c).index(1)]) for c in concepts])
    eye = np.eye(rows.shape[1])
    pc, pm = proj(concept_rows), proj(loo)
    dist = np.linalg.norm((eye - pc) @ loo.T, axis=0)
    n = eos
    trig = [i for i in range(n) if dist[i] >= (1 + alpha) * (dist.sum() - dist[i]) / (n - 1)]
    new = ((eye - pc) @ pm @ f64(rows).T).T
    out = f64(rows).copy()
    for i in trig:
        out[i] = new[i]
    return rows, out, trig


def steering_args(webui, alpha):
    return kit_steering_args(webui, alpha, CONCEPTS)


# ------------------------------------------------------------------------------------ steering


def test_the_toy_flux_conditions_as_forge_does(start):
    webui = start("forge", kind="flux")
    sd = webui.shared.sd_model
    t5 = sd.text_processing_engine_t5
    assert type(t5).__module__ == "backend.text_processing.t5_engine"
    chunks, count = t5.tokenize_line(PROMPT)
    n = len(PROMPT.split())
    assert len(chunks) == 1 and len(chunks[0].tokens) == 256 and count == n + 1
    assert chunks[0].tokens[n] == 1 and set(chunks[0].tokens[n + 1:]) == {0} and 1 not in chunks[0].tokens[:n]
    cond = sd.get_learned_conditioning([PROMPT])
    assert set(cond) == {"crossattn", "vector", "guidance"} and cond["crossattn"].shape == (1, 256, 16)
    assert sd.forge_objects.unet.model.predictor.prediction_type == "const"


@pytest.mark.parametrize("alpha", [0.0, 0.01])
def test_t5_rows_are_steered_as_the_float64_reference_and_clip_pooled_is_kept(start, alpha):
    webui = start("forge", kind="flux")
    sd = webui.shared.sd_model
    rows, want, trig = t5_reference(sd.text_processing_engine_t5, PROMPT, CONCEPTS, alpha)
    nude = PROMPT.split().index("nude")
    assert trig and nude in trig, trig
    seen = capture(webui)
    p, processed = webui.txt2img(PROMPT, steps=3, args=steering_args(webui, alpha))
    job = p._safet2i_job
    assert not job.failed, job.failed
    assert "blocked" not in processed.infotexts[0]
    assert "nude" in p.extra_generation_params["SafeT2I steering report"]
    _, pooled = sd.text_processing_engine_l([PROMPT])
    assert seen
    for cond in seen:                                    # self-validating off: every model call
        np.testing.assert_allclose(f64(cond["crossattn"][0]), want, rtol=0, atol=2e-5)
        assert torch.equal(cond["crossattn"][0, len(PROMPT.split()):], rows[len(PROMPT.split()):])  # </s>, padding
        assert torch.equal(cond["vector"][0], pooled[0])                       # CLIP-L pooled untouched
        assert torch.equal(cond["guidance"], torch.FloatTensor([3.5]))
    assert not np.allclose(want, f64(rows))


def test_a_prompt_without_trigger_reaches_the_sampler_bit_identical(start):
    webui = start("forge", kind="flux")
    sd = webui.shared.sd_model
    text = "a red bicycle leaning on a wall"
    _, _, trig = t5_reference(sd.text_processing_engine_t5, text, CONCEPTS, 10.0)
    assert not trig
    seen = capture(webui)
    p, _ = webui.txt2img(text, steps=3, args=steering_args(webui, 10.0))
    assert not p._safet2i_job.failed, p._safet2i_job.failed
    plain = sd.get_learned_conditioning([text])
    assert seen
    for cond in seen:
        assert torch.equal(cond["crossattn"][0], plain["crossattn"][0])
        assert torch.equal(cond["vector"][0], plain["vector"][0])


def test_two_t5_chunks_block_the_images(start):
    """``BREAK`` makes Forge's T5 engine return one tensor per chunk (stacked along the batch):
    rows the steering cannot bind to a prompt; the images are blocked."""
    webui = start("forge", kind="flux")
    p, processed = webui.txt2img("a nude woman BREAK on a beach", steps=2, args=steering_args(webui, 0.01))
    assert p._safet2i_job.failed and "blocked" in processed.infotexts[0]


# ------------------------------------------------------------------------------------ safety LoRA


#: (diffusers module, BFL weight, first row in it, rows): EraseAnything-style targets.
PIECES = [("transformer_blocks.0.attn.to_q", "double_blocks.0.img_attn.qkv", 0, H),
          ("transformer_blocks.0.attn.to_k", "double_blocks.0.img_attn.qkv", H, H),
          ("transformer_blocks.0.attn.to_v", "double_blocks.0.img_attn.qkv", 2 * H, H),
          ("transformer_blocks.0.attn.add_k_proj", "double_blocks.0.txt_attn.qkv", H, H),
          ("transformer_blocks.0.attn.to_out.0", "double_blocks.0.img_attn.proj", 0, H),
          ("single_transformer_blocks.0.attn.to_q", "single_blocks.0.linear1", 0, H),
          ("single_transformer_blocks.0.proj_mlp", "single_blocks.0.linear1", 3 * H, MLP)]


OUT_ROWS = {"double_blocks.0.img_attn.qkv": 3 * H, "double_blocks.0.txt_attn.qkv": 3 * H,
            "double_blocks.0.img_attn.proj": H, "single_blocks.0.linear1": 3 * H + MLP}


def factors(seed=0):
    return kit_factors(PIECES, H, seed)


def write_flux_lora(layout: str, name: str, extra: dict | None = None) -> str:
    """``peft``: EraseAnything's diffusers-PEFT keys; ``kohya``: sd-scripts' native Flux keys, the
    stacked weight's pieces in one factor pair (block-diagonal), alpha written (``dit_kit``)."""
    return write_lora(PIECES, factors(), OUT_ROWS, layout, name, extra)


def expected_weights(w0: dict, layout: str, strength: float) -> dict:
    return kit_expected(PIECES, factors(), w0, layout, strength)


flux_weights = model_weights


@pytest.mark.parametrize("layout", ["peft", "kohya"])
def test_a_flux_safety_lora_is_patched_through_forge_as_w_plus_s_delta(start, layout):
    webui = start("forge", kind="flux")
    choice = write_flux_lora(layout, f"erase_{layout}.safetensors")
    w0 = flux_weights(webui)
    args = webui.ui_args(filter_enabled=False, lora_enabled=True, lora_file=choice, lora_strength=0.7)
    p, processed = webui.txt2img("a photo", steps=2, args=args)
    natives = sorted({n for _, n, _, _ in PIECES})
    check_lora_patched(webui, p, processed, natives, w0, expected_weights(w0, layout, 0.7),
                       "flux (Forge Flux model of no released size)", 0.7)


def test_a_flux_lora_with_a_module_the_model_lacks_is_refused(start):
    webui = start("forge", kind="flux")
    g = torch.Generator().manual_seed(3)
    extra = {"transformer.transformer_blocks.7.attn.to_q.lora_A.weight": torch.randn(2, H, generator=g),
             "transformer.transformer_blocks.7.attn.to_q.lora_B.weight": torch.randn(H, 2, generator=g)}
    choice = write_flux_lora("peft", "partial.safetensors", extra)
    w0 = flux_weights(webui)
    args = webui.ui_args(filter_enabled=False, lora_enabled=True, lora_file=choice)
    p, processed = webui.txt2img("a photo", steps=2, args=args)
    assert "transformer_blocks.7.attn.to_q" in p._safet2i_job.failed
    assert "blocked" in processed.infotexts[0]
    assert all(torch.equal(w, w0[n]) for n, w in flux_weights(webui).items())


def test_an_sd_lora_on_flux_and_a_flux_lora_on_sd_are_refused(start):
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
    from lora_fixtures import make_specs, write_layout

    from safet2i.lora.arch import inventory

    webui = start("forge", kind="flux")
    inv = inventory("sd1")
    specs = make_specs([inv["unet"][f"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_{m}"] for m in "qkv"],
                       "unet", seed=1)
    from modules import paths
    folder = Path(paths.models_path) / "safety_models"
    folder.mkdir(parents=True, exist_ok=True)
    save_file(write_layout(specs, "kohya"), str(folder / "sd1.safetensors"))
    w0 = flux_weights(webui)
    p, processed = webui.txt2img("a photo", steps=2, args=webui.ui_args(
        filter_enabled=False, lora_enabled=True, lora_file="safety_models/sd1.safetensors", lora_allow_partial=True))
    assert "another model family is refused" in p._safet2i_job.failed
    assert "blocked" in processed.infotexts[0]
    assert all(torch.equal(w, w0[n]) for n, w in flux_weights(webui).items())

    sd1 = start("forge")
    choice = write_flux_lora("peft", "flux_on_sd1.safetensors")
    p, processed = sd1.txt2img("a photo", steps=2, args=sd1.ui_args(
        filter_enabled=False, lora_enabled=True, lora_file=choice, lora_allow_partial=True))
    assert "another model family is refused" in p._safet2i_job.failed
    assert "blocked" in processed.infotexts[0]


def bfl_shapes(h: int, mlp: int, depth: int, single: int, guidance: bool, ctx=4096, vec=768, inc=64):
    """The Linear weights of Forge's ``IntegratedFluxTransformer2DModel`` (backend/nn/flux.py) for
    these sizes, written from its module definitions."""
    out = {"img_in": (h, inc), "time_in.in_layer": (h, 256), "time_in.out_layer": (h, h),
           "vector_in.in_layer": (h, vec), "vector_in.out_layer": (h, h), "txt_in": (h, ctx),
           "final_layer.linear": (inc, h), "final_layer.adaLN_modulation.1": (2 * h, h)}
    if guidance:
        out.update({"guidance_in.in_layer": (h, 256), "guidance_in.out_layer": (h, h)})
    for i in range(depth):
        for s in ("img", "txt"):
            out.update({f"double_blocks.{i}.{s}_mod.lin": (6 * h, h), f"double_blocks.{i}.{s}_attn.qkv": (3 * h, h),
                        f"double_blocks.{i}.{s}_attn.proj": (h, h), f"double_blocks.{i}.{s}_mlp.0": (mlp, h),
                        f"double_blocks.{i}.{s}_mlp.2": (h, mlp)})
    for i in range(single):
        out.update({f"single_blocks.{i}.linear1": (3 * h + mlp, h), f"single_blocks.{i}.linear2": (h, h + mlp),
                    f"single_blocks.{i}.modulation.lin": (3 * h, h)})
    return out


class _MetaKModel:
    """A KModel with the released Flux layout on the meta device (no memory): what
    ``forge_flux`` reads (``config.huggingface_repo``, ``named_parameters``)."""

    def __init__(self, shapes, repo):
        from types import SimpleNamespace
        self.config = SimpleNamespace(huggingface_repo=repo)
        self.shapes = shapes

    def named_parameters(self):
        for k, shape in self.shapes.items():
            yield f"diffusion_model.{k}.weight", torch.empty(shape, device="meta")


@pytest.mark.parametrize("guidance,repo,arch", [(True, "black-forest-labs/FLUX.1-dev", "flux-dev"),
                                                (False, "black-forest-labs/FLUX.1-schnell", "flux-schnell")])
def test_forge_flux_releases_are_named_and_quantized_layouts_refused(start, guidance, repo, arch):
    from types import SimpleNamespace
    webui = start("forge", kind="flux")
    from safet2i_a1111 import lora

    assert lora.forge_flux(webui.shared.sd_model).arch == "flux (Forge Flux model of no released size)"

    def model(shapes, repo=repo):
        return SimpleNamespace(forge_objects=SimpleNamespace(unet=SimpleNamespace(model=_MetaKModel(shapes, repo))))

    shapes = bfl_shapes(3072, 12288, 19, 38, guidance)
    assert lora.forge_flux(model(shapes)).arch == arch
    assert lora.forge_flux(model(shapes, "stabilityai/stable-diffusion-3.5-large")) is None
    nf4 = dict(shapes)
    nf4["double_blocks.3.img_attn.qkv"] = (3 * 3072 * 3072 // 2, 1)       # bitsandbytes NF4 storage
    with pytest.raises(lora.LoraLayerError, match="double_blocks.3.img_attn.qkv"):
        lora.forge_flux(model(nf4))


def test_a_t5_engine_without_flux_or_sd35_clip_engines_is_refused_for_steering(start):
    """Flux (CLIP-L + T5) gives the T5 encoder; SD3.5's three engines are steered each on its own
    block and channels (``test_standin_sd35.py``); a T5 engine with neither layout (e.g. Chroma's
    T5 alone) is refused with an error (the job's images are blocked)."""
    from types import SimpleNamespace
    webui = start("forge", kind="flux")
    from safet2i_a1111.text_engines import SteeringError, find_encoders

    sd = webui.shared.sd_model
    assert [e.name for e in find_encoders(sd)] == ["t5"]
    with pytest.raises(SteeringError, match="without Flux's or SD3.5's CLIP engines"):
        find_encoders(SimpleNamespace(text_processing_engine_t5=sd.text_processing_engine_t5))
