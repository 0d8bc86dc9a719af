"""The guidance contract (safet2i.guidance.contract): one run state for every host, start/stop,
what methods declare; the space conversions (safet2i.guidance.spaces) against independent
float64 formulas; and the diffusers adapter on a v-prediction UNet."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from safet2i.guidance import (
    METHODS, DAGGuidance, Guidance, Needs, SLDConfig, SLDGuidance, SPGuardGuidance, from_eps, make_method,
    shift_denoised, sld_gate, to_eps,
)

CFG = SLDConfig(guidance_scale=1000.0, warmup_steps=0, threshold=0.01, momentum_scale=0.3, mom_beta=0.4)


def preds(seed=0, shape=(1, 4, 4, 4)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3)]


# --------------------------------------------------------------------------- runs

def test_a_new_run_starts_on_the_first_call_a_new_key_or_a_step_going_back():
    g = SLDGuidance(CFG)
    eu, ec, es = preds()
    seen = []
    for step, run in [(0, "a"), (1, "a"), (1, "a"), (2, "a"), (0, "a"), (1, "a"), (1, "b"), (None, "b"), (None, "c")]:
        seen.append(g.set_state(step, 10, run=run))
        g.direction(eu, ec, es)
    # same step twice (second-order samplers) is one run; None never goes back
    assert seen == [True, False, False, False, True, False, True, False, True]
    assert g.runs == 4 and len(g.history) == 1 and g.state.momentum is not None


def test_reset_state_matches_a_fresh_method_after_a_new_run():
    a, b = SLDGuidance("STRONG"), SLDGuidance("STRONG")
    steps = [preds(i) for i in range(5)]
    a.set_state(0, 5, run=1)
    first = [a.direction(*p) for p in steps]
    a.set_state(0, 5, run=2)                       # new run: momentum and warm-up start over
    b.set_state(0, 5, run=1)
    for p, f in zip(steps, first):
        got, fresh = a.direction(*p), b.direction(*p)
        assert torch.equal(got, fresh) and torch.equal(got, f)
    assert a.state.warmup == SLDConfig(2000.0, 7).warmup_for(5) == 1


def test_start_stop_window_leaves_the_method_uncalled_outside():
    g = SPGuardGuidance(start=0.25, stop=0.75)
    g.set_state(0, 4, run=0)
    eu, ec, es = preds(1)
    outs = [g.direction(eu, ec, es) for _ in range(4)]
    assert [h.get("reason") for h in g.history] == ["outside start/stop", None, None, "outside start/stop"]
    assert torch.equal(outs[0], ec - eu) and torch.equal(outs[3], ec - eu)
    assert len([h for h in g.history if "harm" in h]) == 2          # the method ran twice
    with pytest.raises(ValueError):
        SLDGuidance(CFG, start=0.8, stop=0.2)


def test_methods_declare_what_they_need_and_the_registry_builds_them():
    assert SLDGuidance.needs == SPGuardGuidance.needs == Needs()
    assert DAGGuidance.needs.attention and DAGGuidance().needs_attention
    assert Needs().predictions == ("uncond", "cond", "concept") and Needs().extra_conditionings == 1
    assert list(METHODS) == ["SLD", "SP-Guard-style", "Detect-and-Guide-style"]
    assert all(issubclass(c, Guidance) for c in METHODS.values())
    assert make_method("SLD", "MAX").config.guidance_scale == 5000 and isinstance(make_method("SP-Guard-style"),
                                                                                  SPGuardGuidance)
    with pytest.raises(ValueError, match="unknown guidance method"):
        make_method("nope")


def test_detect_and_guide_uses_sld_s_gate_function():
    eu, ec, es = preds(2)
    mu = sld_gate(ec, es, CFG).numpy()
    delta = (ec - es).numpy()
    np.testing.assert_array_equal(mu, np.where(delta >= 0.01, 0.0, np.minimum(1.0, 1000 * np.abs(delta))))
    import safet2i.guidance.dag as dag
    assert not hasattr(DAGGuidance(), "sld_state") and dag.sld_gate is sld_gate


# --------------------------------------------------------------------------- spaces

def test_v_conversion_matches_the_ddpm_formulas():
    rng = np.random.default_rng(6)
    x0, eps = rng.normal(size=(2, 4, 3, 3)), rng.normal(size=(2, 4, 3, 3))
    abar = np.array([0.93, 0.02])
    a, s = np.sqrt(abar)[:, None, None, None], np.sqrt(1 - abar)[:, None, None, None]
    x_t = a * x0 + s * eps
    v = a * eps - s * x0
    sigma = torch.tensor(np.sqrt((1 - abar) / abar))
    got = to_eps(torch.tensor(v), torch.tensor(x_t), sigma, "v")
    np.testing.assert_allclose(got.numpy(), eps, atol=1e-12)
    np.testing.assert_allclose(from_eps(torch.tensor(eps), torch.tensor(x_t), sigma, "v").numpy(), v, atol=1e-12)
    x = torch.tensor(x_t)
    assert to_eps(x, x, sigma, "eps") is x and from_eps(x, x, sigma, "eps") is x
    with pytest.raises(ValueError):
        to_eps(x, x, sigma, "flow")


def test_denoised_round_trip_and_shift():
    x, d, change = preds(3, (2, 4, 3, 3))
    sigma = torch.tensor([5.0, 0.2], dtype=torch.float64)
    eps = to_eps(d, x, sigma, "denoised")
    np.testing.assert_allclose(eps.numpy(), ((x - d) / sigma.view(-1, 1, 1, 1)).numpy(), atol=1e-12)
    np.testing.assert_allclose(from_eps(eps, x, sigma, "denoised").numpy(), d.numpy(), atol=1e-12)
    shifted = shift_denoised(d, change, sigma)
    np.testing.assert_allclose(to_eps(shifted, x, sigma, "denoised").numpy(), (eps + change).numpy(), atol=1e-12)


# --------------------------------------------------------------------------- diffusers, v-prediction

diffusers = pytest.importorskip("diffusers")


def test_diffusers_v_prediction_unet_is_guided_in_eps_space(tmp_path):
    from diffusers import DDIMScheduler
    from tiny_diffusers import tiny_sd_pipeline

    from safet2i.diffusers_adapter import safety_guidance

    pipe = tiny_sd_pipeline(tmp_path)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    pipe.scheduler.set_timesteps(5)
    raw = []
    real = pipe.unet.forward

    def spy(sample, t, ehs, *a, **k):
        out = real(sample, t, ehs, *a, **k)
        raw.append((sample.detach().double(), out.sample.detach().double()))
        return out

    pipe.unet.forward = spy
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 4, 16, 16, generator=g)
    ehs = torch.randn(2, 77, 32, generator=g)
    concept = torch.randn(1, 77, 32, generator=g)
    t = pipe.scheduler.timesteps[1]
    cfg = SLDConfig(guidance_scale=50.0, warmup_steps=0, threshold=0.5, momentum_scale=0.0, mom_beta=0.0)
    with torch.no_grad(), safety_guidance(pipe, SLDGuidance(cfg, warmup=0), concept_embeds=concept):
        out = pipe.unet.forward(torch.cat([x, x]), t, ehs).sample.double()
    (sample, v), = raw
    assert sample.shape[0] == 3
    abar = float(pipe.scheduler.alphas_cumprod[int(t)])
    a, s = np.sqrt(abar), np.sqrt(1 - abar)
    xt = x.double().numpy()
    vu, vc, vs = (v[k:k + 1].numpy() for k in range(3))
    eu, ec, es = (a * vv + s * xt for vv in (vu, vc, vs))       # ε = √ᾱ·v + √(1−ᾱ)·x_t
    delta = ec - es
    mu = np.where(delta >= 0.5, 0.0, np.minimum(1.0, 50.0 * np.abs(delta)))
    guided = eu + (ec - eu) - mu * (es - eu)
    want_cond = (guided - s * xt) / a                           # back to v
    np.testing.assert_allclose(out[:1].numpy(), vu, atol=1e-5)
    np.testing.assert_allclose(out[1:].numpy(), want_cond, atol=1e-4)
    assert np.abs(want_cond - vc).max() > 1e-2                  # the guidance changed the cond row
