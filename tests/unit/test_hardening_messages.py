"""Issue 14, class 10: numeric options validated naming the option; no raw warnings on stderr.

"Unsafe" is the ``face-only`` policy on scikit-image's astronaut; the cat has no detection.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from filter_cli_kit import by_name, folder, report, run, sha, tree  # noqa: F401  (folder: fixture)


@pytest.mark.parametrize("option,value", [
    ("--feather", "-1"), ("--feather", "nan"), ("--feather", "1e9"),
    ("--strength", "0"), ("--strength", "-3"), ("--strength", "inf"),
    ("--expand", "5"), ("--expand", "-0.1"),
    ("--batch-size", "0"), ("--batch-size", "1.5"), ("--batch-size", "100000"),
    ("--max-file-pixels", "0"),
])
def test_unbounded_numeric_options_are_refused_naming_the_option(tmp_path, folder, capsys, option, value):
    code = run("filter", folder, "--out", tmp_path / "out", f"{option}={value}")
    err = capsys.readouterr().err
    assert code == 64
    assert option in err.split("error:", 1)[1]
    assert not (tmp_path / "out").exists()


def test_no_raw_warning_text_on_stderr(tmp_path, capsys):
    """A decompression-bomb-sized image and a malformed EXIF block give clean messages."""
    src = tmp_path / "in"
    src.mkdir()
    Image.new("L", (10000, 9000)).save(src / "big.png", compress_level=1)   # over Pillow's warning size
    code = run("filter", src, "--out", tmp_path / "out")
    err = capsys.readouterr().err
    assert code == 0
    assert "Warning" not in err and "Traceback" not in err


def _face_verdict():
    from safet2i.filter.cost import judge
    from safet2i.filter.detectors import Detection
    from safet2i.filter.policy import get_policy

    return judge(0, (512, 512, 3), [Detection("FACE_FEMALE", 0.8, (173, 82, 100, 97), "m")],
                 get_policy("face-only"), {})


def test_large_feather_uses_the_linear_time_path_and_matches_the_exact_one(monkeypatch):
    """Review: --feather 1024 ran an elliptical dilation with a 4097-px kernel for minutes.
    Large feathers use a distance transform + downscaled Gaussian; the result matches the
    exact dilation + Gaussian closely and keeps the flagged core fully covered."""
    import cv2

    from safet2i.filter import censor
    from safet2i.filter.policy import get_policy

    v, pol = _face_verdict(), get_policy("face-only")
    hard = censor.unsafe_mask(v, pol, 0.0)
    feather = 24.0
    k = 2 * int(np.ceil(2 * feather)) + 1
    grown = cv2.dilate(hard, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    ref = np.maximum(hard, cv2.GaussianBlur(grown, (0, 0), sigmaX=feather, borderType=cv2.BORDER_REPLICATE))
    kernels = []
    real = cv2.dilate
    monkeypatch.setattr(cv2, "dilate", lambda m, ker, *a, **kw: kernels.append(ker.shape) or real(m, ker, *a, **kw))
    got = censor.unsafe_mask(v, pol, feather)
    assert not kernels                                   # no big structuring element
    assert np.abs(got - ref).mean() < 0.01 and np.abs(got - ref).max() < 0.2
    assert got[hard == 1].min() == 1.0
    huge = censor.unsafe_mask(v, pol, 1024.0)            # capped at the image size: all covered
    assert not kernels and huge.min() > 0.5 and huge[hard == 1].min() == 1.0


@pytest.mark.parametrize("value", ["300,0,0", "nan,0,0", "inf,1,1", "-1,0,0", "#12"])
def test_colour_out_of_range_is_a_usage_error_naming_the_option(tmp_path, folder, capsys, value):
    code = run("filter", folder, "--out", tmp_path / "out", f"--colour={value}")
    assert code == 64 and "--colour" in capsys.readouterr().err


def test_outputs_and_reports_get_the_usual_file_mode(tmp_path, folder):
    old = os.umask(0o022)
    try:
        assert run("filter", folder, "--out", tmp_path / "out", "--report", tmp_path / "r.json", "-q") == 0
    finally:
        os.umask(old)
    import safet2i.filter.files as files

    want = 0o666 & ~files._UMASK
    assert (os.stat(tmp_path / "out" / "chelsea.png").st_mode & 0o777) == want
    assert (os.stat(tmp_path / "r.json").st_mode & 0o777) == want
