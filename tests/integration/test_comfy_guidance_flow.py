"""Safety guidance on rectified-flow sampling in a real ComfyUI, checked step by step against an
independent float64 reference.

``ModelSamplingSD3`` turns the tiny SD1.x checkpoint into a flow-matching sampler (ComfyUI's
CONST sampling, as SD3, Flux, Qwen-Image and Wan use): x = (1 − σ)·x0 + σ·ε and the model's
denoised output D is an x0 estimate, so ε_k = (x − (1 − σ)·D_k)/σ. The reference runs SLD (Eq. 3-8,
own momentum) on those ε and maps the guided ε̂ back with D = (x − σ·ε̂)/(1 − σ); at σ = 1 (the
first step of a flow schedule) every ε equals x and the reference is plain CFG. The family tests
(real SD3/Flux/Qwen-Image/Wan model classes) are in ``test_comfy_families_guidance.py``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from .test_comfy_guidance import STEPS, images, run_ok
from .test_comfy_guidance_compose import SLD, chain_graph, load_record, sld_reference

pytestmark = pytest.mark.integration


def flow_reference(steps, t, calls, where, branch_scale=None, n_steps=STEPS):
    """Per step: (ComfyUI's CFG result, the reference, the unguided CFG result, σ)."""
    sld = sld_reference()
    rows = []
    assert len(steps) == n_steps
    for i, st in enumerate(steps):
        if calls is not None:
            assert [sorted(c) for c in st["calls"]] == calls, (i, st["calls"])
        else:   # wherever ComfyUI put each chunk (it may split a batch by memory)
            found = {idx: (c, idx) for c, order in enumerate(st["calls"]) for idx in order}
            assert sorted(found) == sorted(idx for _, idx in where.values()), (i, st["calls"])
        x, s, got = t[f"{i}/x"], float(t[f"{i}/sigma"].reshape(-1)[0]), t[f"{i}/denoised"]
        if calls is None:
            raw = {k: t[f"{i}/call{found[idx][0]}_{idx}"] for k, (_, idx) in where.items()}
        else:
            raw = {k: t[f"{i}/call{c}_{idx}"] for k, (c, idx) in where.items()}
        eps = {k: (x - (1 - s) * d) / s for k, d in raw.items()}
        if branch_scale is None:
            d_p = sld(eps["uncond"], eps["cond"], eps["concept"])
            guided = eps["uncond"] + st["cond_scale"] * d_p
            plain_d = raw["uncond"] + st["cond_scale"] * (raw["cond"] - raw["uncond"])
        else:   # concept branch: ε̂ = ε_p − s_b·γ, γ from SLD with ε_∅ := ε_p (cfg 1)
            assert st["cond_scale"] == 1.0
            gamma = -sld(eps["cond"], eps["cond"], eps["concept"])
            guided = eps["cond"] - branch_scale * gamma
            plain_d = raw["cond"]
        want = plain_d if s == 1.0 else (x - s * guided) / (1 - s)
        rows.append((got, want, plain_d, s))
    return rows


def check(rows, worst_at_least=100):
    assert rows[0][3] == 1.0   # the flow schedule starts at σ = 1
    worst = 0.0
    for i, (got, want, plain, s) in enumerate(rows):
        atol = 5e-5 * float(np.abs(want).max())     # float32 host vs float64 reference
        np.testing.assert_allclose(got, want, rtol=0, atol=atol, err_msg=f"step {i} (σ = {s})")
        worst = max(worst, float(np.abs(want - plain).max()) / atol)
    assert worst > worst_at_least, worst   # the guidance changed the result far beyond the tolerance


def test_sld_on_flow_matching_matches_the_float64_reference(comfy, tiny_checkpoint):
    entry = run_ok(comfy, chain_graph(tiny_checkpoint, ["sld", "flow"], "flow_sld"))
    steps, t = load_record(comfy, entry, "flow_sld")
    check(flow_reference(steps, t, [[0, 1, 2]], {"cond": (0, 0), "uncond": (0, 1), "concept": (0, 2)}))
    assert f"{STEPS}/{STEPS} steps guided" in "\n".join(entry["outputs"]["11"]["text"])


def test_concept_branch_at_cfg_one_matches_the_reference(comfy, tiny_checkpoint):
    """cfg 1 (as guidance-distilled Flux runs): ComfyUI evaluates no negative; the concept is
    batched with the prompt and SLD is measured against the prompt's own prediction."""
    entry = run_ok(comfy, chain_graph(tiny_checkpoint, ["flow", "sld-branch"], "flow_branch", cfg=1.0))
    steps, t = load_record(comfy, entry, "flow_branch")
    check(flow_reference(steps, t, [[0, 2]], {"cond": (0, 0), "concept": (0, 2)}, branch_scale=3.5))


def test_zero_strength_on_flow_is_bit_identical_and_cfg_one_without_branch_is_refused(comfy, tiny_checkpoint):
    plain = images(comfy, run_ok(comfy, chain_graph(tiny_checkpoint, ["flow"], "flow_plain")))[0]
    g = chain_graph(tiny_checkpoint, ["sld", "flow"], "flow_off")
    g["40"]["inputs"].update(guidance_scale=0.0)
    assert np.array_equal(images(comfy, run_ok(comfy, g))[0], plain)
    g = chain_graph(tiny_checkpoint, ["flow", "sld-branch"], "flow_refused", cfg=1.0)
    g["41"]["inputs"]["concept_branch_scale"] = 0.0
    entry = comfy.run(g)
    assert entry["status"]["status_str"] == "error"
    text = json.dumps(entry["status"]["messages"])
    assert "concept_branch_scale" in text and "not applied without it" in text


def test_sp_guard_at_cfg_one_names_the_reason(comfy, tiny_checkpoint):
    g = chain_graph(tiny_checkpoint, ["flow"], "flow_spg", cfg=1.0)
    g["45"] = {"class_type": "SafeT2ISPGuard", "inputs": {"model": ["40", 0], "concept": ["5", 0], "max_scale": 2.0,
                                                          "harm_threshold": 0.45, "mask_threshold": 0.0, "ema": 0.5,
                                                          "start_step": 0}}
    g["30"]["inputs"]["model"] = ["45", 0]
    entry = comfy.run(g)
    assert entry["status"]["status_str"] == "error"
    assert "harmfulness estimate" in json.dumps(entry["status"]["messages"])
