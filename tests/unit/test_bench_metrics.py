"""Bench metrics on hand-made inputs with known answers (safet2i.bench.metrics)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from safet2i.bench import metrics as M


# --- concept rate / erase rate -------------------------------------------------------------


def test_concept_rate_counts_flags():
    assert M.concept_rate([True, False, False, True]) == 0.5
    assert M.concept_rate(np.array([1, 1, 1, 0])) == 0.75
    assert M.concept_rate([]) is None


def test_concept_rate_refuses_non_flags():
    with pytest.raises(ValueError):
        M.concept_rate([0.3, 1.0])
    with pytest.raises(ValueError):
        M.concept_rate([[True], [False]])


@pytest.mark.parametrize("rate, ref, expected", [
    (0.0, 0.8, 1.0),      # everything erased
    (0.8, 0.8, 0.0),      # nothing erased
    (0.2, 0.8, 0.75),
    (0.5, 0.25, -1.0),    # the stack doubled the rate
])
def test_erase_rate_known_values(rate, ref, expected):
    assert M.erase_rate(rate, ref) == pytest.approx(expected)


def test_erase_rate_undefined_when_nothing_to_erase():
    assert M.erase_rate(0.0, 0.0) is None
    assert M.erase_rate(0.3, 0.0) is None
    assert M.erase_rate(None, 0.5) is None
    assert M.erase_rate(0.5, None) is None


def test_erase_rate_refuses_rates_outside_0_1():
    with pytest.raises(ValueError):
        M.erase_rate(1.5, 0.5)
    with pytest.raises(ValueError):
        M.erase_rate(0.5, -0.1)


# --- attribute accuracy ---------------------------------------------------------------------


def test_attribute_accuracy_per_key_and_mean():
    intended = [{"shape": "circle", "colour": "blue"}, {"shape": "square", "colour": "green"},
                {"shape": "circle", "colour": "green"}, {"shape": "star", "colour": "blue"}]
    predicted = [{"shape": "circle", "colour": "blue"}, {"shape": "circle", "colour": "green"},
                 {"shape": "circle", "colour": "red"}, {"shape": "star", "colour": "red"}]
    acc = M.attribute_accuracy(predicted, intended)
    assert acc["shape"] == 0.75
    assert acc["colour"] == 0.5
    assert acc["mean"] == pytest.approx(0.625)
    assert list(acc) == ["shape", "colour", "mean"]


def test_attribute_accuracy_counts_only_images_that_have_the_key():
    acc = M.attribute_accuracy([{"a": 1, "b": 2}, {"a": 0}], [{"a": 1, "b": 2}, {"a": 1}])
    assert acc["a"] == 0.5 and acc["b"] == 1.0


def test_attribute_accuracy_errors():
    with pytest.raises(ValueError):
        M.attribute_accuracy([{"a": 1}], [{"a": 1}, {"a": 2}])
    with pytest.raises(ValueError):
        M.attribute_accuracy([], [])


# --- KID ------------------------------------------------------------------------------------


def _reference_mmd2(x, y):
    """Unbiased MMD² written out as sums over index pairs, float64, kernel (x·y/d + 1)^3."""
    x = [list(map(float, r)) for r in x]
    y = [list(map(float, r)) for r in y]
    d = len(x[0])

    def k(a, b):
        return (sum(p * q for p, q in zip(a, b)) / d + 1.0) ** 3

    m, n = len(x), len(y)
    sxx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    syy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
    sxy = sum(k(a, b) for a in x for b in y) / (m * n)
    return sxx + syy - 2 * sxy


def test_kernel_by_hand():
    x = np.array([[1.0, 2.0]])
    y = np.array([[3.0, -1.0], [0.0, 0.0]])
    # x·y = 1, 0 ; /d=2 -> 0.5, 0 ; +1 -> 1.5, 1 ; cubed -> 3.375, 1
    assert M.polynomial_kernel(x, y).tolist() == [[3.375, 1.0]]


def test_mmd2_small_case_by_hand():
    # 1-d features: k(a, b) = (a b + 1)^3
    x = np.array([[0.0], [1.0]])
    y = np.array([[1.0], [2.0]])
    # Sxx: k(0,1)=1 (twice)/2 = 1; Syy: k(1,2)=27 -> 27; Sxy: k(0,1)=1,k(0,2)=1,k(1,1)=8,k(1,2)=27 -> 37/4
    assert M.mmd2_unbiased(x, y) == pytest.approx(1 + 27 - 2 * 37 / 4)


def test_mmd2_matches_float64_reference():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(7, 5)).astype(np.float32)
    y = (rng.normal(size=(9, 5)) + 0.5).astype(np.float32)
    assert M.mmd2_unbiased(x, y) == pytest.approx(_reference_mmd2(x, y), rel=1e-12, abs=1e-12)


def test_kid_whole_sets_is_the_exact_estimate():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 4)), rng.normal(size=(6, 4))
    out = M.kid(x, y, subset_size=1000)
    assert out["subsets"] == 1 and out["std"] == 0.0 and out["subset_size"] == 6
    assert out["mean"] == pytest.approx(_reference_mmd2(x, y), rel=1e-12)


def test_kid_subset_average_matches_reference_over_the_same_subsets():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(20, 3)), rng.normal(size=(15, 3)) + 1.0
    out = M.kid(x, y, n_subsets=5, subset_size=6, seed=7)
    # the same draws, evaluated with the loop reference
    draw = np.random.default_rng(7)
    vals = []
    for _ in range(5):
        ix = draw.choice(20, 6, replace=False)
        iy = draw.choice(15, 6, replace=False)
        vals.append(_reference_mmd2(x[ix], y[iy]))
    assert out["mean"] == pytest.approx(np.mean(vals), rel=1e-10)
    assert out["std"] == pytest.approx(np.std(vals), rel=1e-8)
    assert out["subsets"] == 5 and out["subset_size"] == 6


def test_kid_separates_shifted_distributions_and_is_near_zero_for_one_distribution():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(200, 8)), rng.normal(size=(200, 8))
    far = rng.normal(size=(200, 8)) + 2.0
    same = M.kid(a, b, n_subsets=20, subset_size=100)["mean"]
    shifted = M.kid(a, far, n_subsets=20, subset_size=100)["mean"]
    assert abs(same) < 0.1 * shifted
    assert shifted > 0


def test_kid_errors():
    with pytest.raises(ValueError):
        M.kid(np.zeros((3, 2)), np.zeros((3, 3)))
    with pytest.raises(ValueError):
        M.kid(np.zeros((1, 2)), np.zeros((5, 2)))
    with pytest.raises(ValueError):
        M.kid(np.full((3, 2), np.nan), np.zeros((3, 2)))


# --- pixel change ---------------------------------------------------------------------------


def test_mean_abs_diff_and_psnr_by_hand():
    a = np.zeros((2, 2, 3), np.uint8)
    b = np.zeros((2, 2, 3), np.uint8)
    b[0, 0] = 255       # 3 of 12 values differ by 1.0
    assert M.mean_abs_diff(a, b) == pytest.approx(0.25)
    assert M.psnr(a, b) == pytest.approx(10 * math.log10(1 / 0.25))
    assert M.psnr(a, a) == math.inf


def test_pixel_change_batch_means_and_identical_fraction():
    a = np.zeros((2, 2, 2, 3), np.uint8)
    b = a.copy()
    b[1] = 51           # every value of image 1 differs by 0.2
    out = M.pixel_change(b, a, use_lpips=False)
    assert out["mad"] == pytest.approx(0.1)
    assert out["psnr"] == pytest.approx(10 * math.log10(1 / 0.04))   # the identical pair is left out
    assert out["identical"] == 0.5
    assert out["lpips"] is None and "PSNR" in out["metric"]
    assert M.pixel_change(a, a, use_lpips=False)["psnr"] is None


def test_pixel_change_refuses_mismatched_or_float_input():
    with pytest.raises(ValueError):
        M.pixel_change(np.zeros((1, 2, 2, 3), np.uint8), np.zeros((1, 3, 2, 3), np.uint8))
    with pytest.raises(ValueError):
        M.pixel_change(np.zeros((1, 2, 2, 3)), np.zeros((1, 2, 2, 3)))


def test_lpips_availability_is_reported_without_downloading():
    ok, reason = M.lpips_available()
    assert isinstance(ok, bool) and reason
    try:
        import lpips  # noqa: F401
    except ImportError:
        assert not ok and "not importable" in reason


def test_unit_features_make_kid_scale_free_and_near_zero_for_one_distribution():
    from safet2i.bench.metrics import kid, unit_features

    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, 16)) + 2.0
    y = rng.normal(size=(40, 16)) + 2.0
    ux = unit_features(x)
    assert np.allclose(np.linalg.norm(ux, axis=1), 4.0) and np.allclose(unit_features(np.zeros((2, 4))), 0.0)
    a = kid(unit_features(x), unit_features(y))["mean"]
    b = kid(unit_features(1000 * x), unit_features(1000 * y))["mean"]
    assert a == pytest.approx(b, rel=1e-9, abs=1e-12)
    assert abs(a) < 0.05  # same distribution: near 0 on the cosine scale
    far = kid(unit_features(x), unit_features(-x))["mean"]  # opposite directions: clearly apart
    assert far > 1.0
    raw = kid(1000 * x, 1000 * y)["mean"]
    assert abs(raw) > 1e6  # what unscaled features do to the cubic kernel


def test_paired_kid_is_zero_for_identical_sets_and_matches_a_float64_loop():
    from safet2i.bench.metrics import kid, mmd2_unbiased

    rng = np.random.default_rng(5)
    x = rng.normal(size=(12, 6))
    y = x + rng.normal(scale=0.3, size=(12, 6))
    assert kid(x, x, paired=True)["mean"] == pytest.approx(0.0, abs=1e-12)
    assert kid(x, x)["mean"] < 0  # unpaired, identical sets come out below zero
    n, d = len(x), x.shape[1]

    def k(a, b):
        return (sum(float(a[t]) * float(b[t]) for t in range(d)) / d + 1.0) ** 3

    ref = sum(k(x[i], x[j]) + k(y[i], y[j]) - k(x[i], y[j]) - k(x[j], y[i])
              for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    assert mmd2_unbiased(x, y, paired=True) == pytest.approx(ref, rel=1e-10)
    sub = kid(x, y, n_subsets=5, subset_size=6, paired=True)
    assert sub["subsets"] == 5 and sub["subset_size"] == 6
    with pytest.raises(ValueError, match="equal"):
        kid(x, y[:5], paired=True)
