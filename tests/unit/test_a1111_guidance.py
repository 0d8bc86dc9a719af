"""A1111 guidance rows (extension/safet2i_a1111/guidance.py) against a float64 SLD reference.

The webui's batched layout (a1111.md §1.6): cond rows per image, then one uncond row per
image; its combine is ``uncond + s·(cond − uncond)`` on the rows we leave in place.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "extension"))

from safet2i.guidance import SLDGuidance  # noqa: E402
from safet2i.guidance.sld import SLDConfig  # noqa: E402
from safet2i_a1111.guidance import GuidanceHook, insert_safety_rows  # noqa: E402

CFG = SLDConfig(1000.0, 0, 0.01, 0.3, 0.4)


def toy_model(x, sigma, text):
    """Deterministic 'UNet': output depends on latent, σ and the text rows."""
    bias = text.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
    return 0.8 * x + 0.1 * torch.tanh(x * 3 + bias) + 0.05 * sigma.reshape(-1, 1, 1, 1)


def sld_reference(eu, ec, es, momentum, cfg=CFG):
    """float64 numpy SLD step (Schramowski et al. Eq. 3-6, diffusers' order of operations)."""
    delta = ec - es
    scale = np.minimum(np.abs(delta) * cfg.guidance_scale, 1.0)
    mu = np.where(delta >= cfg.threshold, 0.0, scale)
    gamma = mu * (es - eu) + cfg.momentum_scale * momentum
    momentum = cfg.mom_beta * momentum + (1 - cfg.mom_beta) * gamma
    return (ec - eu) - gamma, momentum


@pytest.mark.parametrize("eps", [False, True], ids=["x0-sampler", "eps-sampler"])
def test_rows_and_in_place_guidance_match_the_reference(eps):
    g = torch.Generator().manual_seed(0)
    b, s = 2, 7.5
    lat = torch.randn(b, 4, 8, 8, generator=g, dtype=torch.float64)
    x = torch.cat([lat, lat])                             # [cond1, cond2, unc1, unc2]
    sigma = torch.tensor([3.0, 2.0, 3.0, 2.0], dtype=torch.float64)
    text_cond = torch.randn(b, 77, 16, generator=g, dtype=torch.float64)
    text_uncond = torch.randn(b, 77, 16, generator=g, dtype=torch.float64)
    concept = torch.randn(40, 16, generator=g, dtype=torch.float64)   # shorter: padded to 77
    frozen = [t.clone() for t in (x, sigma, text_cond)]
    hook = GuidanceHook(SLDGuidance(CFG), concept, eps_prediction=eps)
    momentum = np.zeros((b, 4, 8, 8))
    for step in range(3):
        params = SimpleNamespace(x=x, sigma=sigma, image_cond=None, text_cond=text_cond, text_uncond=text_uncond,
                                 sampling_step=step, total_sampling_steps=3)
        hook.before(params)
        assert hook.error is None and params.x.shape[0] == 6 and params.text_cond.shape == (4, 77, 16)
        assert torch.equal(params.text_cond[2, 39], params.text_cond[2, 76])    # padding repeats the last row
        assert all(torch.equal(a, f) for a, f in zip((x, sigma, text_cond), frozen))  # inputs untouched
        text_rows = torch.cat([params.text_cond, text_uncond])   # cond, safety, uncond rows
        out = toy_model(params.x, params.sigma, text_rows)
        if eps:
            out = (params.x - out) / params.sigma.reshape(-1, 1, 1, 1)
        raw = out.clone()
        hook.after(SimpleNamespace(x=out, sampling_step=step, total_sampling_steps=3))
        assert hook.error is None
        assert torch.equal(out[2:], raw[2:])                  # only the cond rows change
        combined = out[4:] + s * (out[:2] - out[4:])          # what the webui then computes
        sg = sigma[:2].reshape(-1, 1, 1, 1).numpy()
        to_eps = (lambda o: o) if eps else (lambda o: (lat.numpy() - o) / sg)
        ec, es, eu = (to_eps(raw[k].numpy()) for k in (slice(0, 2), slice(2, 4), slice(4, 6)))
        d_p, momentum = sld_reference(eu, ec, es, momentum)
        want = eu + s * d_p if eps else lat.numpy() - sg * (eu + s * d_p)
        np.testing.assert_allclose(combined.numpy(), want, rtol=1e-9, atol=1e-9)
    assert hook.steps_guided == 3


def test_unexpected_batches_fail_closed_without_touching_the_output():
    concept = torch.zeros(77, 8)
    hook = GuidanceHook(SLDGuidance(CFG), concept, eps_prediction=True)
    x = torch.zeros(6, 4, 2, 2)   # AND prompt: 2 cond rows per image for 2 images
    params = SimpleNamespace(x=x[:6], sigma=torch.ones(6), image_cond=None, text_cond=torch.zeros(4, 77, 8),
                             text_uncond=torch.zeros(2, 77, 8), sampling_step=0, total_sampling_steps=4)
    hook.before(params)
    out = torch.randn(8, 4, 2, 2)
    before = out.clone()
    hook.after(SimpleNamespace(x=out))
    assert hook.error and "AND" in hook.error and torch.equal(out, before)
    hook2 = GuidanceHook(SLDGuidance(CFG), concept, eps_prediction=True)
    p2 = SimpleNamespace(x=torch.zeros(4, 4, 2, 2), sigma=torch.ones(4), image_cond=None,
                         text_cond=torch.zeros(2, 77, 8), text_uncond=torch.zeros(2, 77, 8),
                         sampling_step=0, total_sampling_steps=4)
    hook2.before(p2)
    hook2.after(SimpleNamespace(x=torch.zeros(4, 4, 2, 2)))   # someone dropped our rows
    assert hook2.error and "rows" in hook2.error


def test_sdxl_dict_conditioning_gets_both_parts():
    b = 1
    x = torch.zeros(2, 4, 2, 2)
    tc = {"crossattn": torch.zeros(b, 154, 8), "vector": torch.zeros(b, 12)}
    concept = {"crossattn": torch.ones(77, 8), "vector": torch.ones(12)}
    x2, s2, ic2, tc2 = insert_safety_rows(x, torch.ones(2), torch.zeros(2, 5, 2, 2), tc, concept, b)
    assert x2.shape[0] == 3 and ic2.shape[0] == 3
    assert tc2["crossattn"].shape == (2, 154, 8) and tc2["vector"].shape == (2, 12)
    assert torch.equal(tc2["vector"][1], torch.ones(12)) and torch.equal(tc2["crossattn"][1, 100], torch.ones(8))


# -- Forge / reForge on rectified-flow models (Forge's Flux and SD3.5) ---------------------------

GENTLE = SLDConfig(3.0, 0, 1.0, 0.5, 0.7)


def _flow_step(seed):
    g = torch.Generator().manual_seed(seed)
    x, du, dc, ds = (torch.randn((1, 4, 6, 6), generator=g, dtype=torch.float64) for _ in range(4))
    return x, du, dc, ds


def _sld_gamma(cfg):
    nu = {"v": None}

    def gamma(eu, ec, es):
        v = np.zeros_like(eu) if nu["v"] is None else nu["v"]
        d = ec - es
        mu = np.where(d < cfg.threshold, np.minimum(1.0, cfg.guidance_scale * np.abs(d)), 0.0)
        out = mu * (es - eu) + cfg.momentum_scale * v
        nu["v"] = cfg.mom_beta * v + (1 - cfg.mom_beta) * out
        return out

    return gamma


@pytest.mark.parametrize("model", [SimpleNamespace(predictor=SimpleNamespace(prediction_type="const")),
                                   SimpleNamespace(model_sampling=type("ModelSamplingFlux", (type("CONST", (), {}),),
                                                                       {})())],
                         ids=["forge-predictor", "ldm_patched-model_sampling"])
def test_forge_flow_correction_matches_the_float64_reference(model):
    """Forge adds the scaled correction to the CFG result in x0 space; on a const (flow) model
    that must equal x0 of ε_u + s·d_p with ε = (x − (1 − σ)·D)/σ and D = (x − σ·ε)/(1 − σ)."""
    from safet2i.guidance import correct_prediction
    from safet2i_a1111.forge_guidance import ForgeGuidanceRun

    run = ForgeGuidanceRun(SLDGuidance(GENTLE), None, None, "forge", lambda: 4)
    gamma = _sld_gamma(GENTLE)
    s_g = 4.0
    for step, sigma in enumerate((0.8, 0.55, 0.3)):
        x, du, dc, ds = _flow_step(step)
        run.method.set_state(step, 4, sigma, run="r")
        c, space = run._correction(model, x, sigma, dc, du, ds, s_g)
        assert space == "flow_denoised"
        got = correct_prediction(du + s_g * (dc - du), c, sigma, space)
        eps = {k: ((x - (1 - sigma) * d) / sigma).numpy() for k, d in (("u", du), ("c", dc), ("s", ds))}
        d_p = (eps["c"] - eps["u"]) - gamma(eps["u"], eps["c"], eps["s"])
        want = (x.numpy() - sigma * (eps["u"] + s_g * d_p)) / (1 - sigma)
        np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-10)


def test_forge_distilled_flux_at_cfg_one_uses_the_concept_branch():
    from safet2i.guidance import SPGuardGuidance, correct_prediction
    from safet2i_a1111.forge_guidance import ForgeGuidanceRun
    from safet2i_a1111.guidance import GuidanceError

    model = SimpleNamespace(predictor=SimpleNamespace(prediction_type="const"))
    run = ForgeGuidanceRun(SLDGuidance(GENTLE), None, None, "forge", lambda: 4, distilled=True, branch_scale=3.5)
    gamma = _sld_gamma(GENTLE)
    for step, sigma in enumerate((0.8, 0.55)):
        x, du, dc, ds = _flow_step(10 + step)
        run.method.set_state(step, 4, sigma, run="r")
        c, space = run._correction(model, x, sigma, dc, du, ds, 1.0)   # the uncond is ignored at CFG 1
        got = correct_prediction(dc, c, sigma, space)
        ec, es = ((x - (1 - sigma) * d) / sigma for d in (dc, ds))
        eps_hat = ec.numpy() - 3.5 * gamma(ec.numpy(), ec.numpy(), es.numpy())
        np.testing.assert_allclose(got.numpy(), (x.numpy() - sigma * eps_hat) / (1 - sigma), rtol=0, atol=1e-10)
    spg = ForgeGuidanceRun(SPGuardGuidance(), None, None, "forge", lambda: 4, distilled=True)
    with pytest.raises(GuidanceError, match="harmfulness estimate"):
        spg._correction(model, *_flow_step(0)[:1], 0.5, *_flow_step(0)[1:], 1.0)
    with pytest.raises(GuidanceError, match="unknown prediction type"):
        ForgeGuidanceRun.space_of(SimpleNamespace(predictor=SimpleNamespace(prediction_type="x0")))

