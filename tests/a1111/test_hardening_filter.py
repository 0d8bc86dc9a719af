"""Issue 14, class 3, in the A1111 extension: no policy mistake turns the output filter off.

The webui's settings and API offer only the presets (``strict-5``, ``broad-9``, ``face-only``)
and no per-label thresholds: a wrong name is refused by ``JobConfig``; every preset is valid
for the webui's model; a policy the core refuses (a label NudeNet cannot emit) yields the
placeholder and an error verdict naming the label, never the unchecked image; and an
escalated censoring (re-check still flagged) is shown in the verdict text. Benign faces only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "extension"))

from safet2i_a1111 import filtering  # noqa: E402
from safet2i_a1111.config import POLICIES, JobConfig  # noqa: E402

from safet2i.filter import SafetyFilter  # noqa: E402
from safet2i.filter import censor as censor_mod  # noqa: E402
from safet2i.filter.censor import placeholder  # noqa: E402


def test_every_webui_policy_is_valid_for_the_webui_model():
    for policy in POLICIES:
        flt = filtering.get_filter(policy, "blur")
        assert set(flt.policy.thresholds) <= set(flt.models[0].labels)     # nothing is a dead label


@pytest.mark.parametrize("policy", ["FACE-ONLY", "strict5", "custom", "FEMALE_BREAST_EXPOSED=0.5"])
def test_a_policy_the_webui_does_not_offer_is_refused_at_job_time(policy):
    with pytest.raises(ValueError, match="unknown filter policy"):
        JobConfig.from_args([False, "SLD", "MEDIUM", "", True, policy, "blur"])


def test_a_policy_with_a_label_nudenet_cannot_emit_fails_closed(tmp_path, astronaut):
    path = tmp_path / "typo.json"
    path.write_text(json.dumps({"name": "typo", "thresholds": {"FACE_FEMALLE": 0.5}}))
    image = Image.fromarray(astronaut)
    o = filtering.filter_image(image, str(path), "blur")
    assert o.verdict.startswith("error: PolicyError")
    assert "'FACE_FEMALLE'" in o.verdict and "Did you mean 'FACE_FEMALE'" in o.verdict
    out = np.asarray(o.image.convert("RGB")).astype(int)
    card = np.rint(placeholder(*astronaut.shape[:2]) * 255).astype(int)
    assert np.abs(out - card).max() <= 1                               # the placeholder, not the image
    assert filtering.was_checked(o.image) and filtering.verdict_text(o) == "error"


def test_an_escalated_censoring_is_reported_and_hides_the_face(monkeypatch, astronaut):
    monkeypatch.setattr(censor_mod, "BLUR_MIN_FRACTION", 0.0)             # as if the minimums were too weak
    monkeypatch.setattr(censor_mod, "MIN_PIXELS", 1.0)
    weak = SafetyFilter(["nudenet"], "face-only", "blur", strength=1.0)
    monkeypatch.setitem(filtering._FILTERS, ("face-only", "blur"), weak)
    o = filtering.filter_image(Image.fromarray(astronaut), "face-only", "blur")
    assert o.verdict == "censored" and o.escalated == "fill"
    assert "escalated to fill" in filtering.verdict_text(o)
    judge = SafetyFilter(["nudenet"], "face-only", "pass")
    assert not judge.check([np.asarray(o.image.convert("RGB"))])[0].unsafe
