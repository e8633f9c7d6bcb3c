"""Confidence intervals and paired comparisons for EER, minDCF and TAR@FAR by a speaker bootstrap.

Design (see ``docs/evidence.md``): a **two-way speaker bootstrap**. Trials that share a
speaker (or an utterance, which always belongs to one speaker) are dependent, so the
speakers, not the trials, are the independent units. One resample draws ``K`` speakers
with replacement from the ``K`` speakers of the list; speaker ``s`` is drawn ``m_s``
times. Every trial is kept with an integer weight: a target trial of speaker ``s`` gets
``m_s`` (its speaker's copies), a non-target trial between ``s`` and ``t`` gets
``m_s * m_t`` (every pair of copies), so a trial disappears as soon as one of its
speakers is not drawn. Because enrolment and test speakers come from one population (the
VoxCeleb1 lists pair speakers of one set), one multiplicity per speaker serves both sides;
this is the node bootstrap of dyadic (pairwise) data, the one-population form of Owen's
"pigeonhole" bootstrap for crossed designs. Resampling trials instead treats
``K(K-1)/2`` speaker pairs as independent and gives intervals that are too narrow when
speakers differ (``tests/test_bootstrap.py`` measures both).

Weighted trials make the metrics of a resample those of the materialised resampled list
(each trial repeated ``weight`` times; ``tests`` check it against :func:`compute_metrics`
on that list) while the scores are sorted only once: per resample the weighted target
and non-target counts are cumulative sums over the sorted trials, vectorised over blocks
of resamples (:mod:`qmargin_spk.metrics.weighted_metrics`); the result types are in
:mod:`qmargin_spk.metrics.bootstrap_results`. The conventions are those of ``compute_metrics(convention="default")``
(ties grouped, interpolated EER, normalised minDCF, TAR@FAR the highest TAR with
FPR <= FAR); the point estimate *is* ``compute_metrics`` on the list. A TAR@FAR that
``compute_metrics`` reports as None (``FAR x N_nontarget < 10``) has no interval.

Intervals are **percentile** intervals: the ``(1 - confidence) / 2`` and
``(1 + confidence) / 2`` quantiles of the resampled values (numpy's linear interpolation
between order statistics). A paired comparison applies the same resamples to two systems
scored on the same trials; the interval is that of the resampled differences ``b - a``,
and the two-sided p-value ``min(1, 2 min(#{d <= 0} + 1, #{d >= 0} + 1) / (R + 1))`` is the
smallest ``1 - confidence`` whose percentile interval of ``d`` still reaches zero (with
the usual +1 so that it is never 0). A resample with no target or no non-target trial
left (possible only with very few speakers) is dropped and counted in ``n_degenerate``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from numpy.typing import ArrayLike

from qmargin_spk.metrics.bootstrap_results import (
    DESIGN,
    INTERVAL,
    BootstrapResult,
    BootstrapSettings,
    ComparisonResult,
    Difference,
    Interval,
    Replicates,
)
from qmargin_spk.metrics.verification import DEFAULT_FARS, DEFAULT_P_TARGETS, compute_metrics, validate_trials
from qmargin_spk.metrics.weighted_metrics import WeightedTrials

__all__ = [
    "DEFAULT_RESAMPLES",
    "DESIGN",
    "INTERVAL",
    "BootstrapResult",
    "BootstrapSettings",
    "ComparisonResult",
    "Difference",
    "Interval",
    "Replicates",
    "SpeakerBootstrap",
    "bootstrap_metrics",
    "paired_comparison",
    "speaker_multiplicities",
    "utterance_speakers",
]

DEFAULT_RESAMPLES = 1000
# Elements of one (resamples x trials) work array; bounds the memory of a block (~10 such arrays).
_BLOCK_ELEMENTS = 2**21


def utterance_speakers(utterances: Sequence[str], speakers: Mapping[str, str] | None = None) -> np.ndarray:
    """Speaker of each utterance: ``speakers[utt]`` when a mapping is given, else the first path component.

    VoxCeleb ids name the speaker first (``id10270/x6uYqmx31kE/00001.wav`` -> ``id10270``).
    """
    utterances = [str(utt) for utt in utterances]
    if speakers is None:
        return np.array([utt.split("/", 1)[0] for utt in utterances], dtype=str)
    absent = [utt for utt in utterances if utt not in speakers]
    if absent:
        raise KeyError(f"{len(absent)} utterances have no entry in the speaker mapping, e.g. {absent[:3]}")
    return np.array([speakers[utt] for utt in utterances], dtype=str)


class SpeakerBootstrap:
    """The resamples of one trial list, reusable for any number of systems scored on it.

    ``labels``: 1 for target trials; ``enrol`` / ``test``: the utterance ids of each trial
    (speaker from ``speakers`` or the first path component, see :func:`utterance_speakers`).
    The ``n_resamples`` speaker draws are fixed by ``seed`` (numpy ``default_rng``), so two
    systems bootstrapped here see the same resamples.
    """

    def __init__(
        self,
        labels: ArrayLike,
        enrol: Sequence[str],
        test: Sequence[str],
        speakers: Mapping[str, str] | None = None,
        n_resamples: int = DEFAULT_RESAMPLES,
        seed: int = 0,
        p_targets: Sequence[float] = DEFAULT_P_TARGETS,
        fars: Sequence[float] = DEFAULT_FARS,
    ) -> None:
        labels = np.asarray(labels)
        _, self.labels = validate_trials(np.zeros(labels.shape), labels)  # checks the labels; scores come later
        if not len(enrol) == len(test) == self.labels.size:
            raise ValueError(
                f"length mismatch: {self.labels.size} labels, {len(enrol)} enrol and {len(test)} test utterances"
            )
        if n_resamples < 2:
            raise ValueError(f"n_resamples must be at least 2, got {n_resamples}")
        enrol_speakers = utterance_speakers(enrol, speakers)
        test_speakers = utterance_speakers(test, speakers)
        self.speaker_names, index = np.unique(np.concatenate([enrol_speakers, test_speakers]), return_inverse=True)
        self.enrol_index, self.test_index = index[: self.labels.size], index[self.labels.size :]
        _check_speakers_match_labels(self.labels, self.enrol_index, self.test_index, self.speaker_names)
        if self.speaker_names.size < 2:
            raise ValueError("the speaker bootstrap needs trials from at least 2 speakers")
        self.n_resamples = int(n_resamples)
        self.seed = int(seed)
        self.p_targets = tuple(p_targets)
        self.fars = tuple(fars)
        self.multiplicities = speaker_multiplicities(self.speaker_names.size, self.n_resamples, self.seed)

    @property
    def n_speakers(self) -> int:
        return int(self.speaker_names.size)

    def trial_weights(self, rows: slice | np.ndarray = slice(None)) -> np.ndarray:
        """Integer weight of every trial (columns) in the resamples ``rows``: ``m_s`` or ``m_s * m_t``."""
        counts = self.multiplicities[rows]
        enrol_counts = np.take(counts, self.enrol_index, axis=1)
        return np.where(self.labels, enrol_counts, enrol_counts * np.take(counts, self.test_index, axis=1))

    def replicates(self, scores: ArrayLike) -> Replicates:
        """Metrics of ``scores`` on the list and on every resample."""
        scores = np.asarray(scores, dtype=np.float64)
        if scores.shape != self.labels.shape:
            raise ValueError(f"expected {self.labels.size} scores (one per trial), got shape {scores.shape}")
        point = compute_metrics(scores, self.labels, p_targets=self.p_targets, fars=self.fars)
        weighted = WeightedTrials(scores, self.labels, self.enrol_index, self.test_index)
        values = np.empty((1 + len(self.p_targets) + len(self.fars), self.n_resamples))
        block = max(1, min(256, _BLOCK_ELEMENTS // self.labels.size))
        for start in range(0, self.n_resamples, block):
            rows = slice(start, min(start + block, self.n_resamples))
            values[:, rows] = weighted.metrics(self.multiplicities[rows], self.p_targets, self.fars)
        return Replicates(point, values)

    def intervals(self, replicates: Replicates, confidence: float = 0.95) -> BootstrapResult:
        """Percentile intervals of one system's metrics."""
        low, high = _quantile_levels(confidence)
        valid = _valid_columns(replicates.values)
        entries = []
        for value, row in zip(replicates.point_values(), replicates.values[:, valid]):
            if value is None:
                entries.append(Interval(None, None, None))
            else:
                bounds = np.percentile(row, [low, high])
                entries.append(Interval(value, float(bounds[0]), float(bounds[1])))
        return BootstrapResult(*self._split(entries), settings=self._settings(confidence, valid))

    def compare(self, a: Replicates, b: Replicates, confidence: float = 0.95) -> ComparisonResult:
        """Interval and p-value of ``b - a`` for every metric, from the shared resamples."""
        low, high = _quantile_levels(confidence)
        valid = _valid_columns(a.values) & _valid_columns(b.values)
        entries = []
        for value_a, value_b, row_a, row_b in zip(
            a.point_values(), b.point_values(), a.values[:, valid], b.values[:, valid]
        ):
            if value_a is None or value_b is None:
                entries.append(Difference(value_a, value_b, None, None, None, None))
                continue
            differences = row_b - row_a
            bounds = np.percentile(differences, [low, high])
            entries.append(
                Difference(
                    value_a, value_b, value_b - value_a, float(bounds[0]), float(bounds[1]), _p_value(differences)
                )
            )
        return ComparisonResult(*self._split(entries), settings=self._settings(confidence, valid))

    def _split(self, entries: list) -> tuple:
        """Row-ordered entries -> (EER, {P_target: entry}, {FAR: entry})."""
        n_priors = len(self.p_targets)
        min_dcf = dict(zip(self.p_targets, entries[1 : 1 + n_priors]))
        tar = dict(zip(self.fars, entries[1 + n_priors :]))
        return entries[0], min_dcf, tar

    def _settings(self, confidence: float, valid: np.ndarray) -> BootstrapSettings:
        n_degenerate = int(valid.size - valid.sum())
        return BootstrapSettings(self.n_resamples, self.seed, confidence, self.n_speakers, n_degenerate)


def speaker_multiplicities(n_speakers: int, n_resamples: int, seed: int) -> np.ndarray:
    """``(n_resamples, n_speakers)`` counts: how often each speaker is drawn in ``n_speakers`` draws."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_speakers, size=(n_resamples, n_speakers))
    flat = (draws + n_speakers * np.arange(n_resamples)[:, None]).ravel()
    counts = np.bincount(flat, minlength=n_resamples * n_speakers).reshape(n_resamples, n_speakers)
    # Weights are products of two counts (at most n_speakers each): int32 unless that could overflow.
    return counts.astype(np.int32 if n_speakers < 46_000 else np.int64)


def bootstrap_metrics(
    scores: ArrayLike,
    labels: ArrayLike,
    enrol: Sequence[str],
    test: Sequence[str],
    speakers: Mapping[str, str] | None = None,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    confidence: float = 0.95,
    p_targets: Sequence[float] = DEFAULT_P_TARGETS,
    fars: Sequence[float] = DEFAULT_FARS,
) -> BootstrapResult:
    """Point estimates (``compute_metrics``) and speaker-bootstrap percentile intervals of one system."""
    bootstrap = SpeakerBootstrap(labels, enrol, test, speakers, n_resamples, seed, p_targets, fars)
    return bootstrap.intervals(bootstrap.replicates(scores), confidence)


def paired_comparison(
    scores_a: ArrayLike,
    scores_b: ArrayLike,
    labels: ArrayLike,
    enrol: Sequence[str],
    test: Sequence[str],
    speakers: Mapping[str, str] | None = None,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    confidence: float = 0.95,
    p_targets: Sequence[float] = DEFAULT_P_TARGETS,
    fars: Sequence[float] = DEFAULT_FARS,
) -> ComparisonResult:
    """Difference ``b - a`` of two systems scored on the same trials: interval and p-value per metric."""
    bootstrap = SpeakerBootstrap(labels, enrol, test, speakers, n_resamples, seed, p_targets, fars)
    return bootstrap.compare(bootstrap.replicates(scores_a), bootstrap.replicates(scores_b), confidence)


def _check_speakers_match_labels(
    labels: np.ndarray, enrol_index: np.ndarray, test_index: np.ndarray, names: np.ndarray
) -> None:
    """Target trials must pair one speaker with itself, non-target trials two different speakers."""
    same = enrol_index == test_index
    wrong = np.flatnonzero(same != labels)
    if wrong.size:
        i = wrong[0]
        kind = "target" if labels[i] else "non-target"
        raise ValueError(
            f"{wrong.size} trials contradict their speakers (first: trial {i}, a {kind} trial between speakers "
            f"{names[enrol_index[i]]!r} and {names[test_index[i]]!r}); pass a speakers mapping if utterance ids "
            "do not start with the speaker"
        )


def _quantile_levels(confidence: float) -> tuple[float, float]:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return 50 * (1 - confidence), 50 * (1 + confidence)


def _valid_columns(values: np.ndarray) -> np.ndarray:
    valid = ~np.isnan(values[0])
    if not valid.any():
        raise ValueError("every resample is degenerate (no target or no non-target trial): too few speakers")
    return valid


def _p_value(differences: np.ndarray) -> float:
    """Two-sided bootstrap p-value of ``difference == 0`` (percentile-interval inversion, +1 corrected)."""
    at_most_zero = int(np.count_nonzero(differences <= 0))
    at_least_zero = int(np.count_nonzero(differences >= 0))
    return min(1.0, 2 * (min(at_most_zero, at_least_zero) + 1) / (differences.size + 1))
