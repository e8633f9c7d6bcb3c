"""Metrics and paired differences pooled over training seeds, with intervals for seeds and test speakers.

A study trains each system once per seed and scores every run on the same trial list. The
pooled value of a metric is its mean over seeds; its interval has to cover two sources of
variation: another set of seeds (training runs differ) and another set of test speakers
(the list is a sample). Method (``docs/metrics.md``, "Pooling over seeds (studies)"): with ``x_i`` the
metric of seed ``i`` (``compute_metrics`` on the list) and ``C`` the ``S x S`` covariance of
the seeds' values over the speaker-bootstrap resamples (shared by all runs, from
:class:`~qmargin_spk.metrics.bootstrap.SpeakerBootstrap`),

    V = s^2 / S + max(0, mean off-diagonal of C),   at least  sum(C) / S^2

(``s^2`` the seed-level sample variance: seed spread and each run's own trial noise; the
off-diagonal covariance: the test-set effect that all seeds share, which the seed spread cannot
see), and the interval is ``mean +- t_nu sqrt(V)`` with Satterthwaite's ``nu`` (at least
``S - 1``: the small-sample correction of the seed level). A difference ``b - a`` pairs the
runs by seed index and pools the per-seed differences the same way; its p-value is the
two-sided t-test of zero. With one seed there is no seed spread to measure: the result is the
speaker bootstrap alone (percentile interval, as ``qmargin-spk compare`` reports) and warns.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
from numpy.typing import ArrayLike

from qmargin_spk.metrics.bootstrap import DEFAULT_RESAMPLES, SpeakerBootstrap
from qmargin_spk.metrics.bootstrap_results import BootstrapSettings, Difference, Interval, Replicates
from qmargin_spk.metrics.verification import DEFAULT_FARS, DEFAULT_P_TARGETS

__all__ = [
    "METHOD",
    "MIN_SEEDS",
    "PooledEntry",
    "PooledResult",
    "pool_difference",
    "pool_replicates",
    "pool_system",
    "student_t_quantile",
    "student_t_two_sided_p",
]

MIN_SEEDS = 5  # below this the report warns: the seed-to-seed spread is poorly known
METHOD = (
    "mean over seeds +- t_nu * sqrt(s^2/S + shared speaker-bootstrap covariance), Satterthwaite nu >= S-1; "
    "one seed: speaker-bootstrap percentile interval"
)


@dataclass(frozen=True)
class PooledEntry:
    """One metric (or difference) pooled over seeds; all None but ``n_seeds`` when the metric is not reported.

    ``half_width`` is half the interval's width: the smallest difference the study resolves.
    ``p_value`` is that of "the difference is 0" (None for a system's own metric).
    """

    mean: float | None
    seed_std: float | None
    low: float | None
    high: float | None
    half_width: float | None
    n_seeds: int
    p_value: float | None = None

    def to_dict(self) -> dict:
        return {
            "mean": self.mean,
            "seed_std": self.seed_std,
            "low": self.low,
            "high": self.high,
            "half_width": self.half_width,
            "n_seeds": self.n_seeds,
            "p_value": self.p_value,
        }


@dataclass(frozen=True)
class PooledResult:
    """EER, minDCF per P_target and TAR per FAR of one system (or of ``b - a``) pooled over seeds."""

    eer: PooledEntry
    min_dcf: dict[float, PooledEntry]
    tar_at_far: dict[float, PooledEntry]
    n_seeds: int
    confidence: float
    is_difference: bool
    settings: BootstrapSettings

    @property
    def warning(self) -> str | None:
        """Why the intervals deserve caution (fewer than ``MIN_SEEDS`` seeds), or None."""
        if self.n_seeds == 1:
            return (
                "one seed: the interval covers the test speakers only, not the variation between training runs; "
                f"run at least {MIN_SEEDS} seeds"
            )
        if self.n_seeds < MIN_SEEDS:
            return (
                f"only {self.n_seeds} seeds: the seed-to-seed spread is poorly known (t with as few as "
                f"{self.n_seeds - 1} degrees of freedom, wide intervals); run at least {MIN_SEEDS} seeds"
            )
        return None

    def to_json(self) -> dict:
        """JSON-ready, keyed like the bootstrap results: ``eer``, ``min_dcf`` / ``tar_at_far`` by ``%g`` keys."""
        out = {
            "eer": self.eer.to_dict(),
            "min_dcf": {f"{p:g}": entry.to_dict() for p, entry in self.min_dcf.items()},
            "tar_at_far": {f"{far:g}": entry.to_dict() for far, entry in self.tar_at_far.items()},
            "n_seeds": self.n_seeds,
            "kind": "difference b - a (paired by seed)" if self.is_difference else "system",
            "pooling": {"method": METHOD, "confidence": self.confidence},
            "bootstrap": self.settings.to_dict(),
        }
        if self.warning is not None:
            out["warning"] = self.warning
        return out


def pool_system(
    scores_by_seed: Sequence[ArrayLike],
    labels: ArrayLike,
    enrol_speakers: Sequence[str],
    test_speakers: Sequence[str],
    *,
    p_targets: Sequence[float] = DEFAULT_P_TARGETS,
    fars: Sequence[float] = DEFAULT_FARS,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = 0.95,
    seed: int = 0,
) -> PooledResult:
    """One system's metrics pooled over its seeds' runs, all scored on one trial list.

    ``enrol_speakers`` / ``test_speakers``: the speaker of each trial's two sides; the speaker
    resamples (``n_resamples``, drawn from ``seed``) are shared by all runs.
    """
    runs = _check_runs(scores_by_seed, "scores_by_seed")
    bootstrap = _speaker_bootstrap(labels, enrol_speakers, test_speakers, p_targets, fars, n_resamples, seed)
    return _pool_system_replicates(bootstrap, [bootstrap.replicates(scores) for scores in runs], confidence)


def pool_difference(
    scores_a_by_seed: Sequence[ArrayLike],
    scores_b_by_seed: Sequence[ArrayLike],
    labels: ArrayLike,
    enrol_speakers: Sequence[str],
    test_speakers: Sequence[str],
    *,
    p_targets: Sequence[float] = DEFAULT_P_TARGETS,
    fars: Sequence[float] = DEFAULT_FARS,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = 0.95,
    seed: int = 0,
) -> PooledResult:
    """Difference ``b - a`` pooled over seeds; run ``i`` of ``a`` is paired with run ``i`` of ``b`` (same seed)."""
    runs_a = _check_runs(scores_a_by_seed, "scores_a_by_seed")
    runs_b = _check_runs(scores_b_by_seed, "scores_b_by_seed")
    if len(runs_a) != len(runs_b):
        raise ValueError(f"runs are paired by seed: {len(runs_a)} runs of a but {len(runs_b)} of b")
    bootstrap = _speaker_bootstrap(labels, enrol_speakers, test_speakers, p_targets, fars, n_resamples, seed)
    reps_a = [bootstrap.replicates(scores) for scores in runs_a]
    reps_b = [bootstrap.replicates(scores) for scores in runs_b]
    return _pool_difference_replicates(bootstrap, reps_a, reps_b, confidence)


def pool_systems_against_baseline(
    scores_by_system: Mapping[str, Sequence[ArrayLike]],
    baseline: str,
    labels: ArrayLike,
    enrol_speakers: Sequence[str],
    test_speakers: Sequence[str],
    *,
    p_targets: Sequence[float] = DEFAULT_P_TARGETS,
    fars: Sequence[float] = DEFAULT_FARS,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[dict[str, PooledResult], dict[str, PooledResult]]:
    """:func:`pool_system` of every system and :func:`pool_difference` of each against ``baseline``, at once.

    The same results as those calls, with one speaker bootstrap and each run's resamples computed once
    (separate calls would recompute the baseline's for every system).
    """
    runs = {label: _check_runs(scores, f"scores_by_system[{label!r}]") for label, scores in scores_by_system.items()}
    if baseline not in runs:
        raise ValueError(f"baseline {baseline!r} is not one of the systems {sorted(runs)}")
    bootstrap = _speaker_bootstrap(labels, enrol_speakers, test_speakers, p_targets, fars, n_resamples, seed)
    replicates = {
        label: [bootstrap.replicates(scores) for scores in scores_list] for label, scores_list in runs.items()
    }
    systems = {label: _pool_system_replicates(bootstrap, reps, confidence) for label, reps in replicates.items()}
    differences = {}
    for label, reps in replicates.items():
        if label != baseline:
            if len(reps) != len(replicates[baseline]):
                counts = f"{len(replicates[baseline])} runs of {baseline!r} but {len(reps)} of {label!r}"
                raise ValueError(f"runs are paired by seed: {counts}")
            differences[label] = _pool_difference_replicates(bootstrap, replicates[baseline], reps, confidence)
    return systems, differences


def _pool_system_replicates(bootstrap: SpeakerBootstrap, replicates: list, confidence: float) -> PooledResult:
    if len(replicates) == 1:
        single = bootstrap.intervals(replicates[0], confidence)
        return _from_single_seed(single, bootstrap, confidence, is_difference=False)
    points = np.array([_as_floats(rep) for rep in replicates])  # (seeds, metrics)
    values = np.stack([rep.values for rep in replicates])  # (seeds, metrics, resamples)
    return _pooled(points, values, bootstrap, confidence, is_difference=False)


def _pool_difference_replicates(
    bootstrap: SpeakerBootstrap, reps_a: list, reps_b: list, confidence: float
) -> PooledResult:
    if len(reps_a) == 1:
        single = bootstrap.compare(reps_a[0], reps_b[0], confidence)
        return _from_single_seed(single, bootstrap, confidence, is_difference=True)
    points = np.array([_as_floats(b) - _as_floats(a) for a, b in zip(reps_a, reps_b)])
    values = np.stack([b.values - a.values for a, b in zip(reps_a, reps_b)])
    return _pooled(points, values, bootstrap, confidence, is_difference=True)


def pool_replicates(
    points: ArrayLike, replicates: ArrayLike, confidence: float = 0.95, is_difference: bool = False
) -> PooledEntry:
    """Pool one metric over ``S >= 2`` seeds: ``points`` ``(S,)`` on the list, ``replicates`` ``(S, R)`` resamples.

    Column ``r`` of ``replicates`` must be the same speaker resample for every seed.
    """
    points = np.asarray(points, dtype=np.float64)
    replicates = np.asarray(replicates, dtype=np.float64)
    n_seeds = points.size
    if n_seeds < 2 or replicates.shape[0] != n_seeds or replicates.ndim != 2 or replicates.shape[1] < 2:
        shapes = f"{points.shape} and {replicates.shape}"
        raise ValueError(f"need points (S,) and replicates (S, R) with S >= 2 seeds and R >= 2, got {shapes}")
    _check_confidence(confidence)
    mean = float(points.mean())
    seed_variance = float(points.var(ddof=1))
    covariance = np.atleast_2d(np.cov(replicates))  # between seeds, over the shared speaker resamples
    shared = (covariance.sum() - np.trace(covariance)) / (n_seeds * (n_seeds - 1))
    # Never below the speaker-bootstrap variance of the seed mean, a part of the total on its own.
    variance = max(seed_variance / n_seeds + max(float(shared), 0.0), float(covariance.sum()) / n_seeds**2)
    seed_term = seed_variance / n_seeds
    dof = math.inf if seed_term == 0 else max(n_seeds - 1.0, (n_seeds - 1) * variance**2 / seed_term**2)
    half_width = student_t_quantile((1 + confidence) / 2, dof) * math.sqrt(variance)
    p_value = None
    if is_difference:
        p_value = student_t_two_sided_p(mean / math.sqrt(variance), dof) if variance > 0 else float(mean == 0)
    return PooledEntry(
        mean, math.sqrt(seed_variance), mean - half_width, mean + half_width, half_width, n_seeds, p_value
    )


# Above this many degrees of freedom Student's t is the normal distribution to within 1e-6 (relative, in the
# quantiles used here), and the lgamma differences of the exact forms lose all precision near 1e15.
NORMAL_DOF = 1e6


def student_t_two_sided_p(t: float, dof: float) -> float:
    """``P(|T| >= |t|)`` for Student's t with ``dof`` (> 0, may be fractional or inf) degrees of freedom."""
    if dof > NORMAL_DOF:
        return 2 * NormalDist().cdf(-abs(t))
    # P(|T| >= t) = I_x(dof/2, 1/2) with x = dof / (dof + t^2) (regularised incomplete beta).
    return _regularised_beta(dof / (dof + t * t), dof / 2, 0.5)


def student_t_quantile(probability: float, dof: float) -> float:
    """Quantile of Student's t (``probability`` in (0.5, 1)): Newton steps on the upper tail from 0.

    The upper tail is convex and decreasing on ``t >= 0``, so the steps approach the root from
    below without overshooting.
    """
    if not 0.5 < probability < 1:
        raise ValueError(f"probability must be in (0.5, 1), got {probability}")
    if dof > NORMAL_DOF:
        return NormalDist().inv_cdf(probability)
    tail = 1 - probability
    log_norm = math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2) - 0.5 * math.log(dof * math.pi)
    t = 0.0
    for _ in range(200):
        density = math.exp(log_norm - (dof + 1) / 2 * math.log1p(t * t / dof))
        step = (student_t_two_sided_p(t, dof) / 2 - tail) / density
        t += step
        if step <= 1e-13 * max(1.0, t):
            break
    return t


def _regularised_beta(x: float, a: float, b: float) -> float:
    """``I_x(a, b)`` by its continued fraction (DLMF 8.17.22, modified Lentz), flipped where it converges slowly."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    if x > (a + 1) / (a + b + 2):
        return 1 - _regularised_beta(1 - x, b, a)
    log_front = a * math.log(x) + b * math.log1p(-x) - math.log(a) - _log_beta(a, b)
    tiny = 1e-300
    c, d = 1.0, 1 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 500):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1 + numerator * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1) < 1e-15:
            break
    return math.exp(log_front) * fraction


def _log_beta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def _pooled(
    points: np.ndarray, values: np.ndarray, bootstrap: SpeakerBootstrap, confidence: float, is_difference: bool
) -> PooledResult:
    """Pool every metric row of ``points (seeds, metrics)`` / ``values (seeds, metrics, resamples)``."""
    # A degenerate resample (no target or no non-target left) depends on the labels only: the same for every run.
    valid = ~np.isnan(values[:, 0, :]).any(axis=0)
    if not valid.any():
        raise ValueError("every resample is degenerate (no target or no non-target trial): too few speakers")
    n_seeds = points.shape[0]
    entries = []
    for row in range(points.shape[1]):
        if np.isnan(points[:, row]).any():  # a TAR@FAR that compute_metrics does not report
            entries.append(PooledEntry(None, None, None, None, None, n_seeds))
        else:
            entries.append(pool_replicates(points[:, row], values[:, row, valid], confidence, is_difference))
    settings = BootstrapSettings(
        bootstrap.n_resamples, bootstrap.seed, confidence, bootstrap.n_speakers, int(valid.size - valid.sum())
    )
    return _result(entries, bootstrap, n_seeds, confidence, is_difference, settings)


def _from_single_seed(single, bootstrap: SpeakerBootstrap, confidence: float, is_difference: bool) -> PooledResult:
    """One seed: the speaker bootstrap's own result (percentile interval, bootstrap p-value) as pooled entries."""

    def entry(item: Interval | Difference) -> PooledEntry:
        value = item.difference if isinstance(item, Difference) else item.value
        if value is None:
            return PooledEntry(None, None, None, None, None, 1)
        p_value = item.p_value if isinstance(item, Difference) else None
        return PooledEntry(value, None, item.low, item.high, (item.high - item.low) / 2, 1, p_value)

    entries = [entry(single.eer)] + [entry(e) for e in single.min_dcf.values()]
    entries += [entry(e) for e in single.tar_at_far.values()]
    return _result(entries, bootstrap, 1, confidence, is_difference, single.settings)


def _result(entries, bootstrap: SpeakerBootstrap, n_seeds, confidence, is_difference, settings) -> PooledResult:
    n_priors = len(bootstrap.p_targets)
    return PooledResult(
        eer=entries[0],
        min_dcf=dict(zip(bootstrap.p_targets, entries[1 : 1 + n_priors])),
        tar_at_far=dict(zip(bootstrap.fars, entries[1 + n_priors :])),
        n_seeds=n_seeds,
        confidence=confidence,
        is_difference=is_difference,
        settings=settings,
    )


def _speaker_bootstrap(labels, enrol_speakers, test_speakers, p_targets, fars, n_resamples, seed) -> SpeakerBootstrap:
    enrol = [str(speaker) for speaker in enrol_speakers]
    test = [str(speaker) for speaker in test_speakers]
    identity = {speaker: speaker for speaker in set(enrol) | set(test)}  # the trials already name speakers
    return SpeakerBootstrap(labels, enrol, test, identity, n_resamples, seed, p_targets, fars)


def _check_runs(scores_by_seed: Sequence[ArrayLike], name: str) -> list[np.ndarray]:
    runs = [np.asarray(scores, dtype=np.float64) for scores in scores_by_seed]
    if not runs:
        raise ValueError(f"{name} is empty: pooling needs at least one run")
    return runs


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def _as_floats(replicates: Replicates) -> np.ndarray:
    """Point values in the row order of ``Replicates.values``; a metric not reported is NaN."""
    return np.array([np.nan if v is None else v for v in replicates.point_values()], dtype=np.float64)
