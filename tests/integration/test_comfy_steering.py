"""SAFREE-style prompt steering node in a real ComfyUI (tiny SD1.x checkpoint, random CLIP-L)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from .test_comfy_guidance import images, run_ok

pytestmark = pytest.mark.integration


def steer_graph(ckpt, text, alpha=0.01, self_validating=True, as_negative=False):
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "SafeT2IPromptSteer", "inputs": {
            "clip": ["1", 1], "text": text, "concepts": "nudity", "custom_concepts": "", "alpha": alpha,
            "order": "code", "self_validating": self_validating, "concepts_as_negative": as_negative}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": text}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["2", 1],
                                                   "latent_image": ["4", 0], "seed": 5, "steps": 6, "cfg": 7.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "steer"}},
        "11": {"class_type": "PreviewAny", "inputs": {"source": ["2", 2]}},
    }


def report(entry):
    return json.loads(entry["outputs"]["11"]["text"][0])


def test_steering_reports_triggers_and_changes_the_image(comfy, tiny_checkpoint):
    text = "a photo of a nude woman on a sunny beach, erotic art"
    strict = run_ok(comfy, steer_graph(tiny_checkpoint, text, alpha=10.0))   # no trigger possible
    rep = report(strict)
    assert rep["steered_fraction"] == 0 and all(not c["triggers"] for c in rep["chunks"])
    base = images(comfy, strict)[0]
    steered = run_ok(comfy, steer_graph(tiny_checkpoint, text, alpha=0.01, self_validating=False))
    rep = report(steered)
    assert rep["steered_fraction"] == 1.0 and any(c["triggers"] for c in rep["chunks"])
    assert np.abs(images(comfy, steered)[0] - base).max() > 3
    assert "trigger positions" in "\n".join(steered["outputs"]["2"]["text"])


def test_long_prompts_are_steered_per_chunk(comfy, tiny_checkpoint):
    text = ", ".join(["a nude figure drawing in a quiet museum hall"] * 12)  # > 77 tokens: several chunks
    entry = run_ok(comfy, steer_graph(tiny_checkpoint, text, self_validating=False))
    chunks = report(entry)["chunks"]
    assert len(chunks) >= 2 and [c["chunk"] for c in chunks] == list(range(len(chunks)))


def test_concepts_as_negative_runs(comfy, tiny_checkpoint):
    entry = run_ok(comfy, steer_graph(tiny_checkpoint, "a cat", as_negative=True))
    assert report(entry)["concepts"] == 17


def test_latent_reattention_patch(comfy, tiny_checkpoint):
    text = "a photo of a nude woman on a sunny beach, erotic art"

    def with_lra(channels, s=0.2):
        g = steer_graph(tiny_checkpoint, text, self_validating=False)
        g["12"] = {"class_type": "SafeT2ILatentReattention", "inputs": {
            "model": ["1", 0], "original": ["3", 0], "s1": s, "s2": s, "window": 1, "channels": channels}}
        g["7"]["inputs"]["model"] = ["12", 0]
        return g

    base = images(comfy, run_ok(comfy, steer_graph(tiny_checkpoint, text, self_validating=False)))[0]
    # The tiny UNet has only 320-channel skips (no FreeU stages): 'auto' changes nothing ...
    auto = images(comfy, run_ok(comfy, with_lra("auto")))[0]
    assert np.abs(auto - base).max() <= 1
    # ... filtering its 320-channel skips does; s = 1 is the identity.
    filtered = images(comfy, run_ok(comfy, with_lra("320:0.2")))[0]
    assert np.abs(filtered - base).max() > 3
    identity = images(comfy, run_ok(comfy, with_lra("320:1.0", s=1.0)))[0]
    assert np.abs(identity - base).max() <= 1


@pytest.mark.parametrize("last_layer", [-1, -2], ids=["last", "penultimate"])
def test_short_leave_one_out_encodes_match_comfyui(comfy, tiny_checkpoint, last_layer):
    """The leave-one-out pass encodes each variant only up to its EOS token (CLIP is causal);
    the steered conditioning must equal the one from ComfyUI's own full-length encodes."""
    text = "a photo of a nude woman on a sunny beach, erotic art"
    entry = run_ok(comfy, {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_checkpoint}},
        "2": {"class_type": "SafeT2ITestSteerPaths", "inputs": {"clip": ["1", 1], "text": text,
                                                                "last_layer": last_layer}},
    })
    out = json.loads(entry["outputs"]["2"]["text"][0])
    assert out["short_lengths"], "the short encode path was not used"
    assert all(n < 77 for n in out["short_lengths"])
    assert out["report_short"] == out["report_full"]
    assert any(c["triggers"] for c in out["report_full"]["chunks"])
    assert out["max_diff"] <= 1e-4 * max(1.0, out["scale"])
