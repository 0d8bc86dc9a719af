"""Safety guidance composed with other packs' cond-batch functions, in a real ComfyUI.

The test pack ``comfy_pack_compose.py`` stands in for another node pack: it claims
``sampler_calc_cond_batch_function`` and scales the [cond, uncond] predictions. Its recorder
keeps every UNet call's raw outputs and every CFG result; each sampled step is then checked
against an independent float64 reference: the other pack's effect on the recorded raw
predictions, SLD (Schramowski et al., Eq. 3-8, own momentum bookkeeping) on ε = (x − D)/σ,
and CFG, i.e. x − σ·(ε_∅ + s·d_p).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from .test_comfy_guidance import STEPS, images, run_ok

pytestmark = pytest.mark.integration

FACTOR = 0.9
# A gentle gate (μ = min(1, 3·|Δ|)): with a preset's s_S of 1000-5000 the gate's slope turns float32
# rounding of the host into visible differences at single elements, which a float64 reference cannot follow.
SLD = {"guidance_scale": 3.0, "warmup_steps": 0, "threshold": 1.0, "momentum_scale": 0.5, "mom_beta": 0.7}


def chain_graph(ckpt, chain, name, cfg=7.0):
    """Checkpoint → the ``chain`` of MODEL patches in order → recorder → KSampler (euler)."""
    g = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo of a nude woman on a beach"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "SafeT2IConceptEncode", "inputs": {"clip": ["1", 1], "concept": "nudity, sexual, naked"}},
        "15": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo of a woman on a beach"}},
    }
    model, guided = ["1", 0], None
    for i, link in enumerate(chain):
        nid = str(40 + i)
        if link == "sld":
            g[nid] = {"class_type": "SafeT2ISLD", "inputs": {"model": model, "concept": ["5", 0], "preset": "custom",
                                                             **SLD}}
            guided = nid
        elif link.startswith("pack"):
            g[nid] = {"class_type": "SafeT2ITestScaleCondBatch", "inputs": {
                "model": model, "factor": FACTOR, "mode": "direct" if link == "pack-direct" else "batched"}}
        elif link == "dag":
            g[nid] = {"class_type": "SafeT2IDetectGuide", "inputs": {
                "model": model, "clip": ["1", 1], "concept": "nudity, sexual", "scale": 0.5, "high": 0.5, "low": 0.01,
                "skip_coverage": 1.0, "sld_gate": "none", "guideline_embeddings": "none"}}
            guided = nid
        elif link == "flow":    # rectified-flow sampling on the same UNet (x = (1 − σ)·x0 + σ·ε)
            g[nid] = {"class_type": "ModelSamplingSD3", "inputs": {"model": model, "shift": 3.0}}
        elif link == "sld-branch":
            g[nid] = {"class_type": "SafeT2ISLD", "inputs": {"model": model, "concept": ["5", 0], "preset": "custom",
                                                             **SLD, "concept_branch_scale": 3.5}}
            guided = nid
        elif link == "drop-pre-cfg":
            g[nid] = {"class_type": "SafeT2ITestDropPreCfg", "inputs": {"model": model}}
        elif link == "reattention":
            g[nid] = {"class_type": "SafeT2ILatentReattention", "inputs": {
                "model": model, "original": ["15", 0], "s1": 0.2, "s2": 0.2, "window": 1, "channels": "320:0.2"}}
        model = [nid, 0]
    g["30"] = {"class_type": "SafeT2ITestRecord", "inputs": {"model": model, "name": name}}
    g["7"] = {"class_type": "KSampler", "inputs": {
        "model": ["30", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": 5,
        "steps": STEPS, "cfg": cfg, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}}
    g["8"] = {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}}
    g["10"] = {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "compose"}}
    g["31"] = {"class_type": "SafeT2ITestSaveRecord", "inputs": {"samples": ["7", 0], "name": name}}
    if guided:
        g["11"] = {"class_type": "SafeT2IGuidanceReport", "inputs": {"model": model, "samples": ["7", 0]}}
    return g


def load_record(comfy, entry, name):
    from safetensors.numpy import load_file

    steps = json.loads(entry["outputs"]["31"]["text"][0])
    t = {k: v.astype(np.float64) for k, v in load_file(str(comfy.output_dir / f"{name}.safetensors")).items()}
    return steps, t


def sld_reference():
    """Independent float64 SLD step with its own momentum (warm-up 0)."""
    state = {"nu": None}

    def step(eu, ec, es):
        nu = np.zeros_like(eu) if state["nu"] is None else state["nu"]
        delta = ec - es
        mu = np.where(delta < SLD["threshold"], np.minimum(1.0, SLD["guidance_scale"] * np.abs(delta)), 0.0)
        gamma = mu * (es - eu) + SLD["momentum_scale"] * nu
        state["nu"] = SLD["mom_beta"] * nu + (1 - SLD["mom_beta"]) * gamma
        return (ec - eu) - gamma

    return step


def check_trajectory(steps, t, layout, factor, guided=True):
    """Every step's CFG result equals the reference built from that step's raw UNet outputs.

    ``layout``: the expected ``cond_or_uncond`` of the step's UNet calls, and where the
    prompt (0), negative (1) and safety concept live as (call, index)."""
    calls, where = layout
    sld = sld_reference()
    assert len(steps) == STEPS
    worst = 0.0
    for i, st in enumerate(steps):
        assert [sorted(c) for c in st["calls"]] == calls, (i, st["calls"])   # chunk order is ComfyUI's
        x, sigma, got = t[f"{i}/x"], t[f"{i}/sigma"].reshape(-1, 1, 1, 1), t[f"{i}/denoised"]
        raw = {k: t[f"{i}/call{c}_{idx}"] for k, (c, idx) in where.items()}
        eu = (x - factor * raw["uncond"]) / sigma
        ec = (x - factor * raw["cond"]) / sigma
        if guided:
            es = (x - raw["concept"]) / sigma
            d_p = sld(eu, ec, es)
            plain = x - sigma * (eu + st["cond_scale"] * (ec - eu))
        else:
            d_p = ec - eu
        want = x - sigma * (eu + st["cond_scale"] * d_p)
        atol = 2e-5 * float(np.abs(want).max())     # float32 host vs float64 reference
        np.testing.assert_allclose(got, want, rtol=0, atol=atol, err_msg=f"step {i}")
        if guided:
            worst = max(worst, float(np.abs(want - plain).max()) / atol)
    if guided:
        assert worst > 100   # the guidance changed the result far beyond the tolerance


BATCHED = ([[0, 1, 2]], {"cond": (0, 0), "uncond": (0, 1), "concept": (0, 2)})
SEPARATE = ([[0, 1], [0]], {"cond": (0, 0), "uncond": (0, 1), "concept": (1, 0)})
WITH_REATTENTION = ([[0, 1, 2, 3]], {"cond": (0, 0), "uncond": (0, 1), "concept": (0, 3)})


def guided_steps(entry):
    return "\n".join(entry["outputs"]["11"]["text"])


@pytest.mark.parametrize("chain", [["sld", "pack"], ["pack", "sld"]], ids=["pack-after", "pack-before"])
def test_guidance_and_another_cond_batch_function_both_apply(comfy, tiny_checkpoint, chain):
    """The fail-open defect (pack after the guidance silently removed it) and the refusal
    (pack before): in both orders the other pack's function runs for the host's conds, the
    concept is batched into its UNet call, and the result matches the reference."""
    name = "compose_" + "_".join(chain)
    entry = run_ok(comfy, chain_graph(tiny_checkpoint, chain, name))
    steps, t = load_record(comfy, entry, name)
    check_trajectory(steps, t, BATCHED, FACTOR)
    assert f"{STEPS}/{STEPS} steps guided" in guided_steps(entry)


def test_both_orders_give_the_same_image_and_differ_from_each_alone(comfy, tiny_checkpoint):
    a = images(comfy, run_ok(comfy, chain_graph(tiny_checkpoint, ["sld", "pack"], "o1")))[0]
    b = images(comfy, run_ok(comfy, chain_graph(tiny_checkpoint, ["pack", "sld"], "o2")))[0]
    pack_only = images(comfy, run_ok(comfy, chain_graph(tiny_checkpoint, ["pack"], "o3")))[0]
    sld_only = images(comfy, run_ok(comfy, chain_graph(tiny_checkpoint, ["sld"], "o4")))[0]
    assert np.array_equal(a, b)
    assert np.abs(a - pack_only).max() > 3 and np.abs(a - sld_only).max() > 3


def test_references_hold_for_each_alone(comfy, tiny_checkpoint):
    entry = run_ok(comfy, chain_graph(tiny_checkpoint, ["sld"], "alone_sld"))
    check_trajectory(*load_record(comfy, entry, "alone_sld"), BATCHED, 1.0)
    entry = run_ok(comfy, chain_graph(tiny_checkpoint, ["pack"], "alone_pack"))
    check_trajectory(*load_record(comfy, entry, "alone_pack"), ([[0, 1]], {"cond": (0, 0), "uncond": (0, 1)}),
                     FACTOR, guided=False)


def test_a_function_that_bypasses_the_cond_batch_wrappers_gets_a_separate_concept_call(comfy, tiny_checkpoint):
    name = "compose_direct"
    entry = run_ok(comfy, chain_graph(tiny_checkpoint, ["sld", "pack-direct"], name))
    check_trajectory(*load_record(comfy, entry, name), SEPARATE, FACTOR)
    assert f"{STEPS}/{STEPS} steps guided" in guided_steps(entry)


@pytest.mark.parametrize("chain", [["sld", "reattention"], ["reattention", "sld"]], ids=["lra-after", "lra-before"])
def test_guidance_and_latent_reattention_on_one_model(comfy, tiny_checkpoint, chain):
    """SafeT2I's own re-attention (it sets the cond-batch function with the original prompt as a
    third conditioning) and guidance on one model: one UNet call of four chunks per step."""
    name = "compose_" + "_".join(chain)
    entry = run_ok(comfy, chain_graph(tiny_checkpoint, chain, name))
    steps, t = load_record(comfy, entry, name)
    check_trajectory(steps, t, WITH_REATTENTION, 1.0)
    sld_only = images(comfy, run_ok(comfy, chain_graph(tiny_checkpoint, ["sld"], name + "_sld")))[0]
    assert np.abs(images(comfy, entry)[0] - sld_only).max() > 3    # the re-attention acted too


@pytest.mark.parametrize("chain", [["dag", "pack"], ["pack", "dag"], ["dag", "pack-direct"], ["dag", "reattention"]],
                         ids=["pack-after", "pack-before", "direct", "reattention"])
def test_detect_and_guide_style_reads_the_concept_rows_wherever_they_run(comfy, tiny_checkpoint, chain):
    """The concept's index in the UNet batch differs (2 with the pack, 3 with re-attention,
    0 in a separate call); the attention capture follows it: every step guided."""
    name = "dag_" + "_".join(chain)
    entry = run_ok(comfy, chain_graph(tiny_checkpoint, chain, name))
    assert f"{STEPS}/{STEPS} steps guided" in guided_steps(entry), guided_steps(entry)
    rest = [c for c in chain if c != "dag"]
    other = images(comfy, run_ok(comfy, chain_graph(tiny_checkpoint, rest, name + "_alone")))[0]
    assert np.abs(images(comfy, entry)[0] - other).max() > 3


def test_guidance_kept_from_running_stops_the_run(comfy, tiny_checkpoint):
    """A node after ours that replaces the pre-CFG list: an error, never an unguided image."""
    entry = comfy.run(chain_graph(tiny_checkpoint, ["sld", "drop-pre-cfg"], "dropped"))
    assert entry["status"]["status_str"] == "error"
    assert "did not run in this step" in json.dumps(entry["status"]["messages"])
    assert not entry.get("outputs", {}).get("10")


@pytest.mark.parametrize("style", ["regular", "nested"])
def test_a_guider_that_bypasses_the_pre_cfg_functions_stops_the_run(comfy, tiny_checkpoint, style):
    """DualCFGGuider computes CFG from its own calc_cond_batch call and runs no pre-CFG function:
    before, the guidance was silently absent; now it is an error, never an unguided image.
    (PerpNegGuider runs the pre-CFG list itself and is guided.)"""
    g = chain_graph(tiny_checkpoint, ["sld"], "dualcfg")
    g["20"] = {"class_type": "DualCFGGuider", "inputs": {"model": ["30", 0], "cond1": ["2", 0], "cond2": ["15", 0],
                                                         "negative": ["3", 0], "cfg_conds": 7.0,
                                                         "cfg_cond2_negative": 7.0, "style": style}}
    g["21"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": 5}}
    g["22"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    g["23"] = {"class_type": "BasicScheduler", "inputs": {"model": ["30", 0], "scheduler": "normal", "steps": STEPS,
                                                          "denoise": 1.0}}
    g["7"] = {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["21", 0], "guider": ["20", 0],
                                                                "sampler": ["22", 0], "sigmas": ["23", 0],
                                                                "latent_image": ["4", 0]}}
    entry = comfy.run(g)
    assert entry["status"]["status_str"] == "error"
    assert "did not run in this step" in json.dumps(entry["status"]["messages"])
    assert not entry.get("outputs", {}).get("10")


def test_perp_neg_guider_runs_the_guidance(comfy, tiny_checkpoint):
    g = chain_graph(tiny_checkpoint, ["sld"], "perpneg")
    g["20"] = {"class_type": "PerpNegGuider", "inputs": {"model": ["30", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                         "empty_conditioning": ["3", 0], "cfg": 7.0, "neg_scale": 1.0}}
    g["21"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": 5}}
    g["22"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    g["23"] = {"class_type": "BasicScheduler", "inputs": {"model": ["30", 0], "scheduler": "normal", "steps": STEPS,
                                                          "denoise": 1.0}}
    g["7"] = {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["21", 0], "guider": ["20", 0],
                                                                "sampler": ["22", 0], "sigmas": ["23", 0],
                                                                "latent_image": ["4", 0]}}
    entry = run_ok(comfy, g)
    assert f"{STEPS}/{STEPS} steps guided" in guided_steps(entry)
    steps = json.loads(entry["outputs"]["31"]["text"][0])
    assert all(sorted(s["calls"][0]) == [0, 1, 2, 3] for s in steps)   # pos, neg, empty + the concept, one batch
