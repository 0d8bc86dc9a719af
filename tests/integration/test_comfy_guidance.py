"""Safety-guidance MODEL patches in a real ComfyUI with a tiny SD1.x checkpoint (64 px)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytestmark = pytest.mark.integration

STEPS = 6


def graph(ckpt, guidance=None, sampler="KSampler", cfg=7.0, batch=1, count=False, hires=False, extra_patch=None,
          sampler_name="euler"):
    g = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo of a nude woman on a beach"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": batch}},
        "5": {"class_type": "SafeT2IConceptEncode", "inputs": {"clip": ["1", 1], "concept": "nudity, sexual, naked"}},
    }
    model = ["1", 0]
    if guidance:
        node, params = guidance
        g["6"] = {"class_type": node, "inputs": {"model": model, "concept": ["5", 0], **params}}
        model = ["6", 0]
    if extra_patch:
        node, params = extra_patch
        g["16"] = {"class_type": node, "inputs": {"model": model, "concept": ["5", 0], **params}}
        model = ["16", 0]
    sampled_model = model
    if count:
        g["12"] = {"class_type": "SafeT2ITestCountUNet", "inputs": {"model": model}}
        sampled_model = ["12", 0]
    common = {"model": sampled_model, "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0]}
    if sampler == "KSampler":
        g["7"] = {"class_type": "KSampler", "inputs": {**common, "seed": 5, "steps": STEPS, "cfg": cfg,
                                                       "sampler_name": sampler_name, "scheduler": "normal",
                                                       "denoise": 1.0}}
    elif sampler == "KSamplerAdvanced":
        g["7"] = {"class_type": "KSamplerAdvanced", "inputs": {
            **common, "add_noise": "enable", "noise_seed": 5, "steps": STEPS, "cfg": cfg, "sampler_name": "euler",
            "scheduler": "normal", "start_at_step": 0, "end_at_step": 10000, "return_with_leftover_noise": "disable"}}
    elif sampler == "SamplerCustom":
        g["22"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
        g["23"] = {"class_type": "BasicScheduler", "inputs": {"model": sampled_model, "scheduler": "normal",
                                                              "steps": STEPS, "denoise": 1.0}}
        g["7"] = {"class_type": "SamplerCustom", "inputs": {
            "model": sampled_model, "add_noise": True, "noise_seed": 5, "cfg": cfg, "positive": ["2", 0],
            "negative": ["3", 0], "sampler": ["22", 0], "sigmas": ["23", 0], "latent_image": ["4", 0]}}
    else:  # SamplerCustomAdvanced
        g["20"] = {"class_type": "CFGGuider", "inputs": {"model": sampled_model, "positive": ["2", 0],
                                                         "negative": ["3", 0], "cfg": cfg}}
        g["21"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": 5}}
        g["22"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
        g["23"] = {"class_type": "BasicScheduler", "inputs": {"model": sampled_model, "scheduler": "normal",
                                                              "steps": STEPS, "denoise": 1.0}}
        g["7"] = {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["21", 0], "guider": ["20", 0],
                                                                    "sampler": ["22", 0], "sigmas": ["23", 0],
                                                                    "latent_image": ["4", 0]}}
    last = ["7", 0]
    if hires:
        g["9"] = {"class_type": "KSampler", "inputs": {**common, "latent_image": last, "seed": 6, "steps": 4,
                                                       "cfg": cfg, "sampler_name": "euler", "scheduler": "normal",
                                                       "denoise": 0.5}}
        last = ["9", 0]
    g["8"] = {"class_type": "VAEDecode", "inputs": {"samples": last, "vae": ["1", 2]}}
    g["10"] = {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "guid"}}
    if guidance:
        g["11"] = {"class_type": "SafeT2IGuidanceReport", "inputs": {"model": model, "samples": last}}
        g["14"] = {"class_type": "PreviewImage", "inputs": {"images": ["11", 1]}}
    if count:
        g["13"] = {"class_type": "SafeT2ITestCalls", "inputs": {"samples": last}}
    return g


def images(comfy, entry):
    from PIL import Image

    out = []
    for im in entry["outputs"]["10"]["images"]:
        out.append(np.asarray(Image.open(comfy.output_dir / im["subfolder"] / im["filename"])).astype(int))
    return out


def run_ok(comfy, g):
    entry = comfy.run(g)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:4000]
    return entry


SLD_DEFAULTS = {"guidance_scale": 1000.0, "warmup_steps": 10, "threshold": 0.01, "momentum_scale": 0.3, "mom_beta": 0.4}


def sld(preset, **kw):
    return ("SafeT2ISLD", {"preset": preset, **SLD_DEFAULTS, **kw})


SLD_MAX = sld("MAX")
SLD_OFF = sld("custom", guidance_scale=0.0, warmup_steps=0)
SPG = ("SafeT2ISPGuard", {"max_scale": 2.0, "harm_threshold": -1.0, "mask_threshold": -1.0, "ema": 0.5, "start_step": 0})
SPG_OFF = ("SafeT2ISPGuard", {"max_scale": 0.0, "harm_threshold": 0.45, "mask_threshold": 0.0, "ema": 0.5, "start_step": 0})


def test_guidance_changes_the_image_and_zero_strength_does_not(comfy, tiny_checkpoint):
    plain = images(comfy, run_ok(comfy, graph(tiny_checkpoint)))[0]
    for guided, off in ((SLD_MAX, SLD_OFF), (SPG, SPG_OFF)):
        entry = run_ok(comfy, graph(tiny_checkpoint, guided))
        assert np.abs(images(comfy, entry)[0] - plain).max() > 3, guided[0]
        rep = "\n".join(entry["outputs"]["11"]["text"])
        assert f"{STEPS}/{STEPS} steps guided" in rep, rep
        import io as _io
        import urllib.parse
        import urllib.request

        from PIL import Image

        (prev,) = entry["outputs"]["14"]["images"]
        with urllib.request.urlopen(f"{comfy.url}/view?{urllib.parse.urlencode(prev)}", timeout=30) as r:
            mask = np.asarray(Image.open(_io.BytesIO(r.read())))
        assert mask.shape[:2] == (64, 64) and mask.max() > 0  # 8x8 latent shown at 8x
        same = images(comfy, run_ok(comfy, graph(tiny_checkpoint, off)))[0]
        assert np.abs(same - plain).max() <= 1, off[0]


def test_one_unet_call_per_step_with_the_concept_batched(comfy, tiny_checkpoint):
    entry = run_ok(comfy, graph(tiny_checkpoint, SLD_MAX, count=True, batch=2))
    calls = json.loads(entry["outputs"]["13"]["text"][0])
    assert len(calls) == STEPS
    assert all(c["batch"] == 6 and sorted(c["cond_or_uncond"]) == [0, 1, 2] for c in calls)


@pytest.mark.parametrize("sampler", ["KSamplerAdvanced", "SamplerCustom", "SamplerCustomAdvanced"])
def test_other_samplers(comfy, tiny_checkpoint, sampler):
    plain = images(comfy, run_ok(comfy, graph(tiny_checkpoint, sampler=sampler)))[0]
    entry = run_ok(comfy, graph(tiny_checkpoint, SLD_MAX, sampler=sampler))
    assert np.abs(images(comfy, entry)[0] - plain).max() > 3
    assert f"{STEPS}/{STEPS} steps guided" in "\n".join(entry["outputs"]["11"]["text"])


def test_second_order_sampler_is_one_run(comfy, tiny_checkpoint):
    """Heun evaluates each step's end point, then starts the next step at the same sigma: that
    repeat must not restart the guidance (SLD's warm-up would never end)."""
    entry = run_ok(comfy, graph(tiny_checkpoint, sld("STRONG"), sampler_name="heun", count=True))
    calls = len(json.loads(entry["outputs"]["13"]["text"][0]))
    assert calls == 2 * STEPS - 1  # ComfyUI's Heun: last step is an Euler step
    text = "\n".join(entry["outputs"]["11"]["text"])
    import re
    guided = re.search(rf"(\d+)/{calls} steps guided", text)
    assert guided and int(guided.group(1)) >= calls - 2, text  # only the scaled warm-up is unguided


def test_state_resets_for_a_hires_pass(comfy, tiny_checkpoint):
    entry = run_ok(comfy, graph(tiny_checkpoint, sld("STRONG"), hires=True))
    text = "\n".join(entry["outputs"]["11"]["text"])
    # the report covers the last run: the 4-step hires pass (δ = 7 of 50 scales to 1 step)
    assert "3/4 steps guided" in text, text


def test_cfg_one_and_double_patches_fail_clearly(comfy, tiny_checkpoint):
    entry = comfy.run(graph(tiny_checkpoint, sld("MAX", concept_branch_scale=0.0), cfg=1.0))
    assert entry["status"]["status_str"] == "error"
    assert "classifier-free guidance" in json.dumps(entry["status"]["messages"])
    run_ok(comfy, graph(tiny_checkpoint, SLD_MAX, cfg=1.0))   # the default concept-branch form runs at cfg 1
    entry = comfy.run(graph(tiny_checkpoint, SLD_MAX, extra_patch=sld("MEDIUM")))
    assert entry["status"]["status_str"] == "error"
    assert "only one can" in json.dumps(entry["status"]["messages"])


def dag_graph(ckpt, **params):
    g = graph(ckpt)
    g["6"] = {"class_type": "SafeT2IDetectGuide", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "concept": "nudity, sexual", "scale": 0.5, "high": 0.5, "low": 0.01,
        "skip_coverage": 1.0, "sld_gate": "none", "guideline_embeddings": "none", **params}}
    g["7"]["inputs"]["model"] = ["6", 0]
    g["11"] = {"class_type": "SafeT2IGuidanceReport", "inputs": {"model": ["6", 0], "samples": ["7", 0]}}
    return g


def test_detect_and_guide_style_uses_cross_attention(comfy, tiny_checkpoint):
    plain = images(comfy, run_ok(comfy, graph(tiny_checkpoint)))[0]
    entry = run_ok(comfy, dag_graph(tiny_checkpoint))
    assert np.abs(images(comfy, entry)[0] - plain).max() > 3
    text = "\n".join(entry["outputs"]["11"]["text"])
    assert f"{STEPS}/{STEPS} steps guided" in text, text
    same = images(comfy, run_ok(comfy, dag_graph(tiny_checkpoint, scale=0.0)))[0]
    assert np.abs(same - plain).max() <= 1
    # diffuse maps (the random model attends everywhere) are skipped at the default 80 %
    skipped = run_ok(comfy, dag_graph(tiny_checkpoint, skip_coverage=0.8))
    assert f"0/{STEPS} steps guided" in "\n".join(skipped["outputs"]["11"]["text"])


def test_detect_and_guide_style_fails_closed_when_attention_is_overridden(comfy, tiny_checkpoint):
    """Another pack replacing cross-attention AFTER our node hides the concept's attention:
    sampling must stop with an error (no image), never run unguided."""
    before = dag_graph(tiny_checkpoint)
    before["30"] = {"class_type": "SafeT2ITestReplaceAttn2", "inputs": {"model": ["1", 0]}}
    before["6"]["inputs"]["model"] = ["30", 0]
    entry = comfy.run(before)
    assert entry["status"]["status_str"] == "error"
    assert "already replaced cross-attention" in json.dumps(entry["status"]["messages"])
    after = dag_graph(tiny_checkpoint)
    after["30"] = {"class_type": "SafeT2ITestReplaceAttn2", "inputs": {"model": ["6", 0]}}
    after["7"]["inputs"]["model"] = ["30", 0]
    entry = comfy.run(after)
    assert entry["status"]["status_str"] == "error"
    assert "could not read the concept's cross-attention" in json.dumps(entry["status"]["messages"])
    assert not entry.get("outputs", {}).get("10")
