"""Operator enforcement (``--safet2i-enforce``) in a real webui: a request cannot switch the
output filter off or weaken it, and the infotext says it was enforced."""

from __future__ import annotations

import pytest

from .server import FACE_MARKER
from .test_webui_txt2img import args, params

pytestmark = [pytest.mark.webui, pytest.mark.slow]


def test_filter_off_in_the_request_is_overridden(webui_enforced):
    r = webui_enforced.txt2img(args(filter_enabled=False, filter_action="pass"), batch_size=2)
    for i in range(2):
        p = params(r, i)
        assert p["SafeT2I filter"] == "strict-5 pixelate enforced" and p["SafeT2I verdict"] == "safe", p


def test_a_stricter_choice_is_kept_and_its_detections_are_censored(webui_enforced):
    # face-only does not include strict-5: the operator's policy replaces it
    r = webui_enforced.txt2img(args(filter_policy="face-only", filter_action="pass"), prompt=f"{FACE_MARKER} x")
    p = params(r)
    assert p["SafeT2I filter"] == "strict-5 pixelate enforced" and p["SafeT2I verdict"] == "safe", p
    # broad-9 includes strict-5 (kept) and a censoring action is kept; pass is not
    r = webui_enforced.txt2img(args(filter_policy="broad-9", filter_action="fill"))
    assert params(r)["SafeT2I filter"] == "broad-9 fill enforced"
    r = webui_enforced.txt2img(args(filter_policy="broad-9", filter_action="pass"))
    assert params(r)["SafeT2I filter"] == "broad-9 pixelate enforced"
