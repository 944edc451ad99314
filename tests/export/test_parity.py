"""The parity verdict on synthetic logits: scale-aware, probabilities, masks, tolerances."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cpcsam.errors import ConfigError
from cpcsam.export.parity import Tolerances, compare_logits, compare_masks, verdict

TOL = Tolerances()  # atol 1e-4, rtol 1e-3 of the entity's max |logit|, |Δσ| 1e-3, IoU 0.999


def _logits(scale: float, seed: int = 0, shape=(2, 1, 64, 96)) -> np.ndarray:
    """Smooth logits spanning ±scale with a real boundary (zero crossing) in each entity."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : shape[2], 0 : shape[3]].astype(np.float32)
    out = np.empty(shape, np.float32)
    for e in range(shape[0]):
        cy, cx = rng.uniform(0.3, 0.7) * shape[2], rng.uniform(0.3, 0.7) * shape[3]
        r = np.hypot(y - cy, x - cx)
        out[e, 0] = scale * np.tanh((20.0 - r) / 8.0)
    return out


def _numbers(ref, out, tol=TOL):
    return {**compare_logits(ref, out, tol), **compare_masks(ref, out, tol)}


def test_float32_noise_on_large_logits_passes():
    """The healthy-model case: |Δ| ≈ 1e−3 on logits of ±200, boundary pixels included."""
    ref = _logits(200.0)
    out = ref + np.random.default_rng(1).normal(0, 4e-4, ref.shape).astype(np.float32)
    numbers = _numbers(ref, out)
    assert numbers["max_abs_logit_diff"] > 1e-3  # an absolute 1e-4 bound would fail this
    assert numbers["max_logit_error_ratio"] < 0.02 and numbers["max_rel_logit_diff"] < 2e-5
    assert numbers["max_abs_prob_diff"] < 1e-3
    assert numbers["min_mask_iou"] == 1.0  # flips near logit 0 are excused (probability within 1e-3 of 0.5)
    assert verdict(numbers, TOL) == []


def test_the_same_difference_on_small_logits_fails():
    """An export bug is large relative to the logits: 0.03 on logits of ±0.2 (the saturated gates)."""
    ref = _logits(0.2)
    out = ref.copy()
    out[1, 0, 30:40, 40:60] += 0.03
    numbers = _numbers(ref, out)
    assert numbers["max_logit_error_ratio"] > 50
    assert numbers["worst_logit"]["entity"] == 1 and numbers["worst_logit"]["abs_diff"] == pytest.approx(0.03, rel=1e-3)
    failures = verdict(numbers, TOL)
    assert failures[0].startswith("logits: entity 1:") and "probabilities" in failures[1]


def test_probabilities_are_judged_on_their_own():
    """A loose rtol lets the logit check pass a boundary error that the probability check refuses."""
    loose = Tolerances(logit_rtol=0.05)
    ref = _logits(100.0)
    out = ref.copy()
    i = np.unravel_index(np.argmin(np.abs(ref[0, 0])), ref.shape[2:])
    out[0, 0][i] += 0.5  # at the boundary: σ moves by ~0.12
    numbers = _numbers(ref, out, loose)
    assert numbers["max_logit_error_ratio"] <= 1.0
    assert verdict(numbers, loose) == [f"probabilities: max |Δσ| {numbers['max_abs_prob_diff']:.3g} > 1e-03"]


def test_mask_flips_count_outside_the_probability_band():
    ref = np.full((1, 1, 40, 50), -5.0, np.float32)
    ref[0, 0, 10:30, 10:40] = 5.0  # 600 pixels
    ref[0, 0, 0, 0] = -1e-3  # undecided: σ within 1e-3 of 0.5
    out = ref.copy()
    out[0, 0, 0, 0] = 1e-3
    numbers = compare_masks(ref, out, TOL)
    assert numbers == {"min_mask_iou": 1.0, "mask_pixels_flipped": 1}
    out[0, 0, 0, 1] = 1.0  # a decided background pixel turned foreground
    numbers = compare_masks(ref, out, TOL)
    assert numbers["min_mask_iou"] == pytest.approx(600 / 601) and numbers["mask_pixels_flipped"] == 2


def test_nan_and_inf_never_pass():
    ref = _logits(10.0)
    for bad in (np.nan, np.inf):
        out = ref.copy()
        out[0, 0, 5, 5] = bad
        numbers = _numbers(ref, out)
        assert math.isinf(numbers["max_logit_error_ratio"]) and numbers["max_abs_prob_diff"] > TOL.max_abs_prob_diff
        assert verdict(numbers, TOL)


def test_zero_tolerances_mean_bitwise_equality():
    exact = Tolerances(max_abs_logit_diff=0.0, logit_rtol=0.0, max_abs_prob_diff=0.0, min_mask_iou=1.0)
    ref = _logits(3.0)
    assert verdict(_numbers(ref, ref.copy(), exact), exact) == []
    out = ref.copy()
    out[0, 0, 0, 0] = np.nextafter(out[0, 0, 0, 0], np.float32(np.inf))
    assert verdict(_numbers(ref, out, exact), exact)


@pytest.mark.parametrize("field,value", [("logit_rtol", -1e-3), ("max_abs_prob_diff", float("nan")),
                                         ("max_abs_logit_diff", float("inf")), ("min_mask_iou", "high")])
def test_bad_tolerances_are_config_errors(field, value):
    with pytest.raises(ConfigError, match=f"export.{field}"):
        Tolerances(**{field: value})
