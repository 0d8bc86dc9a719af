"""Issue 14, class 2: every input type is either checked correctly or refused.

``SafetyFilter.run`` must judge exactly the pixels it returns. The tests spy on the uint8
images handed to the models and compare them, and the returned floats, with references
computed here by hand from the input (``x / 255``, ``x / 65535``, ``clip(x, 0, 1)``, ...),
not with the library's own converters. The "unsafe" picture is skimage's astronaut under
the ``face-only`` policy (FACE_FEMALE ~0.8); no NSFW material is used.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from safet2i.errors import ImageInputError
from safet2i.filter import SafetyFilter

INT_DTYPES = ["int8", "int16", "int32", "int64", "uint32", "uint64"]
TORCH_INTS = [torch.int8, torch.int16, torch.int32, torch.int64]


@pytest.fixture(scope="module")
def face(benign_set) -> np.ndarray:
    return benign_set["astronaut"]                       # uint8 [512, 512, 3]


@pytest.fixture(scope="module")
def spy_filter():
    """``make(action)`` -> a face-only filter recording every uint8 batch the models judge."""
    def make(action="pass"):
        flt = SafetyFilter(["nudenet"], "face-only", action)
        judged: list[np.ndarray] = []
        original = flt.check_uint8

        def spy(u8):
            judged.extend(np.array(a, copy=True) for a in u8)
            return original(u8)

        flt.check_uint8 = spy
        return flt, judged
    return make


def assert_judged_is(judged: np.ndarray, returned: np.ndarray) -> None:
    """``judged`` is a nearest uint8 level of every returned pixel (exact float64 maths; at an
    exact half-way value either neighbour is nearest)."""
    exact = np.asarray(returned, np.float64) * 255.0
    assert judged.dtype == np.uint8 and judged.shape == returned.shape
    assert np.abs(judged.astype(np.float64) - exact).max() <= 0.5 + 1e-4


# --------------------------------------------------------------------------- integers are refused


@pytest.mark.parametrize("dtype", INT_DTYPES)
def test_integer_arrays_are_refused_by_run_and_check_naming_the_dtype(face, dtype):
    flt = SafetyFilter(["nudenet"], "face-only", "blur")
    arr = face.astype(dtype)                      # 0..255 values: read as 0..1 floats they look white
    before = arr.copy()
    for images in (arr, arr[None], [arr]):
        with pytest.raises(ImageInputError, match=dtype):
            flt.run(images)
        with pytest.raises(ImageInputError, match=dtype):
            flt.check(images)
    np.testing.assert_array_equal(arr, before)


@pytest.mark.parametrize("dtype", TORCH_INTS, ids=str)
def test_torch_integer_tensors_are_refused(face, dtype):
    flt = SafetyFilter(["nudenet"], "face-only", "blur")
    t = torch.from_numpy(face.astype(np.int64)).to(dtype)[None]
    with pytest.raises(ImageInputError, match=str(dtype).replace("torch.", "")):
        flt.run(t)
    with pytest.raises(ImageInputError):
        flt.check(t)


def test_other_odd_dtypes_are_refused(face):
    flt = SafetyFilter(["nudenet"], "face-only", "blur")
    with pytest.raises(ImageInputError, match="complex"):
        flt.run(face.astype(np.complex64))
    with pytest.raises(ImageInputError, match="object"):
        flt.run(face.astype(object))
    with pytest.raises(ImageInputError, match="[Ee]mpty"):
        flt.run(np.zeros((0, 5, 3), np.float32))


# --------------------------------------------------------------------------- judged == returned


def _reference(x) -> np.ndarray:
    """What run() must return (and judge) for an input, computed without the library."""
    a = x.float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if a.dtype == np.uint8:
        return a.astype(np.float64) / 255.0
    if a.dtype == np.uint16:
        return a.astype(np.float64) / 65535.0
    if a.dtype == np.bool_:
        return a.astype(np.float64)
    return np.clip(a.astype(np.float64), 0.0, 1.0)


def _cases(face):
    f = face.astype(np.float64) / 255.0
    stretched = f * 2.0 - 0.3                               # -0.3 .. 1.7: a third of the pixels out of range
    return {
        "uint8": face,
        "uint16": face.astype(np.uint16) * 257,
        "bool": face > 127,
        "float16": f.astype(np.float16),
        "float32": f.astype(np.float32),
        "float64": f,
        "float32-out-of-range": stretched.astype(np.float32),
        "float64-out-of-range": stretched,
        "torch-float16": torch.from_numpy(f.astype(np.float32)).half(),
        "torch-bfloat16": torch.from_numpy(f.astype(np.float32)).bfloat16(),
        "torch-float32-out-of-range": torch.from_numpy(stretched.astype(np.float32)),
        "torch-bool": torch.from_numpy(face > 127),
    }


CASES = ["uint8", "uint16", "bool", "float16", "float32", "float64", "float32-out-of-range",
         "float64-out-of-range", "torch-float16", "torch-bfloat16", "torch-float32-out-of-range", "torch-bool"]


@pytest.mark.parametrize("case", CASES)
def test_run_judges_exactly_the_pixels_it_returns(face, spy_filter, case):
    x = _cases(face)[case]
    before = x.clone() if isinstance(x, torch.Tensor) else x.copy()
    flt, judged = spy_filter("pass")
    out = flt.run([x])
    ref = _reference(x)
    got = out.images[0]
    assert got.dtype == np.float32 and got.shape == face.shape
    assert 0.0 <= got.min() and got.max() <= 1.0
    np.testing.assert_allclose(got, ref, atol=1e-6)                  # returned = the reference pixels
    assert len(judged) == 1
    assert_judged_is(judged[0], got)                                  # judged = what is returned
    # check() reaches the same verdict on the same input (consistent conversion)
    ver = SafetyFilter(["nudenet"], "face-only", "pass").check(x[None])[0]
    assert ver.unsafe == out.verdicts[0].unsafe
    assert ver.cost == pytest.approx(out.verdicts[0].cost, abs=0.02)
    if isinstance(x, torch.Tensor):                                   # the input is never written
        assert torch.equal(x, before)
    else:
        np.testing.assert_array_equal(x, before)


@pytest.mark.parametrize("case", ["float32", "float32-out-of-range", "uint16", "torch-bfloat16"])
def test_the_face_is_found_and_censored_in_every_representation(face, spy_filter, case):
    x = _cases(face)[case]
    flt, judged = spy_filter("fill")
    out = flt.run(torch.stack([x]) if isinstance(x, torch.Tensor) else x[None])
    assert out.is_safe == [False]
    assert out.verdicts[0].flagged[0].detection.label == "FACE_FEMALE"
    m = out.masks[0] == 1
    assert out.images[0][m].max() == 0.0                             # the face region is filled
    np.testing.assert_allclose(out.images[0][~m], _reference(x)[~m], atol=1e-6)
    # the re-check judged the filled image that is returned
    assert_judged_is(judged[-1], out.images[0])


def test_out_of_range_floats_cannot_hide_from_the_judge(face, spy_filter):
    """Values outside 0..1 used to be judged clipped but returned unclipped: a picture that
    only shows once rescaled (here: the face at 0..1 scaled into 1..2) was judged white and
    handed on intact. Now the white, clipped image is both what is judged and what leaves."""
    hidden = face.astype(np.float32) / 255.0 + 1.0            # all > 1: clipped to plain white
    flt, judged = spy_filter("blur")
    out = flt.run(hidden[None])
    assert out.is_safe == [True]
    np.testing.assert_array_equal(out.images[0], np.ones_like(hidden))
    np.testing.assert_array_equal(judged[0], np.full(face.shape, 255, np.uint8))
    # rescaling the output cannot bring the face back: it carries no information
    assert np.ptp(out.images[0]) == 0.0


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_nan_and_inf_stay_refused(face, bad, dtype):
    x = (face.astype(np.float32) / 255.0).astype(dtype)
    x[3, 4, 1] = bad
    flt = SafetyFilter(["nudenet"], "face-only", "blur")
    with pytest.raises(ImageInputError, match="NaN or infinite"):
        flt.run(x[None])
    with pytest.raises(ImageInputError, match="NaN or infinite"):
        flt.check(x[None])


def test_float64_beyond_float32_range_is_refused_not_clipped(face):
    x = face.astype(np.float64) / 255.0
    x[0, 0, 0] = 1e300                                       # inf once in float32: refused like check()
    flt = SafetyFilter(["nudenet"], "face-only", "blur")
    with pytest.raises(ImageInputError, match="float32 range"):
        flt.run(x[None])
    with pytest.raises(ImageInputError):
        flt.check(x[None])


def test_torch_bfloat16_nan_is_refused(face):
    t = torch.from_numpy(face.astype(np.float32) / 255.0).bfloat16()
    t[1, 1, 1] = float("nan")
    with pytest.raises(ImageInputError, match="NaN"):
        SafetyFilter(["nudenet"], "face-only", "blur").run(t[None])


def test_pil_images_are_converted_as_check_converts_them(face, spy_filter):
    from PIL import Image

    flt, judged = spy_filter("pass")
    im = Image.fromarray(face).convert("F")                  # mode F, 0..255 floats
    out = flt.run([im])
    grey = np.asarray(im, np.float64)
    ref = np.repeat(np.rint(grey / grey.max() * 255.0)[:, :, None], 3, axis=2) / 255.0
    diff = np.abs(out.images[0] - ref)
    assert diff.max() <= 1 / 255 + 1e-6 and diff.mean() < 1e-3      # scaled by its maximum, as check() does
    assert_judged_is(judged[0], out.images[0])
