"""Safety guidance in diffusers' flow-matching pipelines (SD3, Flux, Qwen-Image, Wan), tiny random
components of the real classes (``tiny_families``).

Reference, independent of the adapter: a forward pre-hook records the keyword arguments the
pipeline itself passes to its transformer, and a wrapper records what reaches
``scheduler.step``. For every step the test re-evaluates the transformer's class ``forward``
(bypassing the adapter) on the prompt, the negative and the concept, converts velocities to
ε = x + (1 − σ)·v in float64, runs SLD (Eq. 3-8, own momentum), and forms the pipeline's own CFG
formula on the guided prompt prediction v_p' = (ε_∅ + d_p − x)/(1 − σ) (Qwen-Image: with its
norm rescale; Flux at cfg 1: the concept branch ε_p − s_b·γ). At σ = 1 the reference is the
unguided formula.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from safet2i.diffusers_adapter import safety_guidance
from safet2i.diffusers_flow import encode_concept_kwargs
from safet2i.errors import SafeT2IError
from safet2i.guidance import SLDConfig, SLDGuidance, SPGuardGuidance

from tiny_families import FAMILIES, call_kwargs

# A gentle gate (μ = min(1, 3·|Δ|)) so float32 batching differences stay far below the tolerance.
GENTLE = SLDConfig(guidance_scale=3.0, warmup_steps=0, threshold=1.0, momentum_scale=0.5, mom_beta=0.7)
OFF = SLDConfig(guidance_scale=0.0, warmup_steps=0)
STEPS = 3
PROMPT = "a photo of a nude woman on a beach"
CONCEPT = "nudity, sexual"


@pytest.fixture
def pipes(family_pipes):   # the session's seed-0 pipelines (conftest.py)
    return family_pipes


def _kwargs(family, **kw):
    kw.setdefault("num_inference_steps", STEPS)
    return call_kwargs(family, seed=3, **kw)


def _pixels(pipe, family, **kw):
    return getattr(pipe(prompt=PROMPT, **_kwargs(family, **kw)), FAMILIES[family].output)


def _concept(pipe, family):
    return encode_concept_kwargs(pipe, CONCEPT, max_sequence_length=FAMILIES[family].call["max_sequence_length"])


class Recorder:
    """The transformer calls the pipeline makes (its own kwargs) and the scheduler's inputs."""

    def __init__(self, pipe):
        self.pipe, self.calls, self.steps = pipe, [], []
        self.handles = [m.register_forward_pre_hook(self.pre, with_kwargs=True)
                        for m in (pipe.transformer, getattr(pipe, "transformer_2", None)) if m is not None]
        orig = pipe.scheduler.step

        def step(model_output, timestep, sample, *a, **k):
            self.steps.append({"out": model_output.detach().clone().double(), "x": sample.detach().clone(),
                               "calls": self.calls, "t": float(timestep)})
            self.calls = []
            return orig(model_output, timestep, sample, *a, **k)

        pipe.scheduler.step = step

    def pre(self, module, args, kwargs):
        self.calls.append((module, {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in kwargs.items()}))

    def close(self):
        for h in self.handles:
            h.remove()
        vars(self.pipe.scheduler).pop("step", None)


def _forward(module, kw):
    with torch.no_grad():
        return type(module).forward(module, **{**kw, "return_dict": False})[0].double()


def _with_text(kw, text, rows=None):
    out = dict(kw)
    b = kw["hidden_states"].shape[0] if rows is None else rows
    for k, v in text.items():
        out[k] = None if v is None else v.expand(b, *v.shape[1:])
    if torch.is_tensor(kw.get("txt_ids")):    # Flux: zero position ids, one per text row (its encode_prompt)
        out["txt_ids"] = torch.zeros(text["encoder_hidden_states"].shape[1], kw["txt_ids"].shape[-1],
                                     dtype=kw["txt_ids"].dtype)
    return out


def sld_reference(cfg):
    nu = {"v": None}

    def gamma(eu, ec, es):
        v = np.zeros_like(eu) if nu["v"] is None else nu["v"]
        delta = ec - es
        mu = np.where(delta < cfg.threshold, np.minimum(1.0, cfg.guidance_scale * np.abs(delta)), 0.0)
        g = mu * (es - eu) + cfg.momentum_scale * v
        nu["v"] = cfg.mom_beta * v + (1 - cfg.mom_beta) * g
        return g

    return gamma


def reference_steps(pipe, family, rec, concept, scale, branch_scale=None):
    """(what the scheduler got, the reference, the unguided combination, σ) per step."""
    gamma = sld_reference(GENTLE)
    rows = []
    sigmas = pipe.scheduler.sigmas.double()
    for i, st in enumerate(rec.steps):
        s = float(sigmas[i])
        calls = st["calls"]
        module, kw = calls[0]
        x = kw["hidden_states"].double()
        if family == "sd3":                      # one [uncond; cond] batch
            assert len(calls) == 1
            b = x.shape[0] // 2
            v = _forward(module, kw)
            vu, vc = v[:b], v[b:]
            half = {k: (t[b:] if torch.is_tensor(t) and t.ndim and t.shape[0] == 2 * b else t) for k, t in kw.items()}
            vs = _forward(module, _with_text(half, concept))
            x = x[b:]
        else:
            vc = _forward(module, kw)
            vs = _forward(module, _with_text(kw, concept))
            vu = _forward(calls[1][0], calls[1][1]) if len(calls) > 1 else None
        eps = lambda v: (x + (1 - s) * v).numpy()  # noqa: E731
        if branch_scale is not None:
            assert vu is None
            g = gamma(eps(vc), eps(vc), eps(vs))
            want = vc.numpy() if s == 1.0 else (eps(vc) - branch_scale * g - x.numpy()) / (1 - s)
            rows.append((st["out"].numpy(), want, vc.numpy(), s))
            continue
        eu, ec, es = eps(vu), eps(vc), eps(vs)
        d_p = (ec - eu) - gamma(eu, ec, es)
        vc_guided = vc.numpy() if s == 1.0 else (eu + d_p - x.numpy()) / (1 - s)

        def combine(vcond):
            comb = vu.numpy() + scale * (vcond - vu.numpy())
            if family == "qwen_image":
                comb = comb * (np.linalg.norm(vcond, axis=-1, keepdims=True) / np.linalg.norm(comb, axis=-1, keepdims=True))
            return comb

        rows.append((st["out"].numpy(), combine(vc_guided), combine(vc.numpy()), s))
    return rows


def check(rows, worst_at_least=50):
    assert len(rows) == STEPS and rows[0][3] > 0.999   # flow schedules start at σ = 1 (Wan's UniPC: 1 − 1e-6)
    worst = 0.0
    for i, (got, want, plain, s) in enumerate(rows):
        atol = 1e-4 * float(np.abs(want).max())
        np.testing.assert_allclose(got, want, rtol=0, atol=atol, err_msg=f"step {i} (σ = {s})")
        worst = max(worst, float(np.abs(want - plain).max()) / atol)
    assert worst > worst_at_least, worst   # the guidance moved the prediction far beyond the tolerance


CFG = {"sd3": ({}, 4.0), "flux": ({"true_cfg_scale": 4.0, "negative_prompt": "blurry"}, 4.0),
       "qwen_image": ({}, 4.0), "wan": ({}, 5.0)}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_sld_matches_the_float64_reference(pipes, family):
    pipe = pipes[family]
    extra, scale = CFG[family]
    concept = _concept(pipe, family)
    rec = Recorder(pipe)
    try:
        with safety_guidance(pipe, SLDGuidance(GENTLE), concept_kwargs=concept, branch_scale=0.0) as m:
            pipe(prompt=PROMPT, **_kwargs(family, **extra))
    finally:
        rec.close()
    check(reference_steps(pipe, family, rec, concept, scale))
    assert len(m.history) == STEPS


def test_flux_at_cfg_one_uses_the_concept_branch(pipes):
    pipe = pipes["flux"]
    concept = _concept(pipe, "flux")
    rec = Recorder(pipe)
    try:
        with safety_guidance(pipe, SLDGuidance(GENTLE), concept_kwargs=concept, branch_scale=3.5):
            pipe(prompt=PROMPT, **_kwargs("flux"))
    finally:
        rec.close()
    assert all(len(st["calls"]) == 1 for st in rec.steps)   # no negative evaluated: cfg 1
    check(reference_steps(pipe, "flux", rec, concept, 1.0, branch_scale=3.5))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_zero_strength_is_bit_identical(pipes, family):
    pipe = pipes[family]
    extra = CFG[family][0]
    plain = _pixels(pipe, family, **extra)
    with safety_guidance(pipe, SLDGuidance(OFF), concept_kwargs=_concept(pipe, family)):
        off = _pixels(pipe, family, **extra)
    assert np.array_equal(plain, off)
    after = _pixels(pipe, family, **extra)   # the pipeline is restored on exit
    assert np.array_equal(plain, after)


def test_cfg_one_without_a_branch_and_sp_guard_at_cfg_one_are_refused(pipes):
    pipe = pipes["flux"]
    concept = _concept(pipe, "flux")
    with pytest.raises(SafeT2IError, match="branch_scale > 0"):
        with safety_guidance(pipe, SLDGuidance(GENTLE), concept_kwargs=concept, branch_scale=0.0):
            _pixels(pipe, "flux")
    with pytest.raises(SafeT2IError, match="harmfulness estimate"):
        with safety_guidance(pipe, SPGuardGuidance(), concept_kwargs=concept):
            _pixels(pipe, "flux")
    assert "forward" not in vars(pipe.transformer) and "step" not in vars(pipe.scheduler)


def test_sp_guard_runs_with_true_cfg(pipes):
    pipe = pipes["qwen_image"]
    plain = _pixels(pipe, "qwen_image")
    method = SPGuardGuidance()
    with safety_guidance(pipe, method, concept_kwargs=_concept(pipe, "qwen_image")):
        _pixels(pipe, "qwen_image")
    assert len(method.history) == STEPS and plain is not None


def test_encoded_concept_shares_the_prompt_call_when_lengths_match(pipes):
    """Same text length as the prompt: the concept rides in the prompt's transformer call."""
    pipe = pipes["wan"]
    calls = []
    h = pipe.transformer.register_forward_pre_hook(lambda m, a, k: calls.append(k["hidden_states"].shape[0]),
                                                   with_kwargs=True)
    inner = []
    orig_forward = type(pipe.transformer).forward
    type(pipe.transformer).forward = lambda self, **k: (inner.append(k["hidden_states"].shape[0]),
                                                        orig_forward(self, **k))[1]
    try:
        with safety_guidance(pipe, SLDGuidance(GENTLE), concept_kwargs=_concept(pipe, "wan")):
            _pixels(pipe, "wan")
    finally:
        type(pipe.transformer).forward = orig_forward
        h.remove()
    assert calls == [1, 1] * STEPS            # the pipeline's own calls: prompt, negative
    assert inner == [2, 1] * STEPS            # prompt + concept in one call, then the negative


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_concept_of_another_text_length_gets_its_own_call(pipes, family):
    """A concept encoded at another T5 length than the call's: it cannot share the call (SD3's CFG
    batch, Flux's prompt call), so it is evaluated on its own (Flux: with text position ids of its
    own length); the result still matches the reference."""
    pipe = pipes[family]
    length = FAMILIES[family].call["max_sequence_length"]
    concept = encode_concept_kwargs(pipe, CONCEPT, max_sequence_length=length // 2)
    assert concept["encoder_hidden_states"].shape[1] != _concept(pipe, family)["encoder_hidden_states"].shape[1]
    extra, scale = CFG[family]
    rec = Recorder(pipe)
    try:
        with safety_guidance(pipe, SLDGuidance(GENTLE), concept_kwargs=concept, branch_scale=0.0):
            pipe(prompt=PROMPT, **_kwargs(family, **extra))
    finally:
        rec.close()
    check(reference_steps(pipe, family, rec, concept, scale))


def test_wan22_both_experts_are_guided(pipes):
    """Wan 2.2 switches to ``transformer_2`` below the boundary timestep: both are patched, and
    every step (either expert) matches the reference."""
    import copy

    from diffusers import WanPipeline

    base = pipes["wan"]
    second = copy.deepcopy(base.transformer)
    with torch.no_grad():
        for p in second.parameters():
            p.mul_(0.9)
    pipe = WanPipeline(tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae,
                       scheduler=copy.deepcopy(base.scheduler), transformer=base.transformer, transformer_2=second,
                       boundary_ratio=0.8)
    pipe.set_progress_bar_config(disable=True)
    concept = _concept(pipe, "wan")
    rec = Recorder(pipe)
    try:
        with safety_guidance(pipe, SLDGuidance(GENTLE), concept_kwargs=concept) as m:
            pipe(prompt=PROMPT, guidance_scale_2=3.0, **_kwargs("wan"))
    finally:
        rec.close()
    used = [st["calls"][0][0] for st in rec.steps]
    assert used[0] is pipe.transformer and used[-1] is second        # both experts ran
    scales = [5.0 if st["calls"][0][0] is pipe.transformer else 3.0 for st in rec.steps]
    check(_reference_two_scales(pipe, rec, concept, scales), worst_at_least=10)
    assert len(m.history) == STEPS and "forward" not in vars(second)


def _reference_two_scales(pipe, rec, concept, scales):
    gamma = sld_reference(GENTLE)
    sigmas = pipe.scheduler.sigmas.double()
    out = []
    for i, st in enumerate(rec.steps):
        s = float(sigmas[i])
        (module, kw), (module_u, kw_u) = st["calls"]
        x = kw["hidden_states"].double()
        vc, vu = _forward(module, kw), _forward(module_u, kw_u)
        vs = _forward(module, _with_text(kw, concept))
        eps = lambda v: (x + (1 - s) * v).numpy()  # noqa: E731
        eu, ec, es = eps(vu), eps(vc), eps(vs)
        d_p = (ec - eu) - gamma(eu, ec, es)
        vcg = (eu + d_p - x.numpy()) / (1 - s)
        out.append((st["out"].numpy(), vu.numpy() + scales[i] * (vcg - vu.numpy()),
                    vu.numpy() + scales[i] * (vc.numpy() - vu.numpy()), s))
    return out


def _spguard_reference(max_scale=2.0, tau_h=-1.0, tau_m=0.0, ema=0.5):
    """SP-Guard-style in float64 on [B, C, H, W] latents (the module docstring's formulas)."""
    state = {"h": None}

    def direction(eu, ec, es):
        d_p, d_u = ec - eu, es - eu
        if not (np.any(d_p) or np.any(d_u)):      # σ = 1, where every ε is x: no information, h kept
            return d_p
        cos = (d_p * d_u).reshape(len(d_p), -1).sum(1) / np.maximum(
            np.linalg.norm(d_p.reshape(len(d_p), -1), axis=1) * np.linalg.norm(d_u.reshape(len(d_u), -1), axis=1), 1e-12)
        state["h"] = cos if state["h"] is None else ema * state["h"] + (1 - ema) * cos
        s = max_scale * np.clip((state["h"] - tau_h) / (1 - tau_h), 0, 1)
        ccos = (d_p * d_u).sum(1, keepdims=True) / np.maximum(
            np.linalg.norm(d_p, axis=1, keepdims=True) * np.linalg.norm(d_u, axis=1, keepdims=True), 1e-12)
        return d_p - s.reshape(-1, 1, 1, 1) * (ccos > tau_m) * d_u

    return direction


def test_sp_guard_on_flux_reads_channels_of_the_unpacked_latent(pipes):
    """Flux's latents are tokens of 2x2 patches [B, N, 64]; SP-Guard-style's per-pixel channel
    cosine must run on the unpacked [B, 16, H, W] latent (diffusers' own ``_unpack_latents``)."""
    from safet2i.guidance import SPGuardConfig

    pipe = pipes["flux"]
    concept = _concept(pipe, "flux")
    extra = CFG["flux"][0]
    rec = Recorder(pipe)
    try:
        with safety_guidance(pipe, SPGuardGuidance(SPGuardConfig(max_scale=2.0, tau_h=-1.0, tau_m=0.0)),
                             concept_kwargs=concept):
            pipe(prompt=PROMPT, **_kwargs("flux", **extra))
    finally:
        rec.close()
    direction = _spguard_reference()
    size = FAMILIES["flux"].call["height"]

    def unpacked(t):
        return pipe._unpack_latents(t, size, size, pipe.vae_scale_factor).numpy()

    worst = 0.0
    for i, st in enumerate(rec.steps):
        s = float(pipe.scheduler.sigmas[i])
        (module, kw), (module_u, kw_u) = st["calls"]
        x = kw["hidden_states"].double()
        vc, vu, vs = _forward(module, kw), _forward(module_u, kw_u), _forward(module, _with_text(kw, concept))
        eps = {k: unpacked(x + (1 - s) * v) for k, v in (("u", vu), ("c", vc), ("s", vs))}
        d_p = direction(eps["u"], eps["c"], eps["s"])
        if s == 1.0:
            want = vu.numpy() + 4.0 * (vc.numpy() - vu.numpy())
        else:
            guided_eps = torch.from_numpy(eps["u"] + d_p)
            packed = pipe._pack_latents(guided_eps, 1, guided_eps.shape[1], guided_eps.shape[2], guided_eps.shape[3])
            vcg = (packed.numpy() - x.numpy()) / (1 - s)
            want = vu.numpy() + 4.0 * (vcg - vu.numpy())
        got = st["out"].numpy()
        atol = 1e-4 * float(np.abs(want).max())
        np.testing.assert_allclose(got, want, rtol=0, atol=atol, err_msg=f"step {i}")
        worst = max(worst, float(np.abs(want - (vu.numpy() + 4.0 * (vc.numpy() - vu.numpy()))).max()) / atol)
    assert worst > 10


def test_transformer_pipelines_it_would_guide_wrongly_are_refused(pipes):
    """A non-flow scheduler (the velocity conversions would not hold) and a pipeline class whose
    CFG call order is unknown (the negative could be corrected instead of the prompt) are refused
    before anything is patched."""
    from diffusers import DDIMScheduler, FluxPipeline

    pipe = pipes["flux"]
    concept = _concept(pipe, "flux")
    flow_scheduler = pipe.scheduler
    pipe.scheduler = DDIMScheduler()
    try:
        with pytest.raises(SafeT2IError, match="not a rectified-flow scheduler"):
            with safety_guidance(pipe, SLDGuidance(GENTLE), concept_kwargs=concept):
                pass
    finally:
        pipe.scheduler = flow_scheduler
    other = type("MyAnimePipeline", (FluxPipeline,), {})
    pipe.__class__ = other
    try:
        with pytest.raises(SafeT2IError, match="does not know the order"):
            with safety_guidance(pipe, SLDGuidance(GENTLE), concept_kwargs=concept):
                pass
    finally:
        pipe.__class__ = FluxPipeline
    assert "forward" not in vars(pipe.transformer) and "step" not in vars(pipe.scheduler)


def test_an_instance_forward_of_another_wrapper_survives_guidance(pipes):
    """accelerate's CPU offload (or another pack) wraps ``forward`` / ``step`` on the instance:
    leaving the guidance context puts those wrappers back, not the class's methods."""
    pipe = pipes["flux"]
    t, sched = pipe.transformer, pipe.scheduler
    seen = []
    t_class, step_class = t.forward, sched.step

    def hook_forward(*a, **k):
        seen.append("forward")
        return t_class(*a, **k)

    def hook_step(*a, **k):
        seen.append("step")
        return step_class(*a, **k)

    t.forward, sched.step = hook_forward, hook_step
    try:
        with safety_guidance(pipe, SLDGuidance(GENTLE), CONCEPT):
            pass
        assert t.forward is hook_forward and sched.step is hook_step
        _pixels(pipe, "flux", num_inference_steps=1)
        assert "forward" in seen and "step" in seen
    finally:
        del t.forward, sched.step
