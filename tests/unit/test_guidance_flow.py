"""Guidance on rectified-flow models: the flow spaces, corrections in a host's own space, and the
concept-branch form for guidance-distilled models. References are float64 formulas written here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from safet2i.errors import SafeT2IError
from safet2i.guidance import SLDConfig, SLDGuidance, SPGuardGuidance
from safet2i.guidance.spaces import SPACES, correct_prediction, from_eps, slope, to_eps

SIGMAS = torch.tensor([0.93, 0.5, 0.12], dtype=torch.float64)


def _latents(seed=0, shape=(3, 4, 5, 6)):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=g, dtype=torch.float64)
    eps = torch.randn(shape, generator=g, dtype=torch.float64)
    return x0, eps


def test_flow_spaces_follow_the_rectified_flow_parametrisation():
    """x = (1 − σ)·x0 + σ·ε; ComfyUI's CONST prediction is x0, diffusers' velocity is ε − x0: both
    must give back the ε that made x."""
    x0, eps = _latents()
    s = SIGMAS.view(-1, 1, 1, 1)
    x = (1 - s) * x0 + s * eps
    for space, pred in (("flow_denoised", x0), ("flow_v", eps - x0)):
        got = to_eps(pred, x, SIGMAS, space)
        np.testing.assert_allclose(got.numpy(), eps.numpy(), rtol=0, atol=1e-12)
        back = from_eps(eps, x, SIGMAS, space)
        np.testing.assert_allclose(back.numpy(), pred.numpy(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("space", SPACES)
def test_slope_is_the_derivative_of_to_eps(space):
    """a(σ) = ∂ε/∂pred, checked by a finite difference in float64 on every space."""
    x, pred = _latents(1)
    h = torch.randn(pred.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sig = SIGMAS if space != "v" else SIGMAS * 3
    d = (to_eps(pred + 1e-3 * h, x, sig, space) - to_eps(pred, x, sig, space)) / 1e-3
    a = slope(sig, space, pred)
    np.testing.assert_allclose(d.numpy(), (a * h).numpy(), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("space", SPACES)
def test_a_correction_in_the_host_space_gives_the_guided_eps_through_cfg(space):
    """Host CFG on corrected predictions equals ε_∅ + s·(ε_p − ε_∅ − c) mapped back (independent
    float64 formula per space)."""
    x, pu = _latents(3)
    pc = pu + 0.3 * _latents(4)[0]
    c = 0.1 * _latents(5)[1]
    sig = SIGMAS if space != "v" else SIGMAS * 3
    s_g = 4.5
    got = pu + s_g * (correct_prediction(pc, c, sig, space) - pu)
    eu, ec = to_eps(pu, x, sig, space), to_eps(pc, x, sig, space)
    want = from_eps(eu + s_g * (ec - eu - c), x, sig, space)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-10, atol=1e-10)


def test_zero_correction_returns_the_host_prediction_bit_for_bit():
    x, pred = _latents(6)
    pred32 = pred.float()
    out = correct_prediction(pred32, torch.zeros_like(pred32), SIGMAS, "flow_denoised")
    assert torch.equal(out, pred32)


def test_sigma_one_is_the_limit_and_a_nonzero_correction_there_is_refused():
    """At σ = 1 every ε equals x: SLD's differences and gate vanish, so its correction is 0 and the
    host's prediction is kept; a correction that is not 0 (momentum) cannot be mapped back."""
    x, d = _latents(7, (2, 4, 3, 3))
    sig = torch.tensor([1.0, 1.0], dtype=torch.float64)
    eps = [to_eps(d + k, x, sig, "flow_denoised") for k in range(3)]
    assert all(torch.equal(e, x) for e in eps)
    sld = SLDGuidance(SLDConfig(1000.0, 0, 0.01, 0.3, 0.4))
    sld.set_state(0, 10, 1.0, run="r")
    c = sld.correction(eps[0], eps[1], eps[2])
    assert torch.equal(c, torch.zeros_like(c))
    assert torch.equal(correct_prediction(d, c, sig, "flow_denoised"), d)
    with pytest.raises(SafeT2IError, match="σ = 1"):
        correct_prediction(d, torch.ones_like(d), sig, "flow_v")
    mixed = torch.tensor([1.0, 0.5], dtype=torch.float64)   # only the σ = 1 row is checked
    cc = torch.zeros_like(d)
    cc[1] = 1.0
    out = correct_prediction(d, cc, mixed, "flow_denoised")
    assert torch.equal(out[0], d[0]) and not torch.equal(out[1], d[1])


def _sld_reference(cfg):
    nu = {"v": None}

    def gamma(eu, ec, es, applied):
        v = np.zeros_like(eu) if nu["v"] is None else nu["v"]
        delta = ec - es
        mu = np.where(delta < cfg.threshold, np.minimum(1.0, cfg.guidance_scale * np.abs(delta)), 0.0)
        g = mu * (es - eu) + cfg.momentum_scale * v
        nu["v"] = cfg.mom_beta * v + (1 - cfg.mom_beta) * g
        return g if applied else np.zeros_like(g)

    return gamma


def test_concept_branch_is_sld_measured_against_the_conditional_prediction():
    """ε̂ = ε_p − s_b·(μ ⊙ (ε_S − ε_p) + s_m·ν) with SLD's own gate and momentum (warm-up 2)."""
    cfg = SLDConfig(guidance_scale=7.0, warmup_steps=2, threshold=0.05, momentum_scale=0.4, mom_beta=0.6)
    method = SLDGuidance(cfg, warmup=2)
    ref = _sld_reference(cfg)
    s_b = 3.5
    for step in range(5):
        x, ep = _latents(10 + step, (2, 4, 6, 6))
        es = ep + 0.2 * _latents(20 + step, (2, 4, 6, 6))[1]
        method.set_state(step, 5, None, run="flux")
        got = ep - method.branch_correction(ep, es, s_b)
        want = ep.numpy() - s_b * ref(ep.numpy(), ep.numpy(), es.numpy(), step >= 2)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)
        assert (step >= 2) == bool((got != ep).any())


def test_sp_guard_has_no_concept_branch_form():
    method = SPGuardGuidance()
    assert not method.supports_concept_branch
    with pytest.raises(ValueError, match="no concept-branch form"):
        method.branch_correction(torch.zeros(1, 4, 2, 2), torch.ones(1, 4, 2, 2), 3.5)


def test_correction_is_the_difference_of_the_plain_and_guided_direction():
    cfg = SLDConfig(guidance_scale=5.0, warmup_steps=0, threshold=0.5, momentum_scale=0.0, mom_beta=0.0)
    a, b = SLDGuidance(cfg), SLDGuidance(cfg)
    x, eu = _latents(30)
    ec, es = eu + 0.1, eu - 0.05
    a.set_state(0, 4, None, run=1)
    b.set_state(0, 4, None, run=1)
    np.testing.assert_allclose(a.correction(eu, ec, es).numpy(), ((ec - eu) - b.direction(eu, ec, es)).numpy(),
                               rtol=0, atol=0)
    off = SLDGuidance(SLDConfig(guidance_scale=1.0))
    off.set_state(0, 4, None, run=1)
    assert torch.equal(off.correction(eu, ec, es), torch.zeros_like(eu))


def _methods():
    from safet2i.guidance import DAGConfig, DAGGuidance, SPGuardConfig

    return [SLDGuidance(SLDConfig(50.0, 0, 0.2, 0.3, 0.4)),
            SPGuardGuidance(SPGuardConfig(max_scale=2.0, tau_h=-1.0, tau_m=-1.0)),
            DAGGuidance(DAGConfig(scale=0.5, skip_coverage=1.0, sld_gate=SLDConfig(50.0, 0, 0.2, 0.0, 0.0)))]


def test_every_method_depends_on_eps_only_through_differences():
    """The contract that lets flow hosts pass ε less a common offset (eps_offset_free)."""
    for a, b in zip(_methods(), _methods()):
        x, eu = _latents(40, (2, 4, 8, 8))
        ec = eu + 0.3 * _latents(41, (2, 4, 8, 8))[1]
        es = eu + 0.3 * _latents(42, (2, 4, 8, 8))[0]
        offset = 5.0 * _latents(43, (2, 4, 8, 8))[1]
        attn = torch.rand((2, 8, 8), generator=torch.Generator().manual_seed(44), dtype=torch.float64)
        for step in range(3):
            a.set_state(step, 3, None, run=1)
            b.set_state(step, 3, None, run=1)
            ca = a.correction(eu, ec, es, attn)
            cb = b.correction(eu + offset, ec + offset, es + offset, attn)
            np.testing.assert_allclose(ca.numpy(), cb.numpy(), rtol=0, atol=1e-9, err_msg=a.name)
        assert float(ca.abs().max()) > 1e-3, a.name   # the check is not vacuous


def test_inert_configurations():
    from safet2i.guidance import DAGConfig, DAGGuidance, SPGuardConfig

    assert SLDGuidance(SLDConfig(guidance_scale=1.0)).inert and not SLDGuidance("MAX").inert
    assert SPGuardGuidance(SPGuardConfig(max_scale=0.0)).inert and not SPGuardGuidance().inert
    assert DAGGuidance(DAGConfig(scale=0.0)).inert and not DAGGuidance().inert


def test_offset_free_eps_has_the_differences_of_eps():
    x, d1 = _latents(50)
    d2 = d1 + 0.1
    for space in ("flow_denoised", "flow_v", "denoised"):
        from safet2i.guidance.spaces import eps_offset_free

        want = to_eps(d1, x, SIGMAS, space) - to_eps(d2, x, SIGMAS, space)
        got = eps_offset_free(d1, SIGMAS, space) - eps_offset_free(d2, SIGMAS, space)
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0, atol=1e-12)
