"""SAFREE-style prompt steering with ComfyUI's real SD3, Flux, Wan and Qwen-Image text encoders.

The helper ``comfy_tiny_family_steer.py`` runs under ``COMFYUI_PYTHON``, builds ComfyUI's own CLIP
objects (``SD3ClipModel``, ``FluxClipModel``, ``WanT5Model``, ``QwenImageTEModel`` with their real
tokenizers; tiny random text models through ``model_options``), runs ``SafeT2IPromptSteer.execute``
and an independent float64 reference (each sub-model alone, every leave-one-out variant encoded on
its own at full length, the family's pooled row, trigger rule and projections written in the
helper), and prints the measurements asserted here.

Tolerance: the node encodes the variants in batches (CLIP: its packed short encode), the reference
one by one, so their float32 pooled rows can differ in the last bits, which ``P_M`` amplifies; the
bound is 1e-4 of the rows' scale (the core's own check of a packed encode). Everything that is not a
steered trigger row (other rows, SD3's zero padding channels, Wan's zeroed padding rows, the
pooled output, no-trigger prompts) must be bit-identical.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from .conftest import _comfy_env

pytestmark = pytest.mark.integration
HELPER = Path(__file__).with_name("comfy_tiny_family_steer.py")


@pytest.fixture(scope="module")
def measured():
    path, python = _comfy_env()
    out = subprocess.run([python, str(HELPER), path], cwd=path, capture_output=True, text=True, timeout=900,
                         env=dict(os.environ, SAFET2I_SKIP_INSTALL="1", OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def close(d, rel=1e-4):
    assert d["shape"][0] == d["shape"][1], d
    assert d["max"] <= rel * max(1.0, d["scale"]), d
    return True


def same(d):
    assert d["shape"][0] == d["shape"][1] and d["equal"], d
    return True


def report_matches(report, ref, encoder=None):
    """The node's trigger rows per chunk are the reference's, and at least one chunk has triggers."""
    got = [c["triggers"] for c in report if encoder is None or c["encoder"] == encoder]
    want = [c["triggers"] for c in ref]
    assert got == want, (got, want)
    assert any(want), "the reference has no trigger: the comparison would be vacuous"
    words = [c["trigger_tokens"] for c in report if encoder is None or c["encoder"] == encoder]
    assert words == [c["words_at"] for c in ref]
    return True


def no_trigger_is_bit_identical(r):
    assert r["triggers"] and not any(r["triggers"]) and r["n_entries"] == 1 and r["entries"] == [{}]
    assert same(r["cond"]) and all(same(d) for d in r["extra"].values())
    return True


def test_no_warning_and_families_recognised(measured):
    assert measured["warnings"] == []
    assert [measured[k]["family"] for k in ("sd3", "flux", "wan", "qwen_image")] == ["sd3", "flux", "wan", "qwen_image"]


@pytest.mark.parametrize("length", ["short", "long"])
def test_sd3_steers_clip_l_clip_g_and_t5_each_in_its_own_subspace(measured, length):
    r = measured["sd3"][length]
    # ComfyUI's layout: [CLIP-L | CLIP-G | zeros to 4096] rows (77 per chunk), then the T5 rows.
    assert same(r["cond_layout"])
    assert r["clip_rows"] == 77 * r["chunks"]["l"] and r["chunks"]["l"] == r["chunks"]["g"]
    if length == "long":
        assert r["chunks"]["l"] == 2 and r["chunks"]["t5xxl"] == 1    # CLIP per 77-token chunk, T5 one sequence
    for key in ("l", "g", "t5xxl"):
        assert report_matches(r["report"], r["ref"][key], key)
        assert r["changed"][key] > 0.1
        assert r["untouched"][key]
    assert close(r["steered_l"]) and close(r["steered_g"]) and close(r["steered_t5"])
    assert same(r["padding_channels"]) and r["padding_channels"]["scale"] == 0.0
    assert same(r["pooled"]) and r["entries"] == [{}]
    assert no_trigger_is_bit_identical(r["no_trigger"])


def test_flux_steers_the_t5_rows_and_keeps_the_clip_l_pooled_vector(measured):
    r = measured["flux"]
    assert r["t5_length"] == 256 and same(r["cond_is_t5"])
    assert report_matches(r["report"], r["ref"])
    assert close(r["steered"]) and r["changed"]["max"] > 0.1 and r["untouched"]
    assert same(r["pooled"]) and same(r["pooled_is_clip_l"]) and r["entries"] == [{}]
    assert no_trigger_is_bit_identical(r["no_trigger"])


def test_wan_steers_the_umt5_rows_and_leaves_the_zeroed_padding(measured):
    r = measured["wan"]
    assert r["length"] == 512 and same(r["cond_is_umt5"]) and r["padding_zero"]
    assert report_matches(r["report"], r["ref"])
    assert max(t for c in r["report"] for t in c["triggers"]) < r["eos"]   # prompt tokens only, never </s>
    assert close(r["steered"]) and r["changed"]["max"] > 0.1 and r["untouched"] and r["padding_after"]
    assert no_trigger_is_bit_identical(r["no_trigger"])


def test_wan_self_validating_window_matches_the_reference_beta_and_t_prime(measured):
    r = measured["wan"]["window"]
    ref = measured["wan"]["ref"][0]
    (chunk,) = r["report"]
    assert abs(chunk["beta"] - ref["beta"]) <= 1e-4 and chunk["t_prime"] == ref["t_prime"]
    bound = (ref["t_prime"] + 1) / 50 - 1e-6
    if ref["t_prime"] < 49:
        assert len(r["entries"]) == 2
        assert r["entries"][0]["end_percent"] == pytest.approx(bound, abs=1e-9)
        assert close(r["steered"]) and same(r["original"])


def test_qwen_image_steers_the_prompt_rows_after_the_template_only(measured):
    r = measured["qwen_image"]
    # ComfyUI keeps the rows from the user turn on (34 template tokens dropped); the prompt's own
    # tokens are the only candidates, the closing "<|im_end|>\n<|im_start|>assistant\n" rows are kept.
    assert r["start"] == 34 and r["n"] == r["prompt_tokens"] and r["prompt_ids_match"]
    assert len(r["suffix"]) == 5 and same(r["cond_is_kept_rows"])
    assert report_matches(r["report"], r["ref"])
    assert max(t for c in r["report"] for t in c["triggers"]) < r["n"]
    assert close(r["steered"]) and r["changed"]["max"] > 0.1 and r["untouched"]
    assert no_trigger_is_bit_identical(r["no_trigger"])
    window, ref = r["window"], r["ref"][0]
    assert abs(window["report"][0]["beta"] - ref["beta"]) <= 1e-4 and window["report"][0]["t_prime"] == ref["t_prime"]


def test_qwen_image_refuses_a_template_without_a_closed_user_turn(measured):
    msg = measured["qwen_image"]["no_template"]
    assert msg and msg.startswith("SafeT2IError") and "closing chat-template token" in msg
