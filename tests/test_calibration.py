"""Logistic-regression calibration against the closed-form LLR of Gaussian scores, and quality measures."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from qmargin_spk.calibration import (
    Calibration,
    calibration_metrics,
    cllr,
    fit_calibration,
    imposter_means,
    trial_quality,
    utterance_quality,
)
from qmargin_spk.metrics import compute_metrics

MU_TARGET, MU_NONTARGET, SIGMA = 0.6, 0.1, 0.12
# Equal-variance Gaussians: log N(s; mu_t, sigma) - log N(s; mu_n, sigma) = a s + b with
TRUE_SLOPE = (MU_TARGET - MU_NONTARGET) / SIGMA**2
TRUE_OFFSET = (MU_NONTARGET**2 - MU_TARGET**2) / (2 * SIGMA**2)


def gaussian_trials(n_target, n_nontarget, seed):
    rng = np.random.default_rng(seed)
    scores = np.r_[rng.normal(MU_TARGET, SIGMA, n_target), rng.normal(MU_NONTARGET, SIGMA, n_nontarget)]
    labels = np.r_[np.ones(n_target, int), np.zeros(n_nontarget, int)]
    return scores, labels


@pytest.mark.parametrize("prior", [0.5, 0.05])
def test_fit_recovers_the_closed_form_llr_whatever_the_class_balance(prior):
    scores, labels = gaussian_trials(4000, 40000, seed=0)  # 1:10 proportions must not shift the offset
    calibration = fit_calibration(scores, labels, prior=prior)
    (slope,) = calibration.weights
    assert slope == pytest.approx(TRUE_SLOPE, rel=0.05)
    assert calibration.offset == pytest.approx(TRUE_OFFSET, abs=0.05 * abs(TRUE_OFFSET))
    grid = np.linspace(0, 0.7, 8)
    np.testing.assert_allclose(calibration.llrs({"score": grid}), TRUE_SLOPE * grid + TRUE_OFFSET, atol=0.5)


def test_calibrated_llrs_beat_raw_scores_and_reach_min_dcf_on_held_out_trials():
    train_scores, train_labels = gaussian_trials(3000, 30000, seed=1)
    test_scores, test_labels = gaussian_trials(3000, 30000, seed=2)
    calibration = fit_calibration(train_scores, train_labels)
    llrs = calibration.llrs({"score": test_scores})
    raw = calibration_metrics(test_scores, test_labels, p_targets=(0.01, 0.05))
    verification = compute_metrics(llrs, test_labels, p_targets=(0.01, 0.05))
    calibrated = calibration_metrics(llrs, test_labels, p_targets=(0.01, 0.05))
    assert calibrated.cllr < raw.cllr
    assert calibrated.cllr - calibrated.min_cllr < 0.01  # calibration loss nearly gone
    for p in (0.01, 0.05):
        min_dcf = verification.min_dcf_at(p).value
        assert calibrated.act_dcf_at(p).value - min_dcf < 0.1 * min_dcf + 0.01
        # The raw cosine at the same Bayes threshold is far off.
        assert raw.act_dcf_at(p).value > 0.9
    # And the true LLR itself is no better than the fitted one (up to sampling noise).
    assert cllr(TRUE_SLOPE * test_scores + TRUE_OFFSET, test_labels) == pytest.approx(calibrated.cllr, abs=0.01)


def test_quality_inputs_recover_their_weight():
    # Scores whose class-conditional means shift with a quality measure q: LLR = a s + c q + b.
    rng = np.random.default_rng(3)
    n = 20000
    labels = rng.random(n) < 0.3
    q = rng.normal(0, 1, n)
    shift = 0.1 * q
    scores = rng.normal(np.where(labels, MU_TARGET, MU_NONTARGET) + shift, SIGMA)
    calibration = fit_calibration(scores, labels, quality={"q": q})
    # log N(s - 0.1 q; mu_t) - log N(s - 0.1 q; mu_n) = a (s - 0.1 q) + b.
    assert calibration.inputs == ("score", "q")
    assert calibration.weights[0] == pytest.approx(TRUE_SLOPE, rel=0.05)
    assert calibration.weights[1] == pytest.approx(-0.1 * TRUE_SLOPE, rel=0.1)
    with_q = cllr(calibration.llrs({"score": scores, "q": q}), labels)
    without_q = cllr(fit_calibration(scores, labels).llrs({"score": scores}), labels)
    assert with_q < without_q


def test_json_round_trip(tmp_path):
    scores, labels = gaussian_trials(200, 600, seed=4)
    calibration = fit_calibration(scores, labels, quality={"x": np.arange(800.0)}, cohort={"file": "c.npy", "top_n": 5})
    path = tmp_path / "calibration.json"
    calibration.save(path)
    assert json.loads(path.read_text())["inputs"] == ["score", "x"]
    assert Calibration.load(path) == calibration


def test_bad_calibration_files_and_inputs(tmp_path):
    path = tmp_path / "calibration.json"
    path.write_text('{"format": 99}')
    with pytest.raises(ValueError, match=f"{path}: not a calibration file"):
        Calibration.load(path)
    calibration = Calibration(inputs=("score", "q"), weights=(1.0, 2.0), offset=0.5, prior=0.5)
    with pytest.raises(ValueError, match="missing"):
        calibration.llrs({"score": [1.0]})
    with pytest.raises(ValueError, match="'q' has NaN"):
        calibration.llrs({"score": [1.0], "q": [math.nan]})
    assert calibration.llrs({"score": [1.0], "q": [2.0]}).tolist() == [1.0 + 4.0 + 0.5]
    with pytest.raises(ValueError, match="constant"):
        fit_calibration([0.1, 0.2, 0.3, 0.4], [1, 0, 1, 0], quality={"q": [1.0] * 4})
    with pytest.raises(ValueError, match="first calibration input"):
        Calibration(inputs=("q",), weights=(1.0,), offset=0.0, prior=0.5)


def test_imposter_means_against_brute_force():
    rng = np.random.default_rng(5)
    embeddings, cohort = rng.normal(size=(6, 4)), rng.normal(size=(9, 4))
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    expected = np.sort(unit(embeddings) @ unit(cohort).T, axis=1)[:, -3:].mean(axis=1)
    np.testing.assert_allclose(imposter_means(embeddings, cohort, top_n=3), expected, atol=1e-12)
    per_utt = utterance_quality([1.0, 2.0, 4.0, 0.5, 3.0, 1.5], embeddings, cohort, top_n=3)
    trials = trial_quality(per_utt, [0, 2], [1, 5])
    np.testing.assert_allclose(trials["log_duration_enrol"], np.log([1.0, 4.0]))
    np.testing.assert_allclose(trials["imposter_mean_test"], expected[[1, 5]], atol=1e-12)
