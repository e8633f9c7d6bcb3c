"""Pooling over seeds: coverage on simulated studies with known seed and speaker effects, hand computations.

The simulated study: one fixed trial list (20 speakers x 4 utterances, all 120 within-speaker
pairs as targets and 280 random cross-speaker pairs as non-targets, 400 trials). A study draws a
new test set (speaker and utterance effects) and trains two systems with S seeds each. Scores of
run (system x, seed i), trial between utterances j, k of speakers s, t:

    target:     MU_x + a_s + [x = b] g_s + delta_xi + u_j + u_k + e
    non-target:        b_s + b_t               + u_j + u_k + e

``a``, ``b``, ``u`` are test-set effects shared by every run; ``g`` is a speaker x system effect
(system b suits some speakers better), shared by b's seeds; ``delta_xi ~ N(0, TAU^2)`` is the seed
effect (a run's quality) and ``e ~ N(0, 1)`` each run's own trial noise. For a seed with effect
``delta``, system x's population EER (infinitely many speakers) is ``Phi(-(MU_x + delta) / c_x)``
with ``c_x = sd_target + sd_nontarget`` (target scores N(MU_x + delta, sd_target^2), non-targets
N(0, sd_nontarget^2)), so averaged over seeds it is ``E Phi(-(MU_x + delta) / c_x) =
Phi(-MU_x / sqrt(c_x^2 + TAU^2))``. The true value of the pooled difference is
``E_seeds[EER_b - EER_a]``, the difference of those two closed forms. (The EER of a finite
20-speaker list is a slightly biased estimate of the population EER, by 0.2-0.3 points here, far
below the intervals' half-widths; the coverage test checks that the studies' average estimate
lies within 4 standard errors of the closed form.)
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest

from qmargin_spk.metrics import SpeakerBootstrap, bootstrap_metrics, compute_metrics, paired_comparison
from qmargin_spk.metrics.pooled import (
    MIN_SEEDS,
    pool_difference,
    pool_replicates,
    pool_system,
    pool_systems_against_baseline,
    student_t_quantile,
    student_t_two_sided_p,
)

N_SPEAKERS, UTTS = 20, 4
N_NONTARGET = 280
MU_A, MU_B = 2.5, 2.9
SPEAKER_TARGET_SD, SPEAKER_NONTARGET_SD, UTTERANCE_SD = 0.6, 0.4, 0.3
SYSTEM_BY_SPEAKER_SD = 0.5  # g_s
SEED_SD = 0.5  # TAU: a large seed effect (a run's EER moves by about 5 points)
STUDIES, RESAMPLES, MAX_SEEDS = 200, 200, 5
# Two-sided 95 % quantiles of Student's t (printed tables) and of the normal distribution.
T_975 = {2: 4.302653, 4: 2.776445, 10: 2.228139}
Z_975 = 1.959964


def trial_list(seed: int = 0):
    """Speaker of each utterance, enrol and test utterance of each trial, labels (VoxCeleb-style speaker names)."""
    rng = np.random.default_rng(seed)
    speaker = np.repeat(np.arange(N_SPEAKERS), UTTS)
    first, second = np.triu_indices(UTTS, k=1)
    offsets = np.arange(N_SPEAKERS)[:, None] * UTTS
    enrol_speaker = rng.integers(0, N_SPEAKERS, N_NONTARGET)
    test_speaker = (enrol_speaker + rng.integers(1, N_SPEAKERS, N_NONTARGET)) % N_SPEAKERS
    enrol = np.r_[(offsets + first).ravel(), enrol_speaker * UTTS + rng.integers(0, UTTS, N_NONTARGET)]
    test = np.r_[(offsets + second).ravel(), test_speaker * UTTS + rng.integers(0, UTTS, N_NONTARGET)]
    labels = np.r_[np.ones(enrol.size - N_NONTARGET, bool), np.zeros(N_NONTARGET, bool)]
    return speaker, enrol, test, labels


SPEAKER, ENROL, TEST, LABELS = trial_list()
NAMES = np.array([f"id{s:05d}" for s in range(N_SPEAKERS)])
ENROL_SPEAKERS, TEST_SPEAKERS = list(NAMES[SPEAKER[ENROL]]), list(NAMES[SPEAKER[TEST]])


def simulated_study(study: int, seed_sd: float = SEED_SD):
    """Scores ``(seeds, trials)`` of systems a and b on one freshly drawn test set."""
    rng = np.random.default_rng(10_000 + study)
    a = rng.normal(0, SPEAKER_TARGET_SD, N_SPEAKERS)
    b = rng.normal(0, SPEAKER_NONTARGET_SD, N_SPEAKERS)
    g = rng.normal(0, SYSTEM_BY_SPEAKER_SD, N_SPEAKERS)
    u = rng.normal(0, UTTERANCE_SD, SPEAKER.size)
    es, ts = SPEAKER[ENROL], SPEAKER[TEST]
    shared = np.where(LABELS, a[es], b[es] + b[ts]) + u[ENROL] + u[TEST]
    shape = (MAX_SEEDS, LABELS.size)

    def runs(mu, extra):
        seed_effect = rng.normal(0, seed_sd, (MAX_SEEDS, 1))
        return shared + LABELS * (mu + extra + seed_effect) + rng.normal(size=shape)

    return runs(MU_A, 0.0), runs(MU_B, g[es])


def true_difference(seed_sd: float = SEED_SD) -> float:
    """``E_seeds[EER_b - EER_a]`` over the population of speakers (closed form, see the module docstring)."""
    sd_nontarget = math.sqrt(1 + 2 * SPEAKER_NONTARGET_SD**2 + 2 * UTTERANCE_SD**2)
    target_variance = 1 + SPEAKER_TARGET_SD**2 + 2 * UTTERANCE_SD**2

    def mean_eer(mu, variance):
        spread = math.sqrt(variance) + sd_nontarget
        return NormalDist().cdf(-mu / math.sqrt(spread**2 + seed_sd**2))

    return mean_eer(MU_B, target_variance + SYSTEM_BY_SPEAKER_SD**2) - mean_eer(MU_A, target_variance)


def test_pooled_interval_covers_the_true_difference_and_speakers_alone_do_not():
    """200 studies: the pooled 95 % interval covers the truth 90-99 % at 3 and 5 seeds; speakers only, far less."""
    truth = true_difference()
    bootstrap = SpeakerBootstrap(
        LABELS, ENROL_SPEAKERS, TEST_SPEAKERS, {n: n for n in NAMES}, RESAMPLES, seed=1, p_targets=(), fars=()
    )
    covered = {3: 0, 5: 0}
    speakers_only_covered = {3: 0, 5: 0}
    estimates = []
    for study in range(STUDIES):
        scores_a, scores_b = simulated_study(study)
        points, values = [], []
        for run_a, run_b in zip(scores_a, scores_b):
            rep_a, rep_b = bootstrap.replicates(run_a), bootstrap.replicates(run_b)
            points.append(rep_b.point.eer - rep_a.point.eer)
            values.append(rep_b.values[0] - rep_a.values[0])
        points, values = np.array(points), np.array(values)
        for n_seeds in covered:
            entry = pool_replicates(points[:n_seeds], values[:n_seeds], is_difference=True)
            covered[n_seeds] += entry.low <= truth <= entry.high
            # What a speaker bootstrap of the seed mean alone says (no seed spread).
            low, high = np.percentile(values[:n_seeds].mean(axis=0), [2.5, 97.5])
            speakers_only_covered[n_seeds] += low <= truth <= high
        estimates.append(points.mean())
    # The closed form is what the pooled mean estimates: the 200 studies' average is within 4 standard errors.
    assert abs(np.mean(estimates) - truth) < 4 * np.std(estimates) / math.sqrt(STUDIES), (np.mean(estimates), truth)
    for n_seeds in covered:
        coverage, speakers_only = covered[n_seeds] / STUDIES, speakers_only_covered[n_seeds] / STUDIES
        assert 0.90 <= coverage <= 0.99, (n_seeds, coverage)
        assert speakers_only <= 0.80 and speakers_only <= coverage - 0.15, (n_seeds, speakers_only, coverage)


# ---------------------------------------------------------------- hand computations


@pytest.mark.parametrize("points", [[0.10, 0.13, 0.07], [0.02, -0.01, 0.04, 0.00, 0.05]])
def test_without_speaker_variation_the_interval_is_the_seed_t_interval(points):
    """Every resample equals the point value (no speaker effect): mean +- t_{S-1} sd / sqrt(S)."""
    points = np.array(points)
    n_seeds = points.size
    replicates = np.repeat(points[:, None], 50, axis=1)
    entry = pool_replicates(points, replicates, is_difference=True)
    standard_error = points.std(ddof=1) / math.sqrt(n_seeds)
    assert entry.mean == pytest.approx(points.mean(), abs=1e-15)
    assert entry.half_width == pytest.approx(T_975[n_seeds - 1] * standard_error, rel=1e-6)
    assert (entry.low, entry.high) == pytest.approx((entry.mean - entry.half_width, entry.mean + entry.half_width))
    assert entry.seed_std == pytest.approx(points.std(ddof=1))
    if n_seeds == 3:  # Student's t with 2 degrees of freedom: P(|T| >= t) = 1 - t / sqrt(t^2 + 2)
        t = points.mean() / standard_error
        assert entry.p_value == pytest.approx(1 - t / math.sqrt(t * t + 2), rel=1e-9)


def test_identical_seeds_give_the_normal_speaker_interval():
    """No seed spread: the speaker-bootstrap variance alone, with the normal quantile."""
    resamples = np.random.default_rng(3).normal(0.05, 0.02, 400)
    entry = pool_replicates(np.full(4, 0.05), np.tile(resamples, (4, 1)))
    assert entry.seed_std == 0 and entry.p_value is None
    assert entry.half_width == pytest.approx(Z_975 * resamples.std(ddof=1), rel=1e-6)


def test_general_case_matches_the_variance_of_means_formula():
    """Seeds and speakers both vary: V = v_pool + s^2/S - (w - v_pool)/(S-1), Satterthwaite nu, by hand."""
    rng = np.random.default_rng(4)
    n_seeds = 4
    speaker_effect = rng.normal(0, 0.01, 300)  # shared by all seeds
    replicates = 0.03 + rng.normal(0, 0.02, (n_seeds, 1)) + speaker_effect + rng.normal(0, 0.004, (n_seeds, 300))
    points = replicates.mean(axis=1) + rng.normal(0, 0.001, n_seeds)
    entry = pool_replicates(points, replicates, is_difference=True)

    s2 = points.var(ddof=1)
    v_pool = replicates.mean(axis=0).var(ddof=1)  # speaker variance of the seed mean
    w = replicates.var(axis=1, ddof=1).mean()  # speaker variance of one seed
    variance = v_pool + s2 / n_seeds - (w - v_pool) / (n_seeds - 1)
    assert variance > v_pool  # neither clamp is active in this example
    dof = (n_seeds - 1) * variance**2 / (s2 / n_seeds) ** 2
    assert dof > n_seeds - 1
    assert entry.half_width == pytest.approx(student_t_quantile(0.975, dof) * math.sqrt(variance), rel=1e-9)
    assert entry.p_value == pytest.approx(student_t_two_sided_p(points.mean() / math.sqrt(variance), dof), rel=1e-9)


def test_student_t_against_tables_and_closed_forms():
    for dof, quantile in T_975.items():
        assert student_t_quantile(0.975, dof) == pytest.approx(quantile, abs=1e-6)
    assert student_t_quantile(0.975, math.inf) == pytest.approx(Z_975, abs=1e-6)
    assert student_t_quantile(0.75, 1) == pytest.approx(1.0, abs=1e-12)  # Cauchy: tan(pi/4)
    for t in (0.0, 0.3, 2.0, 40.0):
        assert student_t_two_sided_p(t, 1) == pytest.approx(1 - 2 * math.atan(t) / math.pi, rel=1e-10)
    # Fractional degrees of freedom (Satterthwaite's): P(|T| >= 3.1) = 1 - 2 * integral of the density over [0, 3.1].
    x = np.linspace(0, 3.1, 400_001)
    for dof in (1.5, 2.7, 6.0, 55.5):
        log_norm = math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2) - 0.5 * math.log(dof * math.pi)
        density = np.exp(log_norm - (dof + 1) / 2 * np.log1p(x * x / dof))
        central = np.sum((density[1:] + density[:-1]) / 2) * (x[1] - x[0])  # trapezoid rule
        assert student_t_two_sided_p(3.1, dof) == pytest.approx(1 - 2 * central, rel=1e-8)
        assert student_t_two_sided_p(student_t_quantile(0.995, dof), dof) == pytest.approx(0.01, rel=1e-9)


def test_student_t_with_huge_degrees_of_freedom_is_the_normal():
    # Nearly equal seeds give Satterthwaite degrees of freedom of 1e12 and more; the exact forms lose precision there.
    # Cornish-Fisher: t_{0.975, dof} = z + (z^3 + z) / (4 dof) + O(dof^-2).
    for dof in (1e5, 1e12, 1e15, 1e17, 1e300):
        expected = Z_975 + (Z_975**3 + Z_975) / (4 * dof)
        assert student_t_quantile(0.975, dof) == pytest.approx(expected, abs=1e-6)
        assert student_t_two_sided_p(expected, dof) == pytest.approx(0.05, abs=1e-6)


# ---------------------------------------------------------------- the public functions


def test_one_seed_is_the_speaker_bootstrap_and_warns():
    scores_a, scores_b = simulated_study(0)
    keywords = {"n_resamples": 100, "seed": 2, "fars": (1e-2, 1e-3)}
    utterances = {"enrol": ENROL_SPEAKERS, "test": TEST_SPEAKERS}  # speaker names work as utterance ids here
    system = pool_system([scores_a[0]], LABELS, ENROL_SPEAKERS, TEST_SPEAKERS, **keywords)
    single = bootstrap_metrics(scores_a[0], LABELS, **utterances, **keywords)
    assert (system.eer.mean, system.eer.low, system.eer.high) == (single.eer.value, single.eer.low, single.eer.high)
    difference = pool_difference([scores_a[0]], [scores_b[0]], LABELS, ENROL_SPEAKERS, TEST_SPEAKERS, **keywords)
    paired = paired_comparison(scores_a[0], scores_b[0], LABELS, **utterances, **keywords)
    assert difference.eer.to_dict() == {
        "mean": paired.eer.difference,
        "seed_std": None,
        "low": paired.eer.low,
        "high": paired.eer.high,
        "half_width": (paired.eer.high - paired.eer.low) / 2,
        "n_seeds": 1,
        "p_value": paired.eer.p_value,
    }
    assert "one seed" in difference.to_json()["warning"]


def test_pool_difference_pairs_seeds_and_reports_every_metric():
    scores_a, scores_b = simulated_study(1)
    fars = (0.05, 0.01)  # 280 non-targets: 14 false accepts at 5 %, TAR@1e-2 is not reported (2.8 < 10)
    result = pool_difference(
        scores_a[:3], scores_b[:3], LABELS, ENROL_SPEAKERS, TEST_SPEAKERS, n_resamples=100, seed=5, fars=fars
    )
    metrics = [(compute_metrics(a, LABELS, fars=fars), compute_metrics(b, LABELS, fars=fars))
               for a, b in zip(scores_a[:3], scores_b[:3])]  # fmt: skip
    eer = [b.eer - a.eer for a, b in metrics]
    assert result.eer.mean == pytest.approx(np.mean(eer), abs=1e-15)
    assert result.eer.seed_std == pytest.approx(np.std(eer, ddof=1))
    # The same as pooling the shared resamples of a SpeakerBootstrap by hand (row 1: minDCF@0.01).
    bootstrap = SpeakerBootstrap(LABELS, ENROL_SPEAKERS, TEST_SPEAKERS, n_resamples=100, seed=5, fars=fars)
    values = [bootstrap.replicates(b).values[1] - bootstrap.replicates(a).values[1] for a, b in zip(scores_a, scores_b)]
    min_dcf = [b.min_dcf_at(0.01).value - a.min_dcf_at(0.01).value for a, b in metrics]
    by_hand = pool_replicates(min_dcf, np.array(values)[:3], is_difference=True)
    assert result.min_dcf[0.01].to_dict() == pytest.approx(by_hand.to_dict(), rel=1e-12)

    as_json = result.to_json()
    layout = paired_comparison(scores_a[0], scores_b[0], LABELS, ENROL_SPEAKERS, TEST_SPEAKERS, n_resamples=10,
                               fars=fars).to_dict()  # fmt: skip
    assert set(as_json["min_dcf"]) == set(layout["min_dcf"]) and set(as_json["tar_at_far"]) == set(layout["tar_at_far"])
    entry = as_json["tar_at_far"]["0.05"]
    assert set(entry) == {"mean", "seed_std", "low", "high", "half_width", "n_seeds", "p_value"}
    assert entry["low"] < entry["mean"] < entry["high"] and 0 < entry["p_value"] <= 1
    assert as_json["tar_at_far"]["0.01"] == dict.fromkeys(entry, None) | {"n_seeds": 3}
    assert as_json["n_seeds"] == 3 and "only 3 seeds" in as_json["warning"]

    system = pool_system(scores_a, LABELS, ENROL_SPEAKERS, TEST_SPEAKERS, n_resamples=100, fars=fars)
    assert system.n_seeds == MIN_SEEDS and "warning" not in system.to_json()
    assert system.eer.p_value is None and system.eer.low < system.eer.mean < system.eer.high


def test_bad_inputs_raise():
    scores_a, scores_b = simulated_study(2)
    with pytest.raises(ValueError, match="paired by seed: 3 runs of a but 2 of b"):
        pool_difference(scores_a[:3], scores_b[:2], LABELS, ENROL_SPEAKERS, TEST_SPEAKERS, n_resamples=10)
    with pytest.raises(ValueError, match="scores_by_seed is empty"):
        pool_system([], LABELS, ENROL_SPEAKERS, TEST_SPEAKERS, n_resamples=10)
    with pytest.raises(ValueError, match="expected 400 scores"):
        pool_system([scores_a[0][:-1], scores_a[1]], LABELS, ENROL_SPEAKERS, TEST_SPEAKERS, n_resamples=10)
    with pytest.raises(ValueError, match="confidence"):
        pool_system(scores_a[:2], LABELS, ENROL_SPEAKERS, TEST_SPEAKERS, n_resamples=10, confidence=95)


@pytest.mark.parametrize("n_seeds", [1, 3])
def test_pooling_every_system_at_once_equals_the_separate_calls(n_seeds):
    scores_a, scores_b = simulated_study(1)
    scores_c = scores_b[::-1] + 0.1  # a third system, paired by seed like the others
    keywords = {"n_resamples": 60, "seed": 4, "fars": (1e-2,)}
    by_system = {"a": scores_a[:n_seeds], "b": scores_b[:n_seeds], "c": scores_c[:n_seeds]}
    systems, differences = pool_systems_against_baseline(
        by_system, "a", LABELS, ENROL_SPEAKERS, TEST_SPEAKERS, **keywords
    )
    for label, scores in by_system.items():
        separate = pool_system(scores, LABELS, ENROL_SPEAKERS, TEST_SPEAKERS, **keywords)
        assert systems[label].to_json() == separate.to_json()
    assert sorted(differences) == ["b", "c"]
    for label in ("b", "c"):
        separate = pool_difference(by_system["a"], by_system[label], LABELS, ENROL_SPEAKERS, TEST_SPEAKERS, **keywords)
        assert differences[label].to_json() == separate.to_json()
    with pytest.raises(ValueError, match="paired by seed"):
        pool_systems_against_baseline(
            {"a": scores_a[:2], "b": scores_b[:3]}, "a", LABELS, ENROL_SPEAKERS, TEST_SPEAKERS
        )
