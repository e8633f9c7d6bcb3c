"""Cllr, min Cllr and actual DCF against closed forms, hand-made lists and brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qmargin_spk.calibration import (
    actual_dcf,
    bayes_threshold,
    calibration_metrics,
    cllr,
    llr_metrics,
    min_cllr,
)
from qmargin_spk.metrics import compute_metrics


def test_cllr_closed_form_on_hand_made_list():
    # Targets at LLR 0 and log 3, non-targets at -log 3 and 0:
    # each side costs (log2(1 + 1) + log2(1 + 1/3)) / 2, so Cllr = (1 + log2(4/3)) / 2.
    llrs = [0.0, math.log(3), -math.log(3), 0.0]
    labels = [1, 1, 0, 0]
    assert cllr(llrs, labels) == pytest.approx((1 + math.log2(4 / 3)) / 2, abs=1e-15)


def test_cllr_of_uninformative_llrs_is_one_and_of_certain_correct_llrs_is_zero():
    labels = np.array([1, 0, 0, 1, 0])
    assert cllr(np.zeros(5), labels) == pytest.approx(1.0, abs=1e-15)
    assert cllr(np.where(labels == 1, np.inf, -np.inf), labels) == 0.0
    assert cllr(np.where(labels == 1, -np.inf, np.inf), labels) == np.inf


def test_cllr_against_float64_loop():
    rng = np.random.default_rng(0)
    labels = rng.random(500) < 0.3
    llrs = rng.normal(2 * labels - 1, 3.0)
    loop_t = [math.log2(1 + math.exp(-x)) for x, y in zip(llrs, labels) if y]
    loop_n = [math.log2(1 + math.exp(x)) for x, y in zip(llrs, labels) if not y]
    assert cllr(llrs, labels) == pytest.approx((np.mean(loop_t) + np.mean(loop_n)) / 2, rel=1e-12)


def test_min_cllr_hand_made_pav():
    # Sorted: 0 (non), 1 (tar), 2 (non), 3 (tar). PAV pools the violating middle pair to 0.5:
    # posteriors 0, 0.5, 0.5, 1 -> LLRs -inf, 0, 0, +inf at a 1:1 prior -> Cllr = (1/2 + 1/2) / 2.
    assert min_cllr([1.0, 3.0, 0.0, 2.0], [1, 1, 0, 0]) == pytest.approx(0.5, abs=1e-15)


def test_min_cllr_pools_ties():
    # All four trials tie: one block, posterior 1/2 = the prior -> LLR 0 everywhere -> min Cllr 1.
    assert min_cllr([0.3, 0.3, 0.3, 0.3], [1, 0, 1, 0]) == pytest.approx(1.0, abs=1e-15)
    # A target and a non-target tied in the middle stay one block (posterior 0.5); splitting the
    # tie with the non-target first would give 0.
    assert min_cllr([0.0, 1.0, 1.0, 2.0], [0, 1, 0, 1]) == pytest.approx(0.5, abs=1e-15)


def test_min_cllr_of_perfectly_separated_scores_is_zero():
    assert min_cllr([0.1, 0.2, 0.5, 0.9, 1.3], [0, 0, 1, 1, 1]) == 0.0


def test_min_cllr_is_invariant_to_increasing_maps_and_below_cllr():
    rng = np.random.default_rng(1)
    labels = rng.random(2000) < 0.2
    scores = rng.normal(1.5 * labels, 1.0)
    value = min_cllr(scores, labels)
    assert min_cllr(np.exp(scores), labels) == pytest.approx(value, abs=1e-12)
    for llrs in (scores, 3 * scores - 2, 0.2 * scores + 1):
        assert value <= cllr(llrs, labels) + 1e-12
    assert 0 < value < 1


def test_actual_dcf_hand_made():
    # P = 0.01: Bayes threshold log(99) = 4.595. Targets 5, 1 -> one miss of two;
    # non-targets -1, 4.6 -> one false alarm of two. Cost (0.01 * 0.5 + 0.99 * 0.5) / 0.01 = 50.
    result = actual_dcf([5.0, 1.0, -1.0, 4.6], [1, 1, 0, 0], 0.01)
    assert result.threshold == pytest.approx(math.log(99))
    assert result.value == pytest.approx(50.0)
    # P = 0.5: threshold 0; no miss (1 >= 0), false alarm 4.6 of two -> (0.5 * 0 + 0.5 * 0.5) / 0.5.
    assert actual_dcf([5.0, 1.0, -1.0, 4.6], [1, 1, 0, 0], 0.5).value == pytest.approx(0.5)


def test_actual_dcf_is_never_below_min_dcf():
    rng = np.random.default_rng(2)
    labels = rng.random(3000) < 0.5
    llrs = rng.normal(3 * labels - 1, 1.5)
    metrics = compute_metrics(llrs, labels, p_targets=(0.01, 0.05, 0.5))
    calibration = calibration_metrics(llrs, labels, p_targets=(0.01, 0.05, 0.5))
    for p in (0.01, 0.05, 0.5):
        assert calibration.act_dcf_at(p).value >= metrics.min_dcf_at(p).value - 1e-12


def test_bayes_threshold():
    assert bayes_threshold(0.5) == 0.0
    assert bayes_threshold(0.01) == pytest.approx(math.log(99))
    with pytest.raises(ValueError, match="p_target"):
        bayes_threshold(1.0)


def test_llr_metrics_add_calibration_keys_to_the_verification_metrics():
    rng = np.random.default_rng(3)
    labels = rng.random(400) < 0.5
    llrs = rng.normal(2 * labels - 1, 1.0)
    plain = compute_metrics(llrs, labels).to_dict()
    with_llr = llr_metrics(llrs, labels)
    assert {k: with_llr[k] for k in plain} == plain
    assert set(with_llr) - set(plain) == {"cllr", "min_cllr", "act_dcf"}
    assert set(with_llr["act_dcf"]) == set(plain["min_dcf"])
    direct = calibration_metrics(llrs, labels)
    assert with_llr["cllr"] == direct.cllr and with_llr["min_cllr"] == direct.min_cllr


def test_calibration_metrics_accept_infinite_llrs_but_not_nan():
    metrics = calibration_metrics([np.inf, 2.0, -np.inf, -1.0], [1, 1, 0, 0])
    assert metrics.min_cllr == 0.0 and metrics.cllr > 0
    with pytest.raises(ValueError, match="NaN"):
        cllr([np.nan, 1.0], [1, 0])
    with pytest.raises(ValueError, match="only target"):
        cllr([1.0, 2.0], [1, 1])
