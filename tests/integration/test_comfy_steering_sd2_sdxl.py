"""SAFREE-style prompt steering with ComfyUI's real SD2.x and SDXL text encoders (no checkpoint).

ComfyUI detects SDXL only from a full-size UNet, so instead of a checkpoint the helper
``comfy_tiny_clip_steer.py`` builds ComfyUI's own CLIP objects from
``SD20().clip_target()`` / ``SDXL().clip_target()`` with tiny text-model configs (random,
fixed seed; real CLIP BPE tokenizers), runs ``SafeT2IPromptSteer.execute`` and an
independent reference (each encoder alone, full-length leave-one-out encodes,
``projector``/``steer_chunk``), and reports the measurements asserted here.

Tolerance: everything is float32. The node's leave-one-out EOS rows come from its packed
short encode, the reference's from full 77-token encodes: the same float32 operations on
other shapes, so they differ in the last bits (~1e-7 relative per operation). The steered
rows ``(I - P_C) P_M h`` go through ``P_M = M (MᵀM)⁺ Mᵀ`` of nearly parallel leave-one-out
vectors, which amplifies that; measured <= 1e-5 of the rows' scale. The bound, 1e-4 of the
scale, is the node's own check of its short encode against ComfyUI's. Everything that is
not a steered trigger row (the rows of other positions, the pooled output, no-trigger
prompts) must be bit-identical.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from .conftest import _comfy_env

pytestmark = pytest.mark.integration
HELPER = Path(__file__).with_name("comfy_tiny_clip_steer.py")
TINY_WIDTHS = {"h": 48, "l": 32, "g": 64}  # as in the helper: different per encoder


@pytest.fixture(scope="module")
def measured():
    path, python = _comfy_env()
    out = subprocess.run([python, str(HELPER), path], cwd=path, capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, SAFET2I_SKIP_INSTALL="1"))
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def close(d, rel=1e-4):
    """Within float32 tolerance of the reference (see the module docstring), same shape."""
    assert d["shape"][0] == d["shape"][1], d
    assert d["max"] <= rel * max(1.0, d["scale"]), d
    return True


def same(d):
    assert d["shape"][0] == d["shape"][1] and d["equal"], d
    return True


def triggers(report, key=None):
    return [c["triggers"] for c in report if key is None or c["encoder"] == key]


def test_helper_used_the_fast_path_without_fallback(measured):
    assert measured["warnings"] == [] and measured["no_truncation"] == 0


def test_sd2_steers_the_penultimate_rows_of_the_h_encoder(measured):
    r = measured["sd2"]
    assert r["keys"] == ["h"] and r["width"] == TINY_WIDTHS["h"]
    # ComfyUI's SD2 conditioning is clip_h's penultimate layer (layer_idx -2 of 3 layers) ...
    assert r["layer"] == ["hidden", -2]
    assert same(r["cond_is_h_rows"])
    assert r["layers_matching"] == [r["num_layers"] - 2]
    assert r["last_layer_cond_differs"]["max"] > 0.1  # ... and the layer matters
    # The node's steered rows equal the reference from those rows; other rows and the pooled output unchanged.
    a = r["always"]
    assert a["entries"] == [{}]  # self_validating off: one entry, every step
    assert triggers(a["report"]) == [c["triggers"] for c in a["ref"]] and a["ref"][0]["triggers"]
    assert close(a["steered"]) and a["changed"]["max"] > 0.1 and a["shape"][0] == a["shape"][1]
    assert a["untouched_rows_equal"] and same(a["pooled"])


def test_sd2_self_validating_window_matches_the_reference(measured):
    w = measured["sd2"]["window"]
    t_prime = w["ref"][0]["t_prime"]
    assert [c["t_prime"] for c in w["report"]] == [t_prime] and 0 <= t_prime <= 10
    assert len(w["entries"]) == 2
    boundary = (t_prime + 1) / 50 - 1e-6
    assert w["entries"][0] == {"start_percent": 0.0, "end_percent": pytest.approx(boundary, abs=1e-12)}
    assert w["entries"][1] == {"start_percent": pytest.approx(boundary, abs=1e-12), "end_percent": 1.0}
    assert close(w["steered"]) and same(w["original"])


def test_sd2_no_trigger_prompt_is_returned_bit_identical(measured):
    n = measured["sd2"]["no_trigger"]
    assert n["triggers"] == [[]] and n["entries"] == [{}]
    assert same(n["cond"]) and same(n["pooled"])


def test_sdxl_split_follows_the_encoder_widths(measured):
    r = measured["sdxl"]
    assert r["widths"] == {"l": TINY_WIDTHS["l"], "g": TINY_WIDTHS["g"]}
    assert r["splits"] == [["l", 0, 32], ["g", 32, 96]]  # CLIP-L first, then bigG, as ComfyUI concatenates
    assert r["layers"] == {"l": ["hidden", -2], "g": ["hidden", -2]}
    assert r["full_size_splits"] == [["l", 0, 768], ["g", 768, 2048]]  # full-size SDXL: unchanged
    assert r["width_mismatch"].startswith("SafeT2IError") and "[32, 64]" in r["width_mismatch"]


@pytest.mark.parametrize("prompt", ["short", "long"])
def test_sdxl_each_encoder_is_steered_on_its_own_slice(measured, prompt):
    r = measured["sdxl"][prompt]
    # ComfyUI's conditioning is [clip_l rows | clip_g rows], both penultimate-layer rows.
    assert same(r["cond_layout"]) and r["layers_matching"] == {"l": [1], "g": [1]}
    for key in ("l", "g"):
        assert triggers(r["report"], key) == [c["triggers"] for c in r["ref"][key]], key
        assert all(c["triggers"] for c in r["ref"][key]), key  # alpha 0: every chunk has a trigger
        assert close(r[f"steered_{key}"]), key   # against the subspace of that same encoder
        assert r[f"changed_{key}"]["max"] > 0.1, key
        assert r["untouched_equal"][key], key
    assert r["shape"][0] == r["shape"][1] and r["entries"] == [{}]
    # The pooled output is ComfyUI's own (clip_g's projected pooled), unchanged.
    assert same(r["pooled_vs_comfy"]) and same(r["pooled_vs_clip_g"])
    assert r["shape"][0][-1] == 96 and r["shape"][0][1] == 77 * r["chunks"]["l"]


def test_sdxl_long_prompt_is_handled_per_chunk(measured):
    r = measured["sdxl"]["long"]
    assert r["chunks"] == {"l": 2, "g": 2}
    assert [(c["encoder"], c["chunk"]) for c in r["report"]] == [("l", 0), ("l", 1), ("g", 0), ("g", 1)]


@pytest.mark.parametrize("prompt", ["short", "long"])
def test_sdxl_no_trigger_prompt_is_returned_bit_identical(measured, prompt):
    n = measured["sdxl"][prompt]["no_trigger"]
    assert all(t == [] for t in n["triggers"]) and n["entries"] == [{}]
    assert same(n["cond"]) and same(n["pooled"])
