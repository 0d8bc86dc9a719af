"""Safety guidance on the real SD3, Flux, Qwen-Image and Wan model classes in a real ComfyUI.

Tiny random models of each family (``test_comfy_families.py``: ``make_tiny_families.py`` files and
the test-only nodes of ``comfy_pack_tiny_families.py``), the family's customary sampling node, and
the recorder of ``comfy_pack_compose.py``: every step's CFG result is checked against the float64
reference of ``test_comfy_guidance_flow.py`` (ε_k = (x − (1 − σ)·D_k)/σ, SLD with its own
momentum, ε̂ mapped back with D = (x − σ·ε̂)/(1 − σ); plain CFG at σ = 1). Zero strength gives the
same pixels as no guidance; cfg 1 (guidance-distilled Flux) runs the concept branch; SP-Guard-style
refuses cfg 1 with the reason.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from .test_comfy_families import family_files, flux, pixels, qwen, run_ok, sd3, wan  # noqa: F401
from .test_comfy_guidance_compose import SLD, load_record
from .test_comfy_guidance_flow import check, flow_reference

pytestmark = pytest.mark.integration

STEPS = 4
# Chunks found wherever ComfyUI runs them (cond 0, uncond 1, concept 2; it may split a batch).
BATCHED = (None, {"cond": (None, 0), "uncond": (None, 1), "concept": (None, 2)})
BRANCH = (None, {"cond": (None, 0), "concept": (None, 2)})
FAMILIES = {"sd3": sd3, "flux": flux, "qwen_image": qwen, "wan": wan}


def guided(build, name, node="SafeT2ISLD", params=None, cfg=None, record=True, **kw):
    """The family graph with ``node`` between the sampling patch and KSampler (and the recorder)."""
    if cfg is not None:
        kw["cfg"] = cfg
    g = build(steps=STEPS, **kw)
    model = g["ks"]["inputs"]["model"]
    g["concept"] = {"class_type": "SafeT2IConceptEncode", "inputs": {"clip": ["clip", 0], "concept": "nudity, sexual"}}
    if node:
        g["guide"] = {"class_type": node, "inputs": {"model": model, "concept": ["concept", 0],
                                                     **(params if params is not None else
                                                        {"preset": "custom", **SLD})}}
        model = ["guide", 0]
    if record:
        g["rec"] = {"class_type": "SafeT2ITestRecord", "inputs": {"model": model, "name": name}}
        model = ["rec", 0]
        g["31"] = {"class_type": "SafeT2ITestSaveRecord", "inputs": {"samples": ["ks", 0], "name": name}}
    g["ks"]["inputs"]["model"] = model
    return g


@pytest.mark.parametrize("family", list(FAMILIES))
def test_sld_matches_the_float64_reference(comfy, family_files, family):
    build = FAMILIES[family]
    kw = {"cfg": 3.0} if family == "flux" else {}   # Flux with true CFG (a negative, cfg > 1)
    g = guided(build, f"fam_{family}", **kw)
    g["report"] = {"class_type": "SafeT2IGuidanceReport", "inputs": {"model": ["guide", 0], "samples": ["ks", 0]}}
    g["mask"] = {"class_type": "PreviewImage", "inputs": {"images": ["report", 1]}}   # video: one per latent frame
    entry = run_ok(comfy, g)
    steps, t = load_record(comfy, entry, f"fam_{family}")
    check(flow_reference(steps, t, *BATCHED, n_steps=STEPS), worst_at_least=20)
    assert f"/{STEPS} steps guided" in "\n".join(entry["outputs"]["report"]["text"])
    frames = 2 if family == "wan" else 1     # Wan: 5 frames -> 2 latent frames
    assert len(entry["outputs"]["mask"]["images"]) == frames


def test_flux_at_cfg_one_runs_the_concept_branch(comfy, family_files):
    entry = run_ok(comfy, guided(flux, "fam_flux_branch",
                                 params={"preset": "custom", **SLD, "concept_branch_scale": 3.5}))
    steps, t = load_record(comfy, entry, "fam_flux_branch")
    check(flow_reference(steps, t, *BRANCH, branch_scale=3.5, n_steps=STEPS), worst_at_least=20)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_zero_strength_gives_the_plain_pixels(comfy, family_files, family):
    build = FAMILIES[family]
    plain = pixels(comfy, run_ok(comfy, guided(build, "p", node=None, record=False)), "save")
    off = {"preset": "custom", **SLD, "guidance_scale": 0.0}
    same = pixels(comfy, run_ok(comfy, guided(build, "o", params=off, record=False)), "save")
    assert np.array_equal(plain, same)
    on = pixels(comfy, run_ok(comfy, guided(build, "g", params={"preset": "MAX", **SLD}, record=False)), "save")
    assert on.shape == plain.shape


def test_sp_guard_refuses_flux_at_cfg_one_and_runs_with_true_cfg(comfy, family_files):
    spg = {"max_scale": 2.0, "harm_threshold": -1.0, "mask_threshold": -1.0, "ema": 0.5, "start_step": 0}
    entry = comfy.run(guided(flux, "s1", node="SafeT2ISPGuard", params=spg, record=False), timeout=300)
    assert entry["status"]["status_str"] == "error"
    assert "harmfulness estimate" in json.dumps(entry["status"]["messages"])
    run_ok(comfy, guided(flux, "s2", node="SafeT2ISPGuard", params=spg, record=False, cfg=3.0))
