"""Detect-and-Guide-style guidance on SD3, SD3.5, Flux, Qwen-Image and Wan in a real ComfyUI, tiny
random models of ComfyUI's own classes (``comfy_pack_tiny_families.py``).

Two tiers:

* ``comfy_dag_joint_probe.py`` (ComfyUI's interpreter, no server): the real node patches the model
  and ``comfy.sample.sample`` runs 3 steps; every step's attention map must equal the float64
  map computed from the q/k the layers really attended with (recorded outside SafeT2I's override),
  and every guided prediction the float64 Detect-and-Guide step given that map;
* workflows on the test server: the node between the model-sampling node and KSampler guides
  every step of each family (Flux at cfg 1 through the concept branch), zero strength is
  bit-identical, and another pack's attention override set after SafeT2I either chains it (fine)
  or drops it (sampling stops with an error, no image).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from .test_comfy_families import family_files, flux, pixels, qwen, run_ok, sd3, unet, wan  # noqa: F401

pytestmark = pytest.mark.integration
PROBE = Path(__file__).with_name("comfy_dag_joint_probe.py")
CONCEPT = "nude naked erotic"
#: text→image attention layers each tiny model has: SD3 2 joint blocks (SD3.5's extra image
#: self-attention is not text→image), Flux 1 double + 1 single block, Qwen-Image 2 blocks, Wan 1 block.
LAYERS = {"sd3": 2, "sd35": 2, "flux": 2, "qwen_image": 2, "wan": 1}


@pytest.mark.parametrize("family,cfg", [("sd3", 4.0), ("sd35", 4.0), ("flux", 4.0), ("flux", 1.0),
                                        ("qwen_image", 4.0), ("wan", 4.0)])
def test_maps_and_steps_match_float64_references(family, cfg):
    from .conftest import _comfy_env

    path, python = _comfy_env()
    res = subprocess.run([python, str(PROBE), path, family, str(cfg)], cwd=path, capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-4000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(got["steps"]) == 3 and got["positions"], got
    assert got["rows"][0] == got["rows"][1]     # the test's own token count = the concept's conditioning rows
    moved = 0.0
    for i, st in enumerate(got["steps"]):
        assert st["layers"] == LAYERS[family], st
        assert st["map_shape"] == st["want_shape"], st
        assert st["map_err"] < 1e-5, st
        tol = 1e-5 * max(1.0, st["out_scale"])
        assert st["out_err"] < tol, (i, st)
        moved = max(moved, st["moved"] / tol)
    assert got["steps"][0]["sigma"] == 1.0 and got["steps"][0]["moved"] == 0.0   # σ = 1: nothing to map back
    assert moved > 1000, moved      # the guidance moved the prediction far beyond the tolerance
    assert got["changed"] > 0.1
    if family == "wan":             # [B, F, h, w]: each latent frame is detected on its own
        assert all(len(h["images"]) == 2 for h in got["history"])


def dag(g: dict, **params) -> dict:
    """``g`` with SafeT2IDetectGuide between its model (after model sampling) and KSampler, plus a report."""
    g = json.loads(json.dumps(g))
    g["dag"] = {"class_type": "SafeT2IDetectGuide", "inputs": {
        "model": g["ks"]["inputs"]["model"], "clip": ["clip", 0], "concept": CONCEPT, "scale": 0.5, "high": 0.5,
        "low": 0.01, "skip_coverage": 1.0, "sld_gate": "none", "guideline_embeddings": "none",
        "guideline_tokens": "none", "concept_branch_scale": 3.5, **params}}
    g["ks"]["inputs"]["model"] = ["dag", 0]
    g["rep"] = {"class_type": "SafeT2IGuidanceReport", "inputs": {"model": ["dag", 0], "samples": ["ks", 0]}}
    return g


def report(entry) -> str:
    return "\n".join(entry["outputs"]["rep"]["text"])


GRAPHS = {
    "sd3": lambda: sd3(),
    "sd35": lambda: sd3(model=unet("tiny_sd35.safetensors")),
    "flux_cfg1": lambda: flux(),                                      # FluxGuidance 3.5, cfg 1: concept branch
    "flux_true_cfg": lambda: flux(cfg=3.0),
    "qwen_image": lambda: qwen(),
    "wan": lambda: wan(),
}


@pytest.mark.parametrize("name", list(GRAPHS))
def test_every_step_is_guided_and_zero_strength_is_plain(comfy, family_files, name):  # noqa: F811
    plain = pixels(comfy, run_ok(comfy, GRAPHS[name]()), "save")
    entry = run_ok(comfy, dag(GRAPHS[name]()))
    assert "2/2 steps guided" in report(entry), report(entry)
    assert np.abs(pixels(comfy, entry, "save") - plain).max() > 3
    off = run_ok(comfy, dag(GRAPHS[name](), scale=0.0))
    assert np.array_equal(pixels(comfy, off, "save"), plain)


def test_flux_at_cfg_one_without_a_branch_is_refused(comfy, family_files):  # noqa: F811
    entry = comfy.run(dag(flux(), concept_branch_scale=0.0))
    assert entry["status"]["status_str"] == "error"
    assert "concept_branch_scale" in json.dumps(entry["status"]["messages"])


def test_other_attention_overrides(comfy, family_files):  # noqa: F811
    """The override is one slot: one set before SafeT2I is chained; one set after SafeT2I that chains
    it changes nothing; one set after SafeT2I that drops it stops sampling (no image)."""
    guided = pixels(comfy, run_ok(comfy, dag(flux())), "save")
    before = dag(flux())
    before["ov"] = {"class_type": "SafeT2ITestAttentionOverride", "inputs": {"model": before["dag"]["inputs"]["model"],
                                                                             "mode": "replace"}}
    before["dag"]["inputs"]["model"] = ["ov", 0]
    assert np.array_equal(pixels(comfy, run_ok(comfy, before), "save"), guided)
    for mode in ("chain", "replace"):
        after = dag(flux())
        after["ov"] = {"class_type": "SafeT2ITestAttentionOverride", "inputs": {"model": ["dag", 0], "mode": mode}}
        after["ks"]["inputs"]["model"] = ["ov", 0]
        entry = comfy.run(after)
        if mode == "chain":
            assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
            assert np.array_equal(pixels(comfy, entry, "save"), guided)
        else:
            assert entry["status"]["status_str"] == "error"
            assert "could not read the concept's joint attention" in json.dumps(entry["status"]["messages"])
            assert not entry.get("outputs", {}).get("save")
