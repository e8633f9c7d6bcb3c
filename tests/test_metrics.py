"""Verification metrics against independent oracles: brute force, hand-made lists, SpeechBrain, Kaldi formulas."""

from __future__ import annotations

import importlib.util
import json
from operator import itemgetter

import numpy as np
import pytest
import torch

from qmargin_spk.metrics import compute_metrics, det, det_available, operating_points, plot_det

# ---------------------------------------------------------------- oracles


def brute_force(scores, labels, p_targets, fars):
    """Every distinct threshold (accept score >= t) plus reject-all, O(N^2)."""
    scores = np.asarray(scores, dtype=float)
    labels = np.asarray(labels).astype(bool)
    pos, neg = scores[labels], scores[~labels]
    thresholds = sorted(set(scores.tolist())) + [np.inf]
    points = [(t, np.mean(pos < t), np.mean(neg >= t)) for t in thresholds]  # (t, fnr, fpr)

    eer = None
    for (_t0, fnr0, fpr0), (_t1, fnr1, fpr1) in zip(points, points[1:]):
        if fnr0 - fpr0 < 0 <= fnr1 - fpr1:
            # Where the straight segment (fpr0, fnr0) -> (fpr1, fnr1) meets fnr = fpr.
            step = (fpr0 - fnr0) / ((fnr1 - fnr0) - (fpr1 - fpr0))
            eer = fnr0 + step * (fnr1 - fnr0)
            break
    min_dcf = {p: min(p * fnr + (1 - p) * fpr for _, fnr, fpr in points) / min(p, 1 - p) for p in p_targets}
    tar = {}
    for far in fars:
        if far * neg.size < 10:
            tar[far] = None
        else:
            tar[far] = max(1 - fnr for _, fnr, fpr in points if fpr <= far)
    return eer, min_dcf, tar


def kaldi_oracle(scores, labels, p_target):
    """Kaldi sid/compute_min_dcf.py (error rates + ComputeMinDcf) and WeSpeaker's compute_eer, as loops."""
    ordered = sorted(enumerate(scores), key=itemgetter(1))  # stable, like Kaldi
    sorted_labels = [int(labels[i]) for i, _ in ordered]
    sorted_scores = [s for _, s in ordered]
    n_target = sum(sorted_labels)
    n_nontarget = len(sorted_labels) - n_target
    fnrs, fprs, tgt, non = [], [], 0, 0
    for label in sorted_labels:
        tgt += label
        non += 1 - label
        fnrs.append(tgt / n_target)
        fprs.append(1 - non / n_nontarget)
    best, best_threshold = float("inf"), sorted_scores[0]
    for i in range(len(fnrs)):
        cost = fnrs[i] * p_target + fprs[i] * (1 - p_target)
        if cost < best:
            best, best_threshold = cost, sorted_scores[i]
    min_dcf = best / min(p_target, 1 - p_target)
    fnr, fpr = np.array(fnrs), np.array(fprs)
    x1 = np.flatnonzero(fnr - fpr >= 0)[0]
    x2 = np.flatnonzero(fnr - fpr < 0)[-1]
    a = (fnr[x1] - fpr[x1]) / (fpr[x2] - fpr[x1] - (fnr[x2] - fnr[x1]))
    return fnr[x1] + a * (fnr[x2] - fnr[x1]), sorted_scores[x1], min_dcf, best_threshold


def random_trials(seed, n, decimals=None, target_fraction=0.4):
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < target_fraction).astype(int)
    labels[:2] = [0, 1]
    scores = rng.normal(size=n) + 1.5 * labels
    if decimals is not None:
        scores = np.round(scores, decimals)
    return scores, labels


P_TARGETS = (0.01, 0.05, 0.3)
FARS = (0.01, 0.05, 0.1, 0.3)


# ---------------------------------------------------------------- default convention


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("decimals", [None, 2, 1])
def test_default_matches_brute_force(seed, decimals):
    scores, labels = random_trials(seed, 400, decimals)
    metrics = compute_metrics(scores, labels, p_targets=P_TARGETS, fars=FARS)
    eer, min_dcf, tar = brute_force(scores, labels, P_TARGETS, FARS)
    assert metrics.eer == pytest.approx(eer, abs=1e-12)
    for p in P_TARGETS:
        assert metrics.min_dcf_at(p).value == pytest.approx(min_dcf[p], abs=1e-12)
    for far in FARS:
        if tar[far] is None:
            assert metrics.tar_at(far).tar is None
        else:
            assert metrics.tar_at(far).tar == pytest.approx(tar[far], abs=1e-12)


def test_thresholds_reach_the_reported_rates():
    scores, labels = random_trials(7, 500, decimals=1)
    metrics = compute_metrics(scores, labels, p_targets=(0.05,), fars=(0.1,))
    pos, neg = scores[labels == 1], scores[labels == 0]
    dcf = metrics.min_dcf_at(0.05)
    at = dcf.threshold
    assert (0.05 * np.mean(pos < at) + 0.95 * np.mean(neg >= at)) / 0.05 == pytest.approx(dcf.value)
    tar = metrics.tar_at(0.1)
    assert np.mean(pos >= tar.threshold) == pytest.approx(tar.tar)
    assert np.mean(neg >= tar.threshold) <= 0.1


def test_hand_made_separable():
    metrics = compute_metrics([0.1, 0.2, 0.3, 0.4], [0, 0, 1, 1], fars=())
    assert metrics.eer == 0.0 and metrics.eer_threshold == 0.3
    assert metrics.min_dcf_at(0.01).value == 0.0 and metrics.min_dcf_at(0.01).threshold == 0.3


def test_hand_made_ties_grouped():
    # Distinct scores 0.1, 0.5, 0.9; (FNR, FPR) = (0, 1), (0, 2/3), (2/3, 0), reject-all (1, 0).
    scores = [0.5, 0.5, 0.5, 0.5, 0.9, 0.1]
    labels = [1, 1, 0, 0, 1, 0]
    metrics = compute_metrics(scores, labels, fars=(0.5,))
    assert metrics.eer == pytest.approx(1 / 3)  # segment (2/3, 0) -> (0, 2/3) meets the diagonal at 1/3
    assert metrics.eer_threshold == 0.9
    assert metrics.min_dcf_at(0.01).value == pytest.approx(2 / 3)  # 0.01 * 2/3 / 0.01
    assert metrics.min_dcf_at(0.05).value == pytest.approx(2 / 3)
    assert metrics.min_dcf_at(0.01).threshold == 0.9
    assert (metrics.n_target, metrics.n_nontarget) == (3, 3)
    tar = metrics.tar_at(0.5)
    assert tar.tar is None and tar.reason.startswith("not enough non-target trials")
    # Kaldi does not group ties: the order inside the tie decides (here 1, 1, 0, 0 -> EER 2/3).
    kaldi = compute_metrics(scores, labels, convention="kaldi")
    assert kaldi.eer == pytest.approx(2 / 3) and kaldi.eer_threshold == 0.5
    reordered = compute_metrics([0.5, 0.5, 0.5, 0.5, 0.9, 0.1], [0, 0, 1, 1, 1, 0], convention="kaldi")
    assert reordered.eer != kaldi.eer


def test_hand_made_tar_at_far():
    # 20 non-targets at 0..19, targets at 5.5, 10.5, 15.5, 18.5, 25.
    scores = np.r_[np.arange(20.0), [5.5, 10.5, 15.5, 18.5, 25.0]]
    labels = np.r_[np.zeros(20, int), np.ones(5, int)]
    metrics = compute_metrics(scores, labels, fars=(0.5, 0.25, 0.05))
    # FAR 0.5 allows 10 false accepts: the lowest such threshold is 10, accepting 4 of 5 targets.
    assert metrics.tar_at(0.5).tar == pytest.approx(0.8) and metrics.tar_at(0.5).threshold == 10.0
    # 0.25 * 20 = 5 < 10 false accepts: not reported.
    assert metrics.tar_at(0.25).tar is None and metrics.tar_at(0.25).threshold is None
    assert "not enough non-target trials" in metrics.tar_at(0.05).reason


def test_default_is_invariant_to_trial_order():
    scores, labels = random_trials(3, 300, decimals=1)
    order = np.random.default_rng(0).permutation(scores.size)
    assert compute_metrics(scores, labels) == compute_metrics(scores[order], labels[order])


def test_accepts_bool_labels_and_torch_tensors():
    scores, labels = random_trials(4, 100)
    reference = compute_metrics(scores, labels)
    assert compute_metrics(torch.tensor(scores), torch.tensor(labels).bool()) == reference
    assert compute_metrics(scores.tolist(), labels.astype(float)) == reference


def test_operating_points_end_points():
    points = operating_points([0.3, 0.1, 0.2, 0.2], [1, 0, 1, 0])
    np.testing.assert_allclose(points.fnr, [0, 0, 0.5, 1])
    np.testing.assert_allclose(points.fpr, [1, 0.5, 0, 0])
    assert points.thresholds[-1] > 0.3 and points.thresholds[-1] == np.nextafter(0.3, 1)


def test_to_dict_is_json():
    scores, labels = random_trials(5, 200)
    data = json.loads(json.dumps(compute_metrics(scores, labels).to_dict(), allow_nan=False))
    assert set(data["min_dcf"]) == {"0.01", "0.05"}
    assert set(data["tar_at_far"]) == {"0.01", "0.001", "0.0001", "1e-05"}
    assert data["tar_at_far"]["1e-05"]["tar"] is None
    assert data["min_dcf_normalised"] is True


# ---------------------------------------------------------------- SpeechBrain and Kaldi conventions


def _speechbrain_cases():
    rng = np.random.default_rng(11)
    for case in range(40):
        n_target, n_nontarget = int(rng.integers(1, 30)), int(rng.integers(1, 90))
        if case % 2:
            n_target, n_nontarget = n_nontarget, n_target
        labels = np.r_[np.ones(n_target, int), np.zeros(n_nontarget, int)]
        rng.shuffle(labels)
        scores = rng.normal(size=labels.size) + rng.uniform(0, 3) * labels
        if case % 3 == 0:
            scores = np.round(scores, 1)
        yield scores, labels


def test_speechbrain_convention_is_exact():
    from speechbrain.utils.metric_stats import EER, minDCF

    for scores, labels in _speechbrain_cases():
        positive = torch.tensor(scores[labels == 1])
        negative = torch.tensor(scores[labels == 0])
        ours = compute_metrics(scores, labels, p_targets=(0.01, 0.05, 0.5), convention="speechbrain")
        assert (ours.eer, ours.eer_threshold) == EER(positive, negative)
        for p in (0.01, 0.05, 0.5):
            entry = ours.min_dcf_at(p)
            assert (entry.value, entry.threshold) == minDCF(positive, negative, p_target=p)
        assert ours.min_dcf_normalised is False


# Lists where SpeechBrain's float32 arithmetic matters: its EER scan ends on a midpoint
# threshold (float32 |FAR - FRR| below the exact gap), and its float32 costs pick
# another minimum than float64 costs would.
FLOAT32_CORNER_CASES = [
    ([0.6, 1.3, 0.9, 0.3, 0.6, -1.5, -0.3, -1.3], [1, 1, 0, 0, 0, 0, 0, 0]),
    ([0.3, 0.3, -0.0, 1.3, 1.1, 1.6, 0.3, -1.0], [1, 1, 1, 1, 1, 1, 0, 0]),
    (
        [
            -0.8,
            0.2,
            0.9,
            1.6,
            0.6,
            -0.1,
            -0.3,
            1.2,
            1.6,
            0.3,
            -1.2,
            -1.0,
            1.6,
            0.2,
            -1.7,
            -0.1,
            -1.2,
            -0.6,
            -0.5,
            -0.7,
            0.6,
            -0.1,
            -0.6,
            0.4,
            0.8,
            -1.6,
            -0.3,
            -1.0,
            -0.2,
            -1.3,
            0.0,
            -0.0,
            -0.3,
            -1.0,
            -0.4,
            -1.1,
            -1.4,
            0.2,
            -1.1,
            1.2,
            0.7,
            -2.0,
            0.3,
            -1.1,
            0.0,
            0.0,
            -2.0,
            -0.2,
            -0.3,
            1.0,
            -1.2,
            0.7,
            -1.1,
            -0.3,
            -0.8,
            1.4,
        ],
        [1] * 8 + [0] * 48,
    ),
]


@pytest.mark.parametrize("scores, labels", FLOAT32_CORNER_CASES)
def test_speechbrain_convention_float32_corner_cases(scores, labels):
    from speechbrain.utils.metric_stats import EER, minDCF

    scores, labels = np.array(scores), np.array(labels)
    positive, negative = torch.tensor(scores[labels == 1]), torch.tensor(scores[labels == 0])
    ours = compute_metrics(scores, labels, p_targets=(0.01, 0.05), convention="speechbrain")
    assert (ours.eer, ours.eer_threshold) == EER(positive, negative)
    for p in (0.01, 0.05):
        assert (ours.min_dcf_at(p).value, ours.min_dcf_at(p).threshold) == minDCF(positive, negative, p_target=p)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("decimals", [None, 1])
def test_kaldi_convention_matches_formula(seed, decimals):
    scores, labels = random_trials(seed, 300, decimals)
    for p in (0.01, 0.05):
        eer, eer_threshold, min_dcf, dcf_threshold = kaldi_oracle(scores.tolist(), labels.tolist(), p)
        ours = compute_metrics(scores, labels, p_targets=(p,), convention="kaldi")
        assert ours.eer == pytest.approx(eer, abs=1e-15) and ours.eer_threshold == eer_threshold
        assert ours.min_dcf_at(p).value == pytest.approx(min_dcf, abs=1e-15)
        assert ours.min_dcf_at(p).threshold == dcf_threshold


def test_conventions_agree_on_continuous_scores():
    scores, labels = random_trials(8, 3000)
    default = compute_metrics(scores, labels)
    kaldi = compute_metrics(scores, labels, convention="kaldi")
    speechbrain = compute_metrics(scores, labels, convention="speechbrain")
    assert kaldi.eer == pytest.approx(default.eer, abs=1e-12)
    assert kaldi.min_dcf_at(0.01).value == pytest.approx(default.min_dcf_at(0.01).value, abs=1e-12)
    step = 1 / min(default.n_target, default.n_nontarget)
    assert abs(speechbrain.eer - default.eer) <= step
    raw = default.min_dcf_at(0.01).value * 0.01  # SpeechBrain does not normalise
    assert speechbrain.min_dcf_at(0.01).value == pytest.approx(raw, abs=1e-6)


# ---------------------------------------------------------------- input errors


@pytest.mark.parametrize(
    "scores, labels, message",
    [
        ([], [], "empty"),
        ([0.1, 0.2], [0, 1, 1], "length mismatch"),
        ([0.1, 0.2], [1, 1], "only target"),
        ([0.1, 0.2], [0, 0], "only non-target"),
        ([0.1, float("nan")], [0, 1], "NaN or inf"),
        ([0.1, float("inf")], [0, 1], "NaN or inf"),
        ([0.1, 0.2, 0.3], [0, 1, 2], "labels must be 0 or 1"),
        ([0.1, 0.2, 0.3], [0, 1, 0.5], "labels must be 0 or 1"),
        ([[0.1, 0.2]], [[0, 1]], "1-D"),
    ],
)
def test_bad_input_raises(scores, labels, message):
    with pytest.raises(ValueError, match=message):
        compute_metrics(scores, labels)


def test_unknown_convention_raises():
    with pytest.raises(ValueError, match="unknown convention"):
        compute_metrics([0.1, 0.2], [0, 1], convention="nist")


# ---------------------------------------------------------------- DET plot


@pytest.mark.skipif(not det_available(), reason="matplotlib not installed")
def test_plot_det_writes_png(tmp_path):
    scores, labels = random_trials(9, 2000)
    path = tmp_path / "plots" / "det.png"
    plot_det(scores, labels, path, title="random")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["det.png"]  # no temporary left behind


def test_det_unavailable_without_matplotlib(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a)
    )
    assert det.det_available() is False
    with pytest.raises(RuntimeError, match="matplotlib"):
        plot_det([0.1, 0.2], [0, 1], tmp_path / "det.png")
    assert not (tmp_path / "det.png").exists()


def test_probit_matches_normal_quantiles():
    from statistics import NormalDist

    probabilities = np.array([1e-4, 0.01, 0.3, 0.5, 0.9])
    expected = [NormalDist().inv_cdf(p) for p in probabilities]
    np.testing.assert_allclose(det.probit(probabilities), expected, rtol=1e-10)
