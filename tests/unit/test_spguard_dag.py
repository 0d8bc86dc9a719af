"""SP-Guard-style and Detect-and-Guide-style maths against float64 references on
hand-built inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from safet2i.guidance.dag import DAGConfig, DAGGuidance, aggregate_attention, region_scales
from safet2i.guidance.sld import PRESETS
from safet2i.guidance.spguard import SPGuardConfig, SPGuardGuidance


# ------------------------------------------------------------------ SP-Guard-style

def spguard_reference(steps, cfg: SPGuardConfig):
    harm = None
    outs = []
    for i, (eu, ec, ex) in enumerate(steps):
        eu, ec, ex = (np.asarray(a, np.float64) for a in (eu, ec, ex))
        dp, du = ec - eu, ex - eu
        cos = np.array([np.dot(a.ravel(), b.ravel()) / (np.linalg.norm(a) * np.linalg.norm(b)) for a, b in zip(dp, du)])
        harm = cos if harm is None else cfg.ema * harm + (1 - cfg.ema) * cos
        s = cfg.max_scale * np.clip((harm - cfg.tau_h) / (1 - cfg.tau_h), 0, 1)
        num = (dp * du).sum(1, keepdims=True)
        den = np.linalg.norm(dp, axis=1, keepdims=True) * np.linalg.norm(du, axis=1, keepdims=True)
        mask = (num / den > cfg.tau_m).astype(np.float64)
        outs.append(dp - s[:, None, None, None] * mask * du if i >= cfg.start else dp)
    return outs


def test_spguard_matches_reference_and_spares_benign_prompts():
    rng = np.random.default_rng(0)
    eu = rng.normal(size=(2, 4, 6, 6))
    du = rng.normal(size=(2, 4, 6, 6))
    # image 0: prompt direction mostly along the unsafe concept (harmful); image 1: orthogonal-ish.
    dp = np.stack([0.9 * du[0] + 0.3 * rng.normal(size=du[0].shape), rng.normal(size=du[1].shape)])
    steps = [(eu, eu + dp + 0.05 * rng.normal(size=dp.shape) * k, eu + du) for k in range(4)]
    cfg = SPGuardConfig(start=1)
    g = SPGuardGuidance(cfg)
    got = [g.direction(*(torch.tensor(a) for a in s)) for s in steps]
    for a, b in zip(got, spguard_reference(steps, cfg)):
        np.testing.assert_allclose(a.numpy(), b, atol=1e-10)
    last = g.history[-1]
    assert last["strength"][0] > 1.0 and last["strength"][1] == 0.0
    np.testing.assert_allclose(got[-1][1].numpy(), steps[-1][1][1] - eu[1], atol=1e-12)  # benign untouched
    assert [h["applied"] for h in g.history] == [False, True, True, True]
    assert g.last_mask.shape == (2, 6, 6) and g.last_mask[0].max() == 1 and g.last_mask[1].max() == 0


# ------------------------------------------------------------------ Detect-and-Guide-style

def components_reference(mask):
    """Independent 8-connected flood fill."""
    h, w = mask.shape
    labels = np.zeros((h, w), int)
    n = 0
    for y in range(h):
        for x in range(w):
            if mask[y, x] and not labels[y, x]:
                n += 1
                stack = [(y, x)]
                labels[y, x] = n
                while stack:
                    cy, cx = stack.pop()
                    for dy in (-1, 0, 1):
                        for dx in (-1, 0, 1):
                            ny, nx = cy + dy, cx + dx
                            if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                                labels[ny, nx] = n
                                stack.append((ny, nx))
    return n, labels


def scales_reference(a, cfg: DAGConfig):
    h, w = a.shape
    edit, high = a >= cfg.low, a >= cfg.high
    n, labels = components_reference(high)
    if n == 0 or edit.mean() > cfg.skip_coverage:
        return np.zeros_like(a)
    s_c = cfg.area_max / (h * w)
    out = np.zeros_like(a)
    for y in range(h):
        for x in range(w):
            if edit[y, x]:
                area = (labels == labels[y, x]).sum() * s_c if labels[y, x] else 0.0
                out[y, x] = max(area, 1.0) * min(a[y, x] / cfg.low, cfg.magnitude_max)
    return out


def hand_map():
    a = np.zeros((8, 8))
    a[1:3, 1:3] = 0.9          # object of 4 px
    a[5:8, 4:8] = 0.7          # object of 12 px
    a[6, 4] = 0.6
    a[0, 6] = 0.02             # faint edit pixel, no object
    a[3, 3] = 0.005            # below the edit threshold
    a[2, 3] = 0.3              # edit region touching the first object
    return a


def test_region_scales_match_the_reference():
    a = hand_map()
    cfg = DAGConfig()
    got, info = region_scales(torch.tensor(a[None]), cfg)
    np.testing.assert_allclose(got[0].numpy(), scales_reference(a, cfg), rtol=1e-6)
    assert info[0] == {"detected": True, "objects": 2, "coverage": round(float((a >= 0.01).mean()), 4), "skipped": False}
    assert got[0][3, 3] == 0 and got[0][0, 6] == pytest.approx(1.0 * 2.0)  # S_edit = 1, T = 0.02/0.01


def test_no_detection_and_diffuse_maps_are_skipped():
    cfg = DAGConfig()
    quiet = np.full((8, 8), 0.2)          # nothing >= 0.5: not detected
    diffuse = np.full((8, 8), 0.2)
    diffuse[0, 0] = 1.0                   # detected, but the edit region covers 100 %
    got, info = region_scales(torch.tensor(np.stack([quiet, diffuse])), cfg)
    assert got.abs().max() == 0
    assert info[0]["detected"] is False and info[1]["skipped"] is True


def test_dag_guidance_form_and_sld_gate():
    rng = np.random.default_rng(2)
    eu, ec, es = (torch.tensor(rng.normal(size=(1, 4, 8, 8))) for _ in range(3))
    attn = torch.tensor(hand_map()[None])
    g = DAGGuidance(DAGConfig(scale=0.3))
    d = g.direction(eu, ec, es, attn).numpy()
    factor = scales_reference(hand_map(), DAGConfig())  # same 8x8 as the latent: no resize
    want = (ec - eu).numpy() - 0.3 * factor[None, None] * (es - eu).numpy()
    np.testing.assert_allclose(d, want, atol=1e-6)
    gated = DAGGuidance(DAGConfig(scale=0.3, sld_gate=PRESETS["STRONG"])).direction(eu, ec, es, attn).numpy()
    delta = (ec - es).numpy()
    mu = np.where(delta >= 0.025, 0.0, np.minimum(1.0, 2000 * np.abs(delta)))
    np.testing.assert_allclose(gated, (ec - eu).numpy() - 0.3 * factor[None, None] * mu * (es - eu).numpy(), atol=1e-6)
    assert torch.equal(DAGGuidance().direction(eu, ec, es, None), ec - eu)


def test_aggregate_attention_prefers_quarter_and_half_resolution_layers():
    full = torch.zeros(1, 64)          # 8x8 latent-resolution layer: ignored when others exist
    full[0, 0] = 100.0
    half = torch.zeros(1, 16)          # 4x4
    half[0, 5] = 1.0
    quarter = torch.ones(1, 4)         # 2x2
    agg = aggregate_attention([full, half, quarter], (8, 8))
    assert agg.shape == (1, 8, 8) and agg.max() == pytest.approx(1.0)
    assert agg[0, 0, 0] < agg[0, 2:4, 2:4].mean()      # the full-res spike did not count
    only_full = aggregate_attention([full], (8, 8))
    assert only_full[0, 0, 0] == pytest.approx(1.0)


def test_token_attention_matches_a_float64_softmax():
    from safet2i.guidance import token_attention

    rng = np.random.default_rng(5)
    heads, dh = 2, 4
    q, k = rng.normal(size=(3, 6, heads * dh)), rng.normal(size=(3, 7, heads * dh))
    got = token_attention(torch.tensor(q), torch.tensor(k), heads, [1, 2, 9]).numpy()  # 9 is out of range
    qh = q.reshape(3, 6, heads, dh).transpose(0, 2, 1, 3)
    kh = k.reshape(3, 7, heads, dh).transpose(0, 2, 1, 3)
    logits = qh @ kh.transpose(0, 1, 3, 2) / np.sqrt(dh)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(got, p[..., [1, 2]].mean(axis=(1, 3)), atol=1e-6)


def test_spguard_step_without_information_leaves_the_harm_estimate():
    """σ = 1 on a flow model: ε_∅ = ε_p = ε_S. That step returns a zero direction and leaves h;
    the first informative step sets h to its own cosine (not the EMA of it with 0)."""
    from safet2i.guidance.spguard import SPGuardConfig, SPGuardState, flat_cosine, spguard_direction

    cfg, st = SPGuardConfig(), SPGuardState()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    d = spguard_direction(x, x.clone(), x.clone(), cfg, st)
    assert torch.count_nonzero(d) == 0 and st.harm is None
    g = torch.Generator().manual_seed(1)
    eu, ec = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    es = ec + 0.3 * torch.randn(2, 4, 8, 8, generator=g)
    spguard_direction(eu, ec, es, cfg, st)
    torch.testing.assert_close(st.harm, flat_cosine(ec - eu, es - eu))
