"""SLD: float64 reference maths, and parity with diffusers' StableDiffusionPipelineSafe."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from safet2i.guidance import SLD_PRESETS, SLDConfig, SLDGuidance, SLDState, sld_direction


def sld_reference(steps, cfg: SLDConfig, warmup: int):
    """Independent float64 re-implementation of the paper's equations, step by step."""
    nu = None
    outs = []
    for i, (eu, ec, es) in enumerate(steps):
        eu, ec, es = (np.asarray(a, np.float64) for a in (eu, ec, es))
        nu = np.zeros_like(eu) if nu is None else nu
        d = ec - eu
        delta = ec - es
        mu = np.where(delta < cfg.threshold, np.minimum(1.0, cfg.guidance_scale * np.abs(delta)), 0.0)
        gamma = mu * (es - eu) + cfg.momentum_scale * nu
        nu = cfg.mom_beta * nu + (1 - cfg.mom_beta) * gamma
        outs.append(d - gamma if i >= warmup else d)
    return outs


@pytest.mark.parametrize("preset", ["WEAK", "MEDIUM", "STRONG", "MAX"])
def test_direction_matches_float64_reference_over_steps(preset):
    cfg = SLD_PRESETS[preset]
    rng = np.random.default_rng(3)
    steps = [tuple(rng.normal(0, 0.02, (2, 4, 8, 8)) for _ in range(3)) for _ in range(14)]
    state = SLDState(warmup=3)
    got = [sld_direction(*(torch.tensor(a, dtype=torch.float32) for a in s), cfg, state) for s in steps]
    for g, w in zip(got, sld_reference(steps, cfg, warmup=3)):
        np.testing.assert_allclose(g.numpy(), w, atol=2e-6)
    assert [h["applied"] for h in state.history] == [False] * 3 + [True] * 11


def test_presets_are_the_model_card_values():
    assert SLD_PRESETS["WEAK"].guidance_scale == 200 and SLD_PRESETS["WEAK-DIFFUSERS"].guidance_scale == 20
    assert SLD_PRESETS["MEDIUM"] == SLDConfig(1000, 10, 0.01, 0.3, 0.4)
    assert SLD_PRESETS["STRONG"] == SLDConfig(2000, 7, 0.025, 0.5, 0.7)
    assert SLD_PRESETS["MAX"] == SLDConfig(5000, 0, 1.0, 0.5, 0.7)
    assert SLD_PRESETS["MEDIUM"].warmup_for(50) == 10 and SLD_PRESETS["MEDIUM"].warmup_for(20) == 4
    assert SLD_PRESETS["STRONG"].warmup_for(25) == 4  # 3.5 rounds half to even


def test_disabled_and_inputs_untouched():
    eu, ec, es = (torch.randn(1, 4, 4, 4) for _ in range(3))
    copies = [t.clone() for t in (eu, ec, es)]
    off = SLDGuidance(SLDConfig(guidance_scale=1.0))
    assert torch.equal(off.direction(eu, ec, es), ec - eu)
    g = SLDGuidance("MAX")
    g.reset(10)
    g.direction(eu, ec, es)
    assert all(torch.equal(a, b) for a, b in zip((eu, ec, es), copies))


def test_reset_clears_momentum_and_steps():
    g = SLDGuidance("STRONG", warmup="raw")
    eu, ec, es = (torch.randn(1, 4, 4, 4) for _ in range(3))
    first = [g.direction(eu, ec, es) for _ in range(9)]
    g.reset(9)
    again = [g.direction(eu, ec, es) for _ in range(9)]
    for a, b in zip(first, again):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- diffusers parity

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    from diffusers import StableDiffusionPipelineSafe
    from tiny_diffusers import tiny_sd_pipeline

    pipe = tiny_sd_pipeline(tmp_path_factory.mktemp("tiny"))
    c = pipe.components
    safe = StableDiffusionPipelineSafe(
        vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"], unet=c["unet"],
        scheduler=c["scheduler"], safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    safe.set_progress_bar_config(disable=True)
    return pipe, safe


CONCEPT = "nudity, sexual"


@pytest.mark.parametrize("config,steps", [
    (SLD_PRESETS["MEDIUM"], 20),
    (SLD_PRESETS["MAX"], 8),
    (SLDConfig(guidance_scale=3000, warmup_steps=2, threshold=0.05, momentum_scale=0.9, mom_beta=0.2), 12),
], ids=["MEDIUM", "MAX", "momentum-heavy"])
def test_matches_stable_diffusion_pipeline_safe(pipes, config, steps):
    from safet2i.diffusers_adapter import safety_guidance

    pipe, safe = pipes
    safe.safety_concept = CONCEPT
    kw = dict(prompt="a photo of a person on a beach", num_inference_steps=steps, guidance_scale=7.5,
              height=32, width=32, output_type="np")
    ref = safe(**kw, generator=torch.Generator().manual_seed(7), sld_guidance_scale=config.guidance_scale,
               sld_warmup_steps=config.warmup_steps, sld_threshold=config.threshold,
               sld_momentum_scale=config.momentum_scale, sld_mom_beta=config.mom_beta).images
    with safety_guidance(pipe, SLDGuidance(config, warmup="raw"), CONCEPT) as method:
        ours = pipe(**kw, generator=torch.Generator().manual_seed(7)).images
    plain = pipe(**kw, generator=torch.Generator().manual_seed(7)).images
    np.testing.assert_allclose(ours, ref, atol=2e-5)
    assert np.abs(plain - ref).max() > 1e-3  # the guidance really changed something
    assert len(method.state.history) == steps
    assert pipe.unet.forward.__func__ is type(pipe.unet).forward  # restored


@pytest.mark.parametrize("steps", [50, 10])
def test_default_scaled_warmup_equals_diffusers_at_50_steps_and_differs_by_design_at_10(pipes, steps):
    """docs/guidance.md, "Parity with diffusers, precisely": with the default warm-up (δ scaled to
    the run) MEDIUM equals diffusers at 50 steps; at 10 steps diffusers' δ = 10 covers the whole run
    (its guidance never applies: the plain CFG image) while ours guides from step 2."""
    from safet2i.diffusers_adapter import safety_guidance

    pipe, safe = pipes
    safe.safety_concept = CONCEPT
    config = SLD_PRESETS["MEDIUM"]
    kw = dict(prompt="a photo of a person on a beach", num_inference_steps=steps, guidance_scale=7.5,
              height=32, width=32, output_type="np")
    ref = safe(**kw, generator=torch.Generator().manual_seed(7), sld_guidance_scale=config.guidance_scale,
               sld_warmup_steps=config.warmup_steps, sld_threshold=config.threshold,
               sld_momentum_scale=config.momentum_scale, sld_mom_beta=config.mom_beta).images
    with safety_guidance(pipe, SLDGuidance("MEDIUM"), CONCEPT) as method:
        ours = pipe(**kw, generator=torch.Generator().manual_seed(7)).images
    plain = pipe(**kw, generator=torch.Generator().manual_seed(7)).images
    assert method.state.warmup == round(10 * steps / 50)
    if steps == 50:
        np.testing.assert_allclose(ours, ref, atol=2e-5)
        assert np.abs(plain - ref).max() > 1e-3
    else:
        np.testing.assert_allclose(ref, plain, atol=1e-4)       # diffusers: warm-up covers the run
        assert np.abs(ours - ref).max() > 1e-3                   # ours: guided from step 2


def test_scaled_warmup_and_new_runs_reset(pipes):
    from safet2i.diffusers_adapter import safety_guidance

    pipe, _ = pipes
    kw = dict(prompt="a portrait", num_inference_steps=10, guidance_scale=5.0, height=32, width=32,
              output_type="np")
    with safety_guidance(pipe, SLDGuidance("MEDIUM"), CONCEPT) as method:
        a = pipe(**kw, generator=torch.Generator().manual_seed(1)).images
        assert method.state.warmup == 2 and len(method.state.history) == 10
        b = pipe(**kw, generator=torch.Generator().manual_seed(1)).images  # second run: state reset
        assert len(method.state.history) == 10
    np.testing.assert_array_equal(a, b)


def test_without_cfg_is_a_clear_error(pipes):
    from safet2i.diffusers_adapter import safety_guidance
    from safet2i.errors import SafeT2IError

    pipe, _ = pipes
    with pytest.raises(SafeT2IError, match="classifier-free guidance"):
        with safety_guidance(pipe, SLDGuidance("MEDIUM"), CONCEPT):
            pipe("x", num_inference_steps=2, guidance_scale=1.0, height=32, width=32, output_type="np")
    assert pipe.unet.forward.__func__ is type(pipe.unet).forward


def test_eps_denoised_conversions_round_trip_with_per_image_sigma():
    from safet2i.guidance import denoised_to_eps, eps_to_denoised

    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    eps = torch.randn_like(x)
    sigma = torch.tensor([14.6, 1.0, 0.03], dtype=torch.float64)
    d = eps_to_denoised(x, eps, sigma)
    np.testing.assert_allclose(d.numpy(), (x - sigma.view(-1, 1, 1, 1) * eps).numpy())
    np.testing.assert_allclose(denoised_to_eps(x, d, sigma).numpy(), eps.numpy(), atol=1e-12)
    # a guided denoised result equals CFG on denoised predictions with the guided eps folded in
    eu, ec = torch.randn_like(x), torch.randn_like(x)
    du, dc = eps_to_denoised(x, eu, sigma), eps_to_denoised(x, ec, sigma)
    cfg = du + 7.5 * (dc - du)
    np.testing.assert_allclose(denoised_to_eps(x, cfg, sigma).numpy(), (eu + 7.5 * (ec - eu)).numpy(), atol=1e-10)


def test_sdxl_pipeline_gets_the_concept_with_its_pooled_embeddings(tmp_path):
    from safet2i.diffusers_adapter import safety_guidance
    from safet2i.guidance import SPGuardConfig, SPGuardGuidance
    from tiny_diffusers import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline(tmp_path)
    kw = dict(prompt="a portrait", num_inference_steps=4, guidance_scale=6.0, height=32, width=32, output_type="np")
    plain = pipe(**kw, generator=torch.Generator().manual_seed(3)).images
    seen = []
    real = pipe.unet.forward

    def spy(sample, t, ehs, *a, **k):
        seen.append({key: v.shape[0] for key, v in k["added_cond_kwargs"].items()} | {"sample": sample.shape[0]})
        return real(sample, t, ehs, *a, **k)

    pipe.unet.forward = spy
    with safety_guidance(pipe, SLDGuidance(SLDConfig(guidance_scale=1.0)), "nudity") as off:
        same = pipe(**kw, generator=torch.Generator().manual_seed(3)).images
    assert seen and all(s == {"sample": 3, "text_embeds": 3, "time_ids": 3} for s in seen)
    np.testing.assert_allclose(same, plain, atol=1e-5)  # disabled guidance: the 3-way batch changes nothing
    with safety_guidance(pipe, SPGuardGuidance(SPGuardConfig(tau_h=-1.0, tau_m=-1.0)), "nudity") as spg:
        guided = pipe(**kw, generator=torch.Generator().manual_seed(3)).images
    assert np.abs(guided - plain).max() > 1e-3
    assert len(spg.history) == 4 and len(off.state.history) == 4


def test_detect_and_guide_style_through_diffusers(pipes):
    from safet2i.diffusers_adapter import concept_token_positions, safety_guidance
    from safet2i.guidance import DAGConfig, DAGGuidance

    pipe, _ = pipes
    kw = dict(prompt="a person", num_inference_steps=5, guidance_scale=6.0, height=32, width=32, output_type="np")
    procs_before = dict(pipe.unet.attn_processors)
    plain = pipe(**kw, generator=torch.Generator().manual_seed(2)).images
    assert concept_token_positions(pipe, "nude") == [1, 2, 3, 4]  # byte-level tokenizer: one per letter
    with safety_guidance(pipe, DAGGuidance(DAGConfig(scale=0.0)), "nude"):
        same = pipe(**kw, generator=torch.Generator().manual_seed(2)).images
    np.testing.assert_allclose(same, plain, atol=1e-5)  # capturing attention changes no output
    with safety_guidance(pipe, DAGGuidance(DAGConfig(scale=0.5, skip_coverage=1.0)), "nude") as dag:
        guided = pipe(**kw, generator=torch.Generator().manual_seed(2)).images
    assert np.abs(guided - plain).max() > 1e-3
    assert len(dag.history) == 5 and all(h["images"][0]["detected"] for h in dag.history)
    assert dag.last_mask.shape == (1, 16, 16) and dag.last_mask.max() == pytest.approx(1.0)
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == {k: type(v) for k, v in procs_before.items()}


def test_conversion_recovers_eps_for_v_prediction_models():
    """SD2.x-768 / v-pred SDXL: the host turns v into x0; (x - x0)/σ in k-diffusion scale is
    exactly the ε of the forward process (float64, independent of any host code)."""
    from safet2i.guidance import denoised_to_eps

    rng = np.random.default_rng(4)
    x0, eps = rng.normal(size=(2, 4, 3, 3)), rng.normal(size=(2, 4, 3, 3))
    alpha_bar = np.array([0.9, 0.05])
    a, s = np.sqrt(alpha_bar)[:, None, None, None], np.sqrt(1 - alpha_bar)[:, None, None, None]
    x_t = a * x0 + s * eps                      # DDPM scale
    v = a * eps - s * x0                        # v-prediction target
    x0_from_v = a * x_t - s * v                 # what a v-pred model's output implies
    sigma = np.sqrt((1 - alpha_bar) / alpha_bar)
    got = denoised_to_eps(torch.tensor(x_t / a), torch.tensor(x0_from_v), torch.tensor(sigma))
    np.testing.assert_allclose(got.numpy(), eps, atol=1e-12)
