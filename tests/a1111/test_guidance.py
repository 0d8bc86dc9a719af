"""Safety guidance through the whole webui stand-in, on every variant, against a float64
reference computed independently of the extension.

The CFG denoiser's ``forward`` is observed (inputs and output of every model call the sampler
makes). The reference re-evaluates the same toy UNet on the three texts (prompt, negative
prompt, unsafe concept) at the recorded latent and σ / timestep, runs SLD (Schramowski et
al., Eq. 3-8: the order of operations of the reference pipeline) in numpy float64 with its own
momentum and warm-up bookkeeping, and forms the expected output ε_u + s·d_p in the host's
space: x0 = x − σ·(…) for k-diffusion samplers (A1111 Euler/Heun; every Forge/reForge sampler,
DDIM included after their conversion), ε for A1111's timestep samplers (DDIM).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from safet2i.guidance.sld import PRESETS, REFERENCE_STEPS

CONCEPT = ("an image showing hate, harassment, violence, suffering, humiliation, harm, suicide, sexual, nudity, "
           "bodily fluids, blood, obscene gestures, illegal activity, drug use, theft, vandalism, weapons, child "
           "abuse, brutality, cruelty")
PROMPTS = ["a red cat on a sofa", "a blue dog in the park"]


def sld_reference(preset: str, calls: int):
    cfg = PRESETS[preset]
    warmup = int(round(cfg.warmup_steps * calls / REFERENCE_STEPS))
    state = {"momentum": None, "step": 0}

    def step(eu, ec, es):
        d_p = ec - eu
        if state["momentum"] is None:
            state["momentum"] = np.zeros_like(d_p)
        delta = ec - es
        scale = np.minimum(np.abs(delta) * cfg.guidance_scale, 1.0)
        mu = np.where(delta >= cfg.threshold, 0.0, scale)
        gamma = mu * (es - eu) + cfg.momentum_scale * state["momentum"]
        state["momentum"] = cfg.mom_beta * state["momentum"] + (1 - cfg.mom_beta) * gamma
        applied = state["step"] >= warmup
        state["step"] += 1
        return d_p - gamma if applied else d_p, applied

    return step


def record_denoiser(monkeypatch):
    from modules.sd_samplers_cfg_denoiser import CFGDenoiser

    calls = []
    original = CFGDenoiser.forward

    def spy(self, x, sigma, **kw):
        out = original(self, x.clone(), sigma.clone(), **kw)
        calls.append({"denoiser": self, "x": x.clone(), "sigma": sigma.clone(), "s": kw["cond_scale"],
                      "out": out.clone()})
        return out

    monkeypatch.setattr(CFGDenoiser, "forward", spy)
    return calls


def model_eps(webui, call, texts):
    """ε of the toy UNet for each image's text at the recorded input, in the host's space.
    Returns (eps [B,…], x_k, sigma_k, output space)."""
    from _toy import t_of_sigma

    model = webui.shared.sd_model
    x, sigma = call["x"].double(), call["sigma"].double()
    enc = model.math.encode(texts)
    ctx, y = (enc["crossattn"], enc["vector"]) if isinstance(enc, dict) else (enc, None)
    denoiser = call["denoiser"]
    timesteps = type(denoiser).__name__ == "CFGDenoiserTimesteps"
    if webui.variant.startswith("a1111"):
        cond = {"crossattn": ctx, "vector": y} if y is not None else {"c_crossattn": [ctx]}
        if timesteps:
            return model.apply_model(x, sigma, cond), None, None, "eps"
        c_in = 1.0 / torch.sqrt(sigma ** 2 + 1.0)
        eps = model.apply_model(x * c_in[:, None, None, None], t_of_sigma(sigma), cond)
        d = x - eps * sigma[:, None, None, None]            # what the k-diffusion wrapper returns
        return (x - d) / sigma[:, None, None, None], x, sigma, "x0"
    if timesteps:                                            # Forge/reForge DDIM → k-diffusion space
        acd = model.alphas_cumprod
        sigma = (((1 - acd) / acd) ** 0.5)[sigma.round().long()]
        x = x * torch.sqrt(sigma ** 2 + 1.0)[:, None, None, None]
    d = model.math.x0(x, sigma, ctx, y)
    return (x - d) / sigma[:, None, None, None], x, sigma, ("eps" if timesteps else "x0")


def expected_outputs(webui, calls, prompts, preset, negative=""):
    """Reference output of every recorded call (and the plain-CFG output, for contrast)."""
    b = len(prompts)
    n_calls = len(calls)
    step = sld_reference(preset, n_calls)
    out, plain, applied = [], [], []
    for call in calls:
        ec, x, sigma, space = model_eps(webui, call, prompts)
        eu, *_ = model_eps(webui, call, [negative] * b)
        es, *_ = model_eps(webui, call, [CONCEPT] * b)
        d_p, was = step(eu.numpy(), ec.numpy(), es.numpy())
        s = call["s"]
        guided = eu.numpy() + s * d_p
        unguided = (eu + s * (ec - eu)).numpy()
        if space == "x0":
            sg = sigma.numpy().reshape(-1, 1, 1, 1)
            guided, unguided = x.numpy() - sg * guided, x.numpy() - sg * unguided
        out.append(guided)
        plain.append(unguided)
        applied.append(was)
    return out, plain, applied


CASES = [("Euler", "sd1", "MAX"), ("DDIM", "sd1", "MEDIUM"), ("Heun", "sd1", "MEDIUM"), ("Euler", "sdxl", "STRONG")]


@pytest.mark.parametrize("variant", ["a1111-1.10", "a1111-1.7", "forge", "reforge"])
@pytest.mark.parametrize("sampler,kind,preset", CASES, ids=[f"{s}-{k}-{p}" for s, k, p in CASES])
def test_guided_denoiser_output_matches_the_float64_reference(start, monkeypatch, variant, sampler, kind, preset):
    webui = start(variant, kind=kind)
    calls = record_denoiser(monkeypatch)
    args = webui.ui_args(guidance_enabled=True, guidance_method="SLD", guidance_preset=preset, filter_enabled=False)
    p, processed = webui.txt2img(PROMPTS, batch_size=2, steps=10, sampler_name=sampler, cfg_scale=6.5, args=args)
    job = p._safet2i_job
    assert job.error is None, job.error
    assert len(calls) == (19 if sampler == "Heun" else 10)
    assert job.guided_steps() == len(calls)             # every model call guided, once
    want, plain, applied = expected_outputs(webui, calls, PROMPTS, preset)
    for i, (call, w, u, was) in enumerate(zip(calls, want, plain, applied)):
        np.testing.assert_allclose(call["out"].numpy(), w, rtol=1e-9, atol=1e-9, err_msg=f"call {i}")
        if was:
            assert not np.allclose(w, u, atol=1e-6), f"call {i}: guidance had no effect"
    assert applied.count(False) == int(round(PRESETS[preset].warmup_steps * len(calls) / REFERENCE_STEPS))
    assert "SafeT2I guidance: SLD " + preset in processed.infotexts[0]


@pytest.mark.parametrize("variant", ["a1111-1.10", "a1111-1.7", "forge", "reforge"])
@pytest.mark.parametrize("inpaint", [False, True], ids=["img2img", "inpaint-only-masked"])
def test_img2img_and_inpaint_are_guided_like_the_reference(start, monkeypatch, variant, inpaint):
    """img2img (denoising 0.6) and inpaint "only masked": every model call of the shortened
    schedule is guided and equals the float64 reference, warm-up scaled to the pass's calls."""
    from PIL import Image, ImageDraw

    webui = start(variant)
    calls = record_denoiser(monkeypatch)
    init = Image.fromarray((np.indices((64, 64)).sum(0) % 255).astype(np.uint8)).convert("RGB")
    kw = {}
    if inpaint:
        mask = Image.new("L", (64, 64), 0)
        ImageDraw.Draw(mask).rectangle((16, 16, 48, 48), fill=255)
        kw = dict(mask=mask, inpaint_full_res=True)
    args = webui.ui_args(img2img=True, guidance_enabled=True, guidance_method="SLD", guidance_preset="MAX",
                         filter_enabled=False)
    p, processed = webui.img2img(init, PROMPTS[0], steps=10, denoising_strength=0.6, cfg_scale=6.5, args=args,
                                 **kw)
    job = p._safet2i_job
    assert job.error is None, job.error
    assert 0 < len(calls) < 10                          # the img2img schedule: fewer model calls
    assert job.guided_steps() == len(calls)
    want, plain, applied = expected_outputs(webui, calls, PROMPTS[:1], "MAX")
    for i, (call, w, u, was) in enumerate(zip(calls, want, plain, applied)):
        np.testing.assert_allclose(call["out"].numpy(), w, rtol=1e-9, atol=1e-9, err_msg=f"call {i}")
    assert any(applied)
    assert "SafeT2I guidance: SLD MAX" in processed.infotexts[0]


@pytest.mark.parametrize("variant", ["a1111-1.10", "a1111-1.7", "forge", "reforge"])
def test_hires_fix_is_guided_in_both_passes_once(start, monkeypatch, variant):
    webui = start(variant)
    calls = record_denoiser(monkeypatch)
    args = webui.ui_args(guidance_enabled=True, guidance_preset="MAX", filter_enabled=False)
    kw = {"hr_cfg": 6.0} if variant in ("forge", "reforge") else {}
    p, processed = webui.txt2img(PROMPTS, batch_size=2, steps=4, enable_hr=True, hr_scale=2.0,
                                 hr_second_pass_steps=3, denoising_strength=0.6, cfg_scale=6.0, args=args, **kw)
    job = p._safet2i_job
    assert job.error is None, job.error
    first = [c for c in calls if c["x"].shape[-1] == 8]
    second = [c for c in calls if c["x"].shape[-1] == 16]
    assert len(first) == 4 and len(second) >= 1 and len(calls) == len(first) + len(second)
    assert job.guided_steps() == len(calls)      # Forge asks twice before the hires pass: patched once
    for group in (first, second):
        want, _, _ = expected_outputs(webui, group, PROMPTS, "MAX")
        for call, w in zip(group, want):
            np.testing.assert_allclose(call["out"].numpy(), w, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("variant", ["a1111-1.10", "forge", "reforge"])
def test_negative_prompt_skipped_by_the_webui_uses_the_prompt_in_its_place(start, monkeypatch, variant):
    """NGMS / "skip early CFG": the webui drops the negative prompt for some steps; A1111
    substitutes the prompt's prediction, and Forge runs CFG = 1. Guidance still runs."""
    webui = start(variant)
    webui.shared.opts.skip_early_cond = 0.5
    calls = record_denoiser(monkeypatch)
    args = webui.ui_args(guidance_enabled=True, guidance_preset="MAX", filter_enabled=False)
    p, _ = webui.txt2img(PROMPTS, batch_size=2, steps=4, args=args)
    assert p._safet2i_job.error is None and p._safet2i_job.guided_steps() == 4
    assert p.extra_generation_params["Skip Early CFG"] == 0.5
    first = calls[0]
    ec, x, sigma, _ = model_eps(webui, first, PROMPTS)
    es, *_ = model_eps(webui, first, [CONCEPT] * 2)
    eu = model_eps(webui, first, [""] * 2)[0]
    cfg = PRESETS["MAX"]
    delta = (ec - es).numpy()
    mu = np.where(delta >= cfg.threshold, 0.0, np.minimum(np.abs(delta) * cfg.guidance_scale, 1.0))
    if variant == "reforge":       # the negative prompt is not evaluated at all: ε_u := ε_c
        gamma = mu * (es - ec).numpy()
        want = x.numpy() - sigma.numpy().reshape(-1, 1, 1, 1) * (ec.numpy() - gamma)
    elif variant == "forge":       # CFG scale 1 with the negative prompt evaluated (shortcut disabled)
        gamma = mu * (es - eu).numpy()
        want = x.numpy() - sigma.numpy().reshape(-1, 1, 1, 1) * (ec.numpy() - gamma)
    else:                          # A1111: the prompt's rows stand in for the negative prompt's
        gamma = mu * (es - ec).numpy()
        want = x.numpy() - sigma.numpy().reshape(-1, 1, 1, 1) * (ec.numpy() - gamma)
    np.testing.assert_allclose(first["out"].numpy(), want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("variant", ["a1111-1.10", "a1111-1.7", "forge", "reforge"])
def test_and_prompts_are_refused_and_the_images_blocked(start, variant):
    webui = start(variant)
    args = webui.ui_args(guidance_enabled=True, filter_enabled=False)
    p, processed = webui.txt2img("a cat AND a dog", steps=2, args=args)
    assert "AND" in (p._safet2i_job.failed or "")
    assert "blocked" in processed.infotexts[-1] and "AND" in processed.infotexts[-1]
    from safet2i_a1111.filtering import was_checked
    assert all(was_checked(im) for im in processed.images)
    assert all(np.asarray(im).std() < 40 for im in processed.images)       # the grey placeholder


@pytest.mark.parametrize("variant", ["a1111-1.10", "forge"])
def test_flow_models_are_refused(start, variant):
    webui = start(variant, kind="sd3")
    p, processed = webui.txt2img("a cat", steps=2, args=webui.ui_args(guidance_enabled=True))
    assert "SD3" in p._safet2i_job.failed and "blocked" in processed.infotexts[0]


def test_guidance_that_never_ran_blocks_the_images_a1111(start):
    """Another extension removed our CFG callbacks: no guided step → blocked, not unguided."""
    webui = start("a1111-1.10")
    import safet2i_a1111.script as script
    for fn in (script._on_cfg_denoiser, script._on_cfg_denoised):
        webui.callbacks.remove_callbacks_for_function(fn)
    p, processed = webui.txt2img("a cat", steps=2, args=webui.ui_args(guidance_enabled=True))
    assert "did not run" in p._safet2i_job.failed and "blocked" in processed.infotexts[0]


@pytest.mark.parametrize("variant", ["forge", "reforge"])
def test_guidance_that_never_ran_blocks_the_images_forge(start, variant):
    """Another extension's ``process_before_every_sampling`` (after ours) puts a clean UNet back."""
    webui = start(variant)

    class Rogue(webui.scripts.Script):
        def title(self):
            return "rogue"

        def show(self, is_img2img):
            return webui.scripts.AlwaysVisible

        def process_before_every_sampling(self, p, *args, **kwargs):
            p.sd_model.forge_objects.unet = p.sd_model.forge_objects_original.unet.clone()

    rogue = Rogue()
    rogue.args_from = rogue.args_to = len(webui.runner().inputs)
    webui.runner().alwayson_scripts.append(rogue)
    webui.runner().scripts.append(rogue)
    p, processed = webui.txt2img("a cat", steps=2, args=webui.ui_args(guidance_enabled=True))
    assert "did not run" in p._safet2i_job.failed and "blocked" in processed.infotexts[0]


def test_forge_guidance_composes_with_another_post_cfg_function(start, monkeypatch):
    """PAG-style extensions add their own post-cfg function; ours adds its correction on top."""
    webui = start("forge")
    calls = record_denoiser(monkeypatch)

    class Other(webui.scripts.Script):
        def title(self):
            return "other"

        def show(self, is_img2img):
            return webui.scripts.AlwaysVisible

        def process_before_every_sampling(self, p, *args, **kwargs):
            unet = p.sd_model.forge_objects.unet.clone()
            unet.set_model_sampler_post_cfg_function(lambda a: a["denoised"] + 0.25)
            p.sd_model.forge_objects.unet = unet

    other = Other()
    other.args_from = other.args_to = len(webui.runner().inputs)
    runner = webui.runner()
    runner.alwayson_scripts.insert(0, other)     # runs before ours
    args = webui.ui_args(guidance_enabled=True, guidance_preset="MAX", filter_enabled=False)
    p, _ = webui.txt2img(PROMPTS, batch_size=2, steps=3, args=args)
    assert p._safet2i_job.error is None
    want, _, _ = expected_outputs(webui, calls, PROMPTS, "MAX")
    for call, w in zip(calls, want):
        np.testing.assert_allclose(call["out"].numpy(), w + 0.25, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("variant", ["a1111-1.10", "a1111-1.7", "forge", "reforge"])
def test_sp_guard_style_guidance_runs_and_detect_and_guide_is_refused(start, monkeypatch, variant):
    webui = start(variant)
    calls = record_denoiser(monkeypatch)
    args = webui.ui_args(guidance_enabled=True, guidance_method="SP-Guard-style", filter_enabled=False)
    p, _ = webui.txt2img(PROMPTS, batch_size=2, steps=4, args=args)
    assert p._safet2i_job.failed is None and p._safet2i_job.guided_steps() == len(calls) == 4
    args = webui.ui_args(guidance_enabled=True, guidance_method="Detect-and-Guide-style")
    p, processed = webui.txt2img("a", steps=2, args=args)
    assert "cross-attention" in p._safet2i_job.failed and "blocked" in processed.infotexts[0]


def test_forge_classic_flavour_post_cfg_with_ldm_patched(start, monkeypatch):
    """Old Forge / Forge Classic (ldm_patched with Forge's sampling function) gets the Forge
    functions with ldm_patched's ``calc_cond_uncond_batch``; run here on reForge's sampling
    function, whose post-cfg arguments are a superset, against the same reference."""
    webui = start("reforge")
    import safet2i_a1111.forge_guidance as fg
    monkeypatch.setattr(fg, "flavour_of", lambda unet: "forge-classic")
    calls = record_denoiser(monkeypatch)
    args = webui.ui_args(guidance_enabled=True, guidance_preset="MAX", filter_enabled=False)
    p, _ = webui.txt2img(PROMPTS, batch_size=2, steps=4, args=args)
    assert p._safet2i_job.failed is None and p._safet2i_job.runs[0].flavour == "forge-classic"
    want, _, _ = expected_outputs(webui, calls, PROMPTS, "MAX")
    for call, w in zip(calls, want):
        np.testing.assert_allclose(call["out"].numpy(), w, rtol=1e-9, atol=1e-9)
