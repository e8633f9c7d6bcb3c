"""Speaker bootstrap: exact agreement with materialised resamples, coverage of a known EER, paired tests.

The synthetic lists have a known population EER. Scores: target trial of speaker s between
utterances i, j is ``MU + a_s + u_i + u_j + e``; a non-target trial between speakers s, t is
``b_s + b_t + u_i + u_j + e``; ``a``, ``b``, ``u`` (speaker and utterance effects) and ``e``
are independent normals. Over random speakers the target scores are N(MU, var_T) and the
non-target scores N(0, var_N), so the EER is ``Phi(-MU / (sd_T + sd_N))`` (the two error
rates are equal where ``(t - MU) / sd_T = -t / sd_N``).
"""

from __future__ import annotations

from statistics import NormalDist

import numpy as np
import pytest

from qmargin_spk.metrics import (
    SpeakerBootstrap,
    bootstrap_metrics,
    compute_metrics,
    paired_comparison,
    utterance_speakers,
)

MU = 2.5
SPEAKER_TARGET_SD = 0.6  # a_s
SPEAKER_NONTARGET_SD = 0.4  # b_s
UTTERANCE_SD = 0.3  # u_i


def true_eer(mu: float = MU) -> float:
    sd_target = np.sqrt(1 + SPEAKER_TARGET_SD**2 + 2 * UTTERANCE_SD**2)
    sd_nontarget = np.sqrt(1 + 2 * SPEAKER_NONTARGET_SD**2 + 2 * UTTERANCE_SD**2)
    return NormalDist().cdf(-mu / (sd_target + sd_nontarget))


def synthetic_list(seed, n_speakers=30, utts_per_speaker=6, nontargets_per_speaker=50, decimals=None):
    """All within-speaker pairs as targets, random cross-speaker pairs as non-targets, VoxCeleb-style ids.

    Returns ``(signal, labels, enrol, test, rng)``; ``signal`` is the score without the trial noise ``e``.
    """
    rng = np.random.default_rng(seed)
    speaker = np.repeat(np.arange(n_speakers), utts_per_speaker)
    ids = [f"id{s:05d}/video/{i:05d}.wav" for i, s in enumerate(speaker)]
    first, second = np.triu_indices(utts_per_speaker, k=1)
    offsets = np.arange(n_speakers)[:, None] * utts_per_speaker
    target_enrol, target_test = (offsets + first).ravel(), (offsets + second).ravel()
    n_nontarget = n_speakers * nontargets_per_speaker
    enrol_speaker = rng.integers(0, n_speakers, n_nontarget)
    test_speaker = (enrol_speaker + rng.integers(1, n_speakers, n_nontarget)) % n_speakers
    nontarget_enrol = enrol_speaker * utts_per_speaker + rng.integers(0, utts_per_speaker, n_nontarget)
    nontarget_test = test_speaker * utts_per_speaker + rng.integers(0, utts_per_speaker, n_nontarget)
    enrol = np.r_[target_enrol, nontarget_enrol]
    test = np.r_[target_test, nontarget_test]
    labels = np.r_[np.ones(target_enrol.size, np.int8), np.zeros(n_nontarget, np.int8)]

    a = rng.normal(0, SPEAKER_TARGET_SD, n_speakers)
    b = rng.normal(0, SPEAKER_NONTARGET_SD, n_speakers)
    u = rng.normal(0, UTTERANCE_SD, speaker.size)
    es, ts = speaker[enrol], speaker[test]
    signal = np.where(labels == 1, MU + a[es], b[es] + b[ts]) + u[enrol] + u[test]
    return signal, labels, [ids[i] for i in enrol], [ids[i] for i in test], rng


def noisy_list(seed, decimals=None, **sizes):
    signal, labels, enrol, test, rng = synthetic_list(seed, **sizes)
    scores = signal + rng.normal(size=signal.size)
    if decimals is not None:
        scores = np.round(scores, decimals)
    return scores, labels, enrol, test


def metric_vector(metrics):
    """EER, minDCF per prior, TAR per FAR (None -> nan): the row order of ``Replicates.values``."""
    values = [metrics.eer] + [m.value for m in metrics.min_dcf] + [t.tar for t in metrics.tar_at_far]
    return np.array([np.nan if v is None else v for v in values])


# ---------------------------------------------------------------- exactness against the materialised resample


def materialised_resample(labels, enrol_speaker, test_speaker, draws):
    """Trial indices of the resampled list, built copy by copy (independent of the weights).

    Each position p of ``draws`` is a new speaker; position p keeps its speaker's target
    trials, and every ordered pair of positions (p, q) with different speakers keeps the
    non-target trials from speaker ``draws[p]`` to speaker ``draws[q]``. Two copies of one
    speaker are not paired (they would be the same voice).
    """
    by_pair: dict = {}
    for index, pair in enumerate(zip(enrol_speaker, test_speaker)):
        by_pair.setdefault(pair, []).append(index)
    kept = []
    for p, s in enumerate(draws):
        for q, t in enumerate(draws):
            if p == q:
                kept += [i for i in by_pair.get((s, s), []) if labels[i]]
            elif s != t:
                kept += by_pair.get((s, t), [])
    return np.array(kept, dtype=np.int64)


@pytest.mark.parametrize("decimals", [None, 1])
def test_resample_metrics_equal_compute_metrics_on_materialised_resample(decimals):
    scores, labels, enrol, test = noisy_list(
        7, n_speakers=8, utts_per_speaker=5, nontargets_per_speaker=40, decimals=decimals
    )
    fars = (0.01, 0.05, 0.2)
    bootstrap = SpeakerBootstrap(labels, enrol, test, n_resamples=12, seed=5, p_targets=(0.01, 0.05, 0.3), fars=fars)
    replicates = bootstrap.replicates(scores)
    enrol_speaker, test_speaker = utterance_speakers(enrol), utterance_speakers(test)
    names = bootstrap.speaker_names
    for r in range(bootstrap.n_resamples):
        draws = np.repeat(names, bootstrap.multiplicities[r])
        kept = materialised_resample(labels, enrol_speaker, test_speaker, draws)
        np.testing.assert_array_equal(np.bincount(kept, minlength=labels.size), bootstrap.trial_weights()[r])
        expected = compute_metrics(scores[kept], labels[kept], p_targets=(0.01, 0.05, 0.3), fars=fars)
        got = replicates.values[:, r]
        reported = ~np.isnan(metric_vector(expected))
        assert np.array_equal(got[reported], metric_vector(expected)[reported]), r  # bit for bit


def test_point_estimates_are_compute_metrics():
    scores, labels, enrol, test = noisy_list(1, decimals=2)
    fars = (1e-2, 1e-3)
    result = bootstrap_metrics(scores, labels, enrol, test, n_resamples=50, fars=fars)
    expected = compute_metrics(scores, labels, fars=fars)
    assert result.eer.value == expected.eer
    for p in (0.01, 0.05):
        assert result.min_dcf[p].value == expected.min_dcf_at(p).value
    assert result.tar_at_far[1e-2].value == expected.tar_at(1e-2).tar
    # 1,500 non-targets: FAR 1e-3 gives 1.5 false accepts, not reported and so no interval.
    assert expected.tar_at(1e-3).tar is None
    assert result.tar_at_far[1e-3].to_dict() == {"value": None, "low": None, "high": None}
    assert result.eer.low < result.eer.value < result.eer.high
    assert result.to_dict()["bootstrap"]["n_speakers"] == 30


def test_seeded_and_reproducible():
    scores, labels, enrol, test = noisy_list(2)
    first = bootstrap_metrics(scores, labels, enrol, test, n_resamples=100, seed=3).to_dict()
    again = bootstrap_metrics(scores, labels, enrol, test, n_resamples=100, seed=3).to_dict()
    other = bootstrap_metrics(scores, labels, enrol, test, n_resamples=100, seed=4).to_dict()
    assert first == again
    assert first["eer"]["low"] != other["eer"]["low"]


def test_speaker_mapping_overrides_path_prefix():
    scores, labels, enrol, test = noisy_list(3)
    opaque = {utt: f"u{i}" for i, utt in enumerate(sorted(set(enrol) | set(test)))}
    speakers = {opaque[utt]: utt.split("/")[0] for utt in opaque}
    by_path = bootstrap_metrics(scores, labels, enrol, test, n_resamples=100)
    by_mapping = bootstrap_metrics(
        scores, labels, [opaque[u] for u in enrol], [opaque[u] for u in test], speakers=speakers, n_resamples=100
    )
    assert by_path.to_dict() == by_mapping.to_dict()


def test_bad_inputs_raise():
    scores, labels, enrol, test = noisy_list(4)
    with pytest.raises(ValueError, match="contradict their speakers"):
        bootstrap_metrics(scores, labels, enrol, list(reversed(test)), n_resamples=10)
    with pytest.raises(KeyError, match="no entry in the speaker mapping"):
        bootstrap_metrics(scores, labels, enrol, test, speakers={}, n_resamples=10)
    with pytest.raises(ValueError, match="expected .* scores"):
        bootstrap_metrics(scores[:-1], labels, enrol, test, n_resamples=10)
    with pytest.raises(ValueError, match="length mismatch"):
        bootstrap_metrics(scores, labels, enrol[:-1], test, n_resamples=10)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_metrics(scores, labels, enrol, test, n_resamples=10, confidence=95)
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_metrics(np.r_[np.nan, scores[1:]], labels, enrol, test, n_resamples=10)


# ---------------------------------------------------------------- statistical behaviour

# 200 resamples per interval inside the replication tests (1,000 is the default): the 2.5 %
# and 97.5 % quantiles of 200 draws move the endpoints by a small fraction of the interval
# width, far below what 200 replications can resolve (a coverage of 95 % is measured to
# +-1.5 %); it keeps each test at a few seconds.
REPLICATIONS = 200
RESAMPLES = 200


def test_eer_interval_covers_the_true_eer():
    truth = true_eer()
    covered = 0
    for replication in range(REPLICATIONS):
        scores, labels, enrol, test = noisy_list(1000 + replication)
        eer = bootstrap_metrics(scores, labels, enrol, test, n_resamples=RESAMPLES, seed=replication).eer
        covered += eer.low <= truth <= eer.high
    assert 0.90 <= covered / REPLICATIONS <= 0.99, covered


def test_trial_resampling_understates_the_interval():
    """Resampling trials ignores the speaker effects: its interval is much narrower than the speaker one."""
    scores, labels, enrol, test = noisy_list(11, n_speakers=40)
    speaker_interval = bootstrap_metrics(scores, labels, enrol, test, n_resamples=RESAMPLES).eer
    rng = np.random.default_rng(0)
    trial_eers = []
    for _ in range(RESAMPLES):
        kept = rng.integers(0, labels.size, labels.size)
        trial_eers.append(compute_metrics(scores[kept], labels[kept]).eer)
    trial_low, trial_high = np.percentile(trial_eers, [2.5, 97.5])
    assert (speaker_interval.high - speaker_interval.low) > 1.3 * (trial_high - trial_low)


def test_intervals_shrink_with_more_speakers_and_trials():
    def mean_width(n_speakers):
        widths = []
        for seed in range(5):
            scores, labels, enrol, test = noisy_list(seed, n_speakers=n_speakers)
            eer = bootstrap_metrics(scores, labels, enrol, test, n_resamples=RESAMPLES).eer
            widths.append(eer.high - eer.low)
        return np.mean(widths)

    small, large = mean_width(20), mean_width(80)  # 4x the speakers and the trials: width about halves
    assert 0.35 * small < large < 0.7 * small


def test_paired_comparison_detects_a_real_difference():
    signal, labels, enrol, test, rng = synthetic_list(21, n_speakers=40)
    worse = signal + rng.normal(size=signal.size)
    better = signal + 0.5 * labels + rng.normal(size=signal.size)  # targets 0.5 higher: EER drops by ~2 points
    result = paired_comparison(worse, better, labels, enrol, test, n_resamples=1000)
    assert result.eer.difference < 0 and result.eer.high < 0
    assert result.eer.p_value < 0.05
    assert result.eer.difference == pytest.approx(result.eer.b - result.eer.a)
    assert result.eer.a == compute_metrics(worse, labels).eer


def test_paired_comparison_rejects_noise_only_at_the_nominal_rate():
    """Two systems with the same signal and independent noise of equal size: the null is true."""
    rejections = 0
    for replication in range(REPLICATIONS):
        signal, labels, enrol, test, rng = synthetic_list(5000 + replication)
        system_a = signal + rng.normal(size=signal.size)
        system_b = signal + rng.normal(size=signal.size)
        result = paired_comparison(system_a, system_b, labels, enrol, test, n_resamples=RESAMPLES, seed=replication)
        rejections += result.eer.p_value < 0.05
    assert 0.01 <= rejections / REPLICATIONS <= 0.10, rejections


def test_identical_systems_do_not_differ():
    scores, labels, enrol, test = noisy_list(6)
    result = paired_comparison(scores, scores, labels, enrol, test, n_resamples=100).to_dict()
    assert result["eer"]["difference"] == result["eer"]["low"] == result["eer"]["high"] == 0
    assert result["eer"]["p_value"] == 1.0
