"""Safety guidance on Lumina 2 (NextDiT, the architecture of the Z-Image family) and HunyuanVideo
in a real ComfyUI: tiny random models of ComfyUI's own classes (``comfy_pack_tiny_more.py``),
random conditioning for prompt, negative and concept, the family's flow sampling, and every step
checked against the float64 reference of ``test_comfy_guidance_flow.py``. Their text encoders are
not built (guidance does not read text; steering and LoRAs on these families are not claimed).
The output filter works on any decoded IMAGE, frames included (``test_comfy_video_filter.py``).
"""

from __future__ import annotations

import numpy as np
import pytest

from .test_comfy_guidance import run_ok
from .test_comfy_guidance_compose import SLD, load_record
from .test_comfy_guidance_flow import check, flow_reference

pytestmark = pytest.mark.integration

STEPS = 4
BATCHED = (None, {"cond": (None, 0), "uncond": (None, 1), "concept": (None, 2)})
LATENTS = {
    "lumina2": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    "hunyuan_video": {"class_type": "EmptyHunyuanLatentVideo",
                      "inputs": {"width": 32, "height": 32, "length": 5, "batch_size": 1}},
}
SAMPLING = {"lumina2": {"class_type": "ModelSamplingAuraFlow", "inputs": {"shift": 6.0}},
            "hunyuan_video": {"class_type": "ModelSamplingSD3", "inputs": {"shift": 7.0}}}


def graph(family, name, sld=None):
    g = {
        "m": {"class_type": "SafeT2ITestTinyDiT", "inputs": {"family": family, "seed": 0}},
        "pos": {"class_type": "SafeT2ITestRandomCond", "inputs": {"family": family, "tokens": 8, "seed": 1}},
        "neg": {"class_type": "SafeT2ITestRandomCond", "inputs": {"family": family, "tokens": 8, "seed": 2}},
        "concept": {"class_type": "SafeT2ITestRandomCond", "inputs": {"family": family, "tokens": 8, "seed": 3}},
        "lat": LATENTS[family],
        "ms": {"class_type": SAMPLING[family]["class_type"], "inputs": {"model": ["m", 0], **SAMPLING[family]["inputs"]}},
    }
    model = ["ms", 0]
    if sld is not None:
        g["guide"] = {"class_type": "SafeT2ISLD", "inputs": {"model": model, "concept": ["concept", 0], "preset": "custom",
                                                             **sld}}
        model = ["guide", 0]
    g["rec"] = {"class_type": "SafeT2ITestRecord", "inputs": {"model": model, "name": name}}
    g["ks"] = {"class_type": "KSampler", "inputs": {
        "model": ["rec", 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["lat", 0], "seed": 5,
        "steps": STEPS, "cfg": 4.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}}
    g["31"] = {"class_type": "SafeT2ITestSaveRecord", "inputs": {"samples": ["ks", 0], "name": name}}
    return g


@pytest.mark.parametrize("family", ["lumina2", "hunyuan_video"])
def test_sld_matches_the_float64_reference_and_zero_strength_is_plain(comfy, family):
    entry = run_ok(comfy, graph(family, f"more_{family}", SLD))
    steps, t = load_record(comfy, entry, f"more_{family}")
    check(flow_reference(steps, t, *BATCHED, n_steps=STEPS), worst_at_least=20)
    _, plain = load_record(comfy, run_ok(comfy, graph(family, f"more_{family}_plain")), f"more_{family}_plain")
    _, off = load_record(comfy, run_ok(comfy, graph(family, f"more_{family}_off", {**SLD, "guidance_scale": 0.0})),
                         f"more_{family}_off")
    last = f"{STEPS - 1}/denoised"
    assert np.array_equal(plain[last], off[last])
    assert not np.array_equal(plain[last], t[last])
