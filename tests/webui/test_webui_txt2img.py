"""Every SafeT2I layer through a real webui's txt2img API (random-weight SD1.5, 64 px, 2 steps).

The model is random, so nothing is judged on what the pictures show: each test checks what the
layer reports (infotext, response fields), that it changed the sampled pixels where it should
(same seed, the layer off as the baseline), and that the output filter ran on every image.
The filter's detections are checked on a photograph that a test-only extension puts in place
of the generated picture before the filter's hook (``server.FACE_EXTENSION``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from .sd15_checkpoint import clip_shapes
from .server import FACE_MARKER, decode, encode_png

pytestmark = [pytest.mark.webui, pytest.mark.slow]

DEFAULT_CONCEPT = ("an image showing hate, harassment, violence, suffering, humiliation, harm, suicide, sexual, "
                   "nudity, bodily fluids, blood, obscene gestures, illegal activity, drug use, theft, vandalism, "
                   "weapons, child abuse, brutality, cruelty")
#: The script's positional arguments, in the documented order (docs/a1111.md, a1111-steering-lora.md).
ARG_NAMES = ("guidance_enabled", "guidance_method", "guidance_preset", "guidance_concept",
             "filter_enabled", "filter_policy", "filter_action",
             "steering_enabled", "steering_concepts", "steering_custom", "steering_alpha", "steering_order",
             "steering_self_validating", "lora_enabled", "lora_file", "lora_strength", "lora_allow_partial",
             "weights_enabled", "weights_file", "weights_part",
             "steering_concepts_as_negative", "steering_configuration")
DEFAULTS = dict(zip(ARG_NAMES, (False, "SLD", "MEDIUM", DEFAULT_CONCEPT, True, "strict-5", "blur",
                                False, "nudity", "", 0.01, "code", True, False, "None", 1.0, False,
                                False, "None", "auto", False, "custom settings")))


def args(**changed) -> list:
    unknown = set(changed) - set(DEFAULTS)
    assert not unknown, unknown
    return [changed.get(k, v) for k, v in DEFAULTS.items()]


#: One ``key: value`` pair of an infotext line, as the webui writes it (values with a comma,
#: colon or quote are JSON-quoted).
PAIR = re.compile(r'\s*([\w][\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def params(resp: dict, i: int = 0) -> dict[str, str]:
    """The ``SafeT2I …`` fields of image i's infotext (the webui's own infotext line)."""
    line = resp["info"]["infotexts"][i].splitlines()[-1]
    out = {}
    for key, value in PAIR.findall(line):
        if key.startswith("SafeT2I"):
            out[key] = json.loads(value) if value.startswith('"') else value
    return out


@pytest.fixture(scope="module")
def baseline(webui):
    """Every layer off but the (default) filter: the pixels the layers are compared with."""
    r = webui.txt2img(args())
    assert params(r)["SafeT2I verdict"] == "safe", params(r)
    return r["pixels"][0]


def changed(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


# --------------------------------------------------------------------------- registration


def test_script_is_registered_with_its_documented_arguments(webui):
    info = [s for s in webui.get("/sdapi/v1/script-info") if s["name"] == "safet2i"]
    assert sorted(s["is_img2img"] for s in info) == [False, True], info
    for s in info:
        assert s["is_alwayson"] and len(s["args"]) == len(ARG_NAMES), s
        labels = [a["label"] for a in s["args"]]
        assert labels[0].startswith("Safety guidance") and labels[4] == "Output filter", labels
    errors = [ln for ln in webui.log_text().splitlines()
              if ("Error loading script" in ln or "Error running" in ln) and "safet2i" in ln.lower()]
    assert not errors, errors


# --------------------------------------------------------------------------- output filter


def test_filter_runs_on_every_image_without_alwayson_scripts(webui):
    r = webui.txt2img(None, batch_size=2)
    assert len(r["pixels"]) == 2
    for i in range(2):
        p = params(r, i)
        assert p["SafeT2I filter"] == "strict-5 blur" and p["SafeT2I verdict"] == "safe", p
    assert r["info"]["extra_generation_params"]["SafeT2I filter"] == "strict-5 blur"


def test_filter_censors_a_face_in_the_output_and_pass_only_flags_it(webui):
    import skimage.data  # noqa: PLC0415

    photo = skimage.data.astronaut()
    prompt = f"{FACE_MARKER} a portrait"
    kept = webui.txt2img(args(filter_policy="face-only", filter_action="pass"), prompt=prompt)
    p = params(kept)
    assert p["SafeT2I verdict"].startswith("flagged (FACE_FEMALE; cost 0.8"), p
    assert kept["pixels"][0].shape == photo.shape and changed(kept["pixels"][0], photo) == 0
    blurred = webui.txt2img(args(filter_policy="face-only", filter_action="fill"), prompt=prompt)
    p = params(blurred)
    assert p["SafeT2I filter"] == "face-only fill" and p["SafeT2I verdict"].startswith("censored (FACE_FEMALE"), p
    assert blurred["pixels"][0].shape == photo.shape and changed(blurred["pixels"][0], photo) > 100
    # strict-5 does not look at faces: the same picture passes untouched
    plain = webui.txt2img(args(), prompt=prompt)
    assert params(plain)["SafeT2I verdict"] == "safe" and changed(plain["pixels"][0], photo) == 0


def test_filter_off_is_explicit_in_the_infotext(webui, baseline):
    r = webui.txt2img(args(filter_enabled=False))
    p = params(r)
    assert p == {"SafeT2I filter": "off"}, p
    assert changed(r["pixels"][0], baseline) == 0


def test_filter_route_is_served_with_api(webui):
    import skimage.data  # noqa: PLC0415

    code, out = webui.request("POST", "/safet2i/filter", {"image": encode_png(skimage.data.astronaut()),
                                                           "policy": "face-only", "action": "blur"})
    assert code == 200, out
    assert out["verdict"] == "censored" and out["labels"] == ["FACE_FEMALE"] and out["cost"] > 0.5, out
    assert decode(out["image"]).shape == (512, 512, 3)
    code, out = webui.request("POST", "/safet2i/filter", {"image": "not base64!", "policy": "face-only"})
    assert code == 422, out


SETTINGS = {"safet2i_filter_default": True, "safet2i_filter_policy": "strict-5", "safet2i_filter_action": "blur",
            "safet2i_previews": "filter"}


def saved_settings(webui) -> dict:
    """SafeT2I's settings as the webui saved them (its ``config.json``; GET /sdapi/v1/options
    does not list extension settings: its response model is built before extensions add them)."""
    path = webui.data / "config.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    return {k: saved.get(k, v) for k, v in SETTINGS.items()}


def test_filter_settings_cannot_be_changed_through_the_options_route(webui):
    """Forge's route does not honour ``restrict_api``; the extension drops its keys there (settings.py)."""
    before = saved_settings(webui)
    try:
        code, out = webui.request("POST", "/sdapi/v1/options", {
            "safet2i_filter_default": False, "safet2i_filter_policy": "face-only", "safet2i_filter_action": "pass",
            "safet2i_previews": "hide", "jpeg_quality": 81})      # one unrestricted setting: the route ran
        assert code == 200, out
        assert json.loads((webui.data / "config.json").read_text())["jpeg_quality"] == 81
        assert saved_settings(webui) == before
    finally:
        webui.request("POST", "/sdapi/v1/options", {**before, "jpeg_quality": 80})   # where the route changed them


def test_override_settings_cannot_switch_the_filter_off(webui):
    r = webui.txt2img(None, override_settings={"safet2i_filter_default": False, "safet2i_filter_action": "pass"})
    assert params(r)["SafeT2I filter"] == "strict-5 blur" and params(r)["SafeT2I verdict"] == "safe"
    assert webui.get("/sdapi/v1/options").get("safet2i_filter_default", True) is True


# --------------------------------------------------------------------------- guidance


@pytest.mark.parametrize(("method", "preset", "shown"), [("SLD", "STRONG", "SLD STRONG"),
                                                          ("SP-Guard-style", "MEDIUM", "SP-Guard-style")])
def test_guidance_changes_the_sampling_and_reports_itself(webui, baseline, method, preset, shown):
    r = webui.txt2img(args(guidance_enabled=True, guidance_method=method, guidance_preset=preset))
    p = params(r)
    assert p["SafeT2I guidance"] == shown and p["SafeT2I verdict"] == "safe", p
    assert changed(r["pixels"][0], baseline) > 0


def test_guidance_with_a_custom_concept_is_in_the_infotext(webui):
    r = webui.txt2img(args(guidance_enabled=True, guidance_concept="violence, blood"))
    p = params(r)
    assert p["SafeT2I guidance"] == "SLD MEDIUM" and p["SafeT2I concept"] == "violence, blood", p
    assert p["SafeT2I verdict"] == "safe", p


# --------------------------------------------------------------------------- steering


def test_steering_steers_every_model_call_without_the_window(webui, baseline):
    r = webui.txt2img(args(steering_enabled=True, steering_self_validating=False))
    p = params(r)
    assert p["SafeT2I steering"] == "nudity alpha=0.01 order=code svf=off", p
    report = p["SafeT2I steering report"]
    assert "nude" in report and report.endswith("(steered 2 of 2 model calls)"), report
    assert p["SafeT2I verdict"] == "safe", p
    assert changed(r["pixels"][0], baseline) > 0


def test_paper_configuration_puts_the_concepts_after_the_negative_prompt(webui, baseline):
    """SAFREE (paper configuration): the webui's own infotext shows the concept list after the
    request's negative prompt, the configuration key, and the steering ran (the report)."""
    nudity = json.loads((Path(__file__).resolve().parents[2] / "safet2i" / "data" / "concepts" / "nudity.json")
                        .read_text())["concepts"]
    r = webui.txt2img(args(steering_enabled=True, steering_configuration="SAFREE (paper configuration)"),
                      negative_prompt="blurry")
    p = params(r)
    assert p["SafeT2I steering configuration"] == "SAFREE (paper configuration)", p
    assert "steered" in p["SafeT2I steering report"], p
    lines = r["info"]["infotexts"][0].splitlines()
    assert "Negative prompt: blurry, " + ", ".join(nudity) in lines, lines
    assert changed(r["pixels"][0], baseline) > 0


# --------------------------------------------------------------------------- model layer


SD1_ATTN1 = ([(f"down_blocks.{i}.attentions.{j}", c) for i, c in enumerate((320, 640, 1280)) for j in range(2)]
             + [("mid_block.attentions.0", 1280)]
             + [(f"up_blocks.{i}.attentions.{j}", c) for i, c in zip((1, 2, 3), (1280, 640, 320)) for j in range(3)])


def duo_lora(path, rank=4, seed=7):
    """DUO's released layout (diffusers ``unet.….attn1.to_q.lora.down.weight``, no alpha): the
    webui's own loader ignores these keys, SafeT2I converts them."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for block, c in SD1_ATTN1:
        for proj in ("to_q", "to_k", "to_v", "to_out.0"):
            k = f"unet.{block}.transformer_blocks.0.attn1.{proj}"
            sd[f"{k}.lora.down.weight"] = torch.randn(rank, c, generator=g) * 0.1
            sd[f"{k}.lora.up.weight"] = torch.randn(c, rank, generator=g) * 0.1
    save_file(sd, str(path))
    return sd


def test_safety_lora_in_release_layout_is_converted_loaded_and_verified(webui, baseline):
    duo_lora(webui.data / "models" / "safety_models" / "duo_test.safetensors")
    r = webui.txt2img(args(lora_enabled=True, lora_file="safety_models/duo_test.safetensors", lora_strength=1.0))
    p = params(r)
    assert p["SafeT2I LoRA"] == "safety_models/duo_test.safetensors" and p["SafeT2I LoRA strength"] == "1", p
    cov = p["SafeT2I LoRA coverage"]
    assert cov.startswith("64/64 sd1 sha256 ") and "converted to kohya" in cov and cov.endswith("loaded 64/64"), cov
    assert p["SafeT2I verdict"] == "safe", p
    converted = list((webui.data / "models" / "Lora" / "safet2i-converted").glob("safet2i-duo_test-*-sd1.safetensors"))
    assert len(converted) == 1, converted
    assert changed(r["pixels"][0], baseline) > 0
    # the prompt the user sees is unchanged (the tag is added to the batch's prompts only)
    assert r["info"]["prompt"] == "a photo of a nude person"


def test_full_text_encoder_weights_replace_the_encoder_for_the_job(webui, baseline):
    """Forge registers the token embedding under two names (one Parameter): both count as replaced."""
    g = torch.Generator().manual_seed(11)
    te = {}
    for key, shape in clip_shapes():
        w = torch.randn(shape, generator=g) * (0.02 if "embedding" in key else 0.5 / max(1, shape[-1]) ** 0.5)
        te[key] = (torch.ones(shape) if ("norm" in key and key.endswith("weight")) else
                   torch.zeros(shape) if len(shape) == 1 else w).to(torch.float16).contiguous()
    save_file(te, str(webui.data / "models" / "safety_models" / "advunlearn_like.safetensors"))
    r = webui.txt2img(args(weights_enabled=True, weights_file="safety_models/advunlearn_like.safetensors"))
    p = params(r)
    assert p["SafeT2I weights"].startswith("safety_models/advunlearn_like.safetensors [sha256 "), p
    assert "text_encoder" in p["SafeT2I weights"] and p["SafeT2I weights"].endswith("verified]"), p
    assert p["SafeT2I verdict"] == "safe", p
    assert changed(r["pixels"][0], baseline) > 0
    # the job's weights are gone afterwards: the same request without them gives the baseline
    again = webui.txt2img(args())
    assert changed(again["pixels"][0], baseline) == 0


# --------------------------------------------------------------------------- failing closed


@pytest.mark.parametrize(("changes", "reason"), [
    ({"filter_policy": "nope"}, "unknown filter policy 'nope'"),
    ({"guidance_enabled": True, "guidance_method": "Detect-and-Guide-style"}, "Detect-and-Guide-style"),
    ({"lora_enabled": True, "lora_file": "safety_models/../../escape.safetensors"}, "refused"),
])
def test_a_bad_request_blocks_the_images(webui, baseline, changes, reason):
    r = webui.txt2img(args(**changes))
    verdict = params(r)["SafeT2I verdict"]
    assert verdict.startswith("blocked (") and reason in verdict, verdict
    assert changed(r["pixels"][0], baseline) > 0
