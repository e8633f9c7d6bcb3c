"""Verification metrics (EER, minDCF, TAR at fixed FAR) from one sort of the scores.

The conventions are described in ``docs/metrics.md``. Three are available:

``"default"`` (what this project reports)
    One operating point per *distinct* score (ties grouped), a trial being accepted
    when ``score >= threshold``, plus the reject-all point. EER is linearly
    interpolated between the two operating points that bracket FNR = FPR; minDCF is
    normalised by ``min(P_target, 1 - P_target)``.
``"speechbrain"``
    Exactly what ``speechbrain.utils.metric_stats.EER`` and ``minDCF`` (v1.1) return
    for float64 score tensors: thresholds are the distinct scores and the midpoints
    between neighbours, rates are float32, EER is ``(FAR + FRR) / 2`` at the threshold
    found by SpeechBrain's first-strict-improvement scan, minDCF is *not* normalised.
    Computed here with searchsorted instead of SpeechBrain's O(N^2) loop and its
    thresholds x trials matrix.
``"kaldi"``
    One operating point per trial after a stable sort, no tie grouping and no
    accept-all point (NIST SRE ``compute_pmiss_pfa_rbst``, Kaldi
    ``sid/compute_min_dcf.py``). EER: the interpolation of WeSpeaker's
    ``compute_eer`` between the last point with FNR < FPR and the first with
    FNR >= FPR, threshold the sorted score of the latter; minDCF: Kaldi's
    ``ComputeMinDcf`` (first minimum, normalised).

TAR at FAR always uses the default operating points, whatever the convention:
``TAR@FAR`` is the highest TAR = 1 - FNR among the operating points whose FPR <= FAR
(the point with the lowest such threshold). It is reported as ``None`` when
``FAR * N_nontarget < 10``: fewer than ten false accepts make the number meaningless.

All costs use ``c_miss = c_fa = 1``. Measures of calibrated LLR scores (Cllr, actual DCF)
are :mod:`qmargin_spk.calibration`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

CONVENTIONS = ("default", "speechbrain", "kaldi")
DEFAULT_P_TARGETS = (0.01, 0.05)
DEFAULT_FARS = (1e-2, 1e-3, 1e-4, 1e-5)
MIN_FALSE_ACCEPTS = 10
NOT_ENOUGH_NONTARGETS = "not enough non-target trials"


@dataclass(frozen=True)
class OperatingPoints:
    """FNR and FPR at increasing thresholds (as float64 arrays of equal length).

    From :func:`operating_points`: a trial is accepted when ``score >= threshold``;
    the first point accepts everything (FNR 0, FPR 1), the last one rejects
    everything (its threshold is the next float above the highest score).
    """

    thresholds: np.ndarray
    fnr: np.ndarray
    fpr: np.ndarray

    def equal_error_rate(self) -> tuple[float, float]:
        """EER interpolated between the points that bracket FNR = FPR, and its threshold.

        The threshold is that of the first point with FNR >= FPR.
        """
        diff = self.fnr - self.fpr
        upper = int(np.argmax(diff >= 0))
        if upper == 0:
            return float(self.fnr[0]), float(self.thresholds[0])
        lower = upper - 1
        # Intersection of the segment [lower, upper] with FNR = FPR (NIST / WeSpeaker compute_eer).
        weight = diff[upper] / (self.fpr[lower] - self.fpr[upper] - (self.fnr[lower] - self.fnr[upper]))
        eer = self.fnr[upper] + weight * (self.fnr[lower] - self.fnr[upper])
        return float(eer), float(self.thresholds[upper])

    def min_dcf(self, p_target: float, normalised: bool = True) -> MinDcf:
        """Minimum of ``P_target FNR + (1 - P_target) FPR`` (first minimum), optionally normalised."""
        cost = self.fnr * p_target + self.fpr * (1 - p_target)
        best = int(np.argmin(cost))
        value = cost[best] / min(p_target, 1 - p_target) if normalised else cost[best]
        return MinDcf(p_target, float(value), float(self.thresholds[best]))


@dataclass(frozen=True)
class MinDcf:
    """Minimum detection cost at one target prior and the threshold reaching it."""

    p_target: float
    value: float
    threshold: float


@dataclass(frozen=True)
class TarAtFar:
    """True-accept rate at a false-accept rate; ``tar`` is None (with ``reason``) when unreliable."""

    far: float
    tar: float | None
    threshold: float | None
    reason: str | None = None


@dataclass(frozen=True)
class VerificationMetrics:
    """Everything :func:`compute_metrics` measures on one trial list."""

    convention: str
    n_target: int
    n_nontarget: int
    eer: float
    eer_threshold: float
    min_dcf: tuple[MinDcf, ...]
    min_dcf_normalised: bool
    tar_at_far: tuple[TarAtFar, ...]

    def min_dcf_at(self, p_target: float) -> MinDcf:
        """The minDCF entry computed for ``p_target``."""
        return next(entry for entry in self.min_dcf if entry.p_target == p_target)

    def tar_at(self, far: float) -> TarAtFar:
        """The TAR entry computed for ``far``."""
        return next(entry for entry in self.tar_at_far if entry.far == far)

    def to_dict(self) -> dict:
        """JSON-ready dict; priors and FARs become keys formatted with ``%g``."""
        return {
            "convention": self.convention,
            "n_target": self.n_target,
            "n_nontarget": self.n_nontarget,
            "eer": self.eer,
            "eer_threshold": self.eer_threshold,
            "min_dcf_normalised": self.min_dcf_normalised,
            "min_dcf": {
                f"{entry.p_target:g}": {"value": entry.value, "threshold": entry.threshold} for entry in self.min_dcf
            },
            "tar_at_far": {
                f"{entry.far:g}": {"tar": entry.tar, "threshold": entry.threshold, "reason": entry.reason}
                for entry in self.tar_at_far
            },
        }


def validate_trials(scores: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(float64 scores, bool labels)`` or raise ValueError saying what is wrong."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if scores.ndim != 1 or labels.ndim != 1:
        raise ValueError(f"scores and labels must be 1-D, got shapes {scores.shape} and {labels.shape}")
    if scores.size == 0:
        raise ValueError("no trials: scores and labels are empty")
    if scores.size != labels.size:
        raise ValueError(f"length mismatch: {scores.size} scores but {labels.size} labels")
    bad_scores = np.flatnonzero(~np.isfinite(scores))
    if bad_scores.size:
        raise ValueError(
            f"{bad_scores.size} scores are NaN or inf (first at index {bad_scores[0]}: {scores[bad_scores[0]]})"
        )
    if labels.dtype != np.bool_:
        bad_labels = np.flatnonzero((labels != 0) & (labels != 1))
        if bad_labels.size:
            raise ValueError(
                f"labels must be 0 or 1: {bad_labels.size} are not "
                f"(first at index {bad_labels[0]}: {labels[bad_labels[0]]!r})"
            )
    labels = labels.astype(bool)
    n_target = int(labels.sum())
    if n_target == 0 or n_target == labels.size:
        kind = "target" if n_target else "non-target"
        raise ValueError(f"only {kind} trials ({labels.size}): EER and minDCF need both classes")
    return scores, labels


def operating_points(scores: ArrayLike, labels: ArrayLike) -> OperatingPoints:
    """Default-convention operating points (ties grouped) of a trial list."""
    scores, labels = validate_trials(scores, labels)
    order = np.argsort(scores, kind="stable")
    return _grouped_points(scores[order], labels[order])


def compute_metrics(
    scores: ArrayLike,
    labels: ArrayLike,
    p_targets: Sequence[float] = DEFAULT_P_TARGETS,
    fars: Sequence[float] = DEFAULT_FARS,
    convention: str = "default",
) -> VerificationMetrics:
    """EER, minDCF at each ``p_targets`` and TAR at each ``fars`` of one trial list.

    ``scores``: higher means more likely the same speaker; ``labels``: 1 (or True) for
    target trials. See the module docstring for the conventions; O(N log N), one sort.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown convention {convention!r}, expected one of {CONVENTIONS}")
    scores, labels = validate_trials(scores, labels)
    order = np.argsort(scores, kind="stable")
    sorted_scores, sorted_labels = scores[order], labels[order]
    grouped = _grouped_points(sorted_scores, sorted_labels)
    n_target = int(sorted_labels.sum())
    n_nontarget = sorted_labels.size - n_target

    if convention == "speechbrain":
        eer, eer_threshold, min_dcf = _speechbrain_metrics(sorted_scores, sorted_labels, grouped, p_targets)
    else:
        points = grouped if convention == "default" else _per_trial_points(sorted_scores, sorted_labels)
        eer, eer_threshold = points.equal_error_rate()
        min_dcf = tuple(points.min_dcf(p) for p in p_targets)

    return VerificationMetrics(
        convention=convention,
        n_target=n_target,
        n_nontarget=n_nontarget,
        eer=eer,
        eer_threshold=eer_threshold,
        min_dcf=min_dcf,
        min_dcf_normalised=convention != "speechbrain",
        tar_at_far=tuple(_tar_at_far(grouped, far, n_nontarget) for far in fars),
    )


def _grouped_points(sorted_scores: np.ndarray, sorted_labels: np.ndarray) -> OperatingPoints:
    """One point per distinct score (accept ``score >= threshold``) plus reject-all."""
    n_trials = sorted_scores.size
    group_starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    targets_before = np.r_[0, np.cumsum(sorted_labels, dtype=np.int64)]
    trials_below = np.r_[group_starts, n_trials]
    targets_below = targets_before[trials_below]
    n_target = targets_before[-1]
    n_nontarget = n_trials - n_target
    nontargets_accepted = n_nontarget - (trials_below - targets_below)
    thresholds = np.r_[sorted_scores[group_starts], np.nextafter(sorted_scores[-1], np.inf)]
    return OperatingPoints(thresholds, targets_below / n_target, nontargets_accepted / n_nontarget)


def _per_trial_points(sorted_scores: np.ndarray, sorted_labels: np.ndarray) -> OperatingPoints:
    """Kaldi/NIST points: after the i-th sorted trial, trials 0..i rejected (no tie grouping)."""
    targets_rejected = np.cumsum(sorted_labels, dtype=np.int64)
    nontargets_rejected = np.arange(1, sorted_labels.size + 1) - targets_rejected
    fnr = targets_rejected / targets_rejected[-1]
    fpr = 1 - nontargets_rejected / nontargets_rejected[-1]
    return OperatingPoints(sorted_scores, fnr, fpr)


def _tar_at_far(points: OperatingPoints, far: float, n_nontarget: int) -> TarAtFar:
    """Highest TAR among the points with FPR <= ``far`` (FPR is non-increasing)."""
    if far * n_nontarget < MIN_FALSE_ACCEPTS:
        reason = (
            f"{NOT_ENOUGH_NONTARGETS}: FAR {far:g} x {n_nontarget} non-target trials "
            f"< {MIN_FALSE_ACCEPTS} false accepts"
        )
        return TarAtFar(far, None, None, reason)
    first = int(np.searchsorted(-points.fpr, -far, side="left"))
    return TarAtFar(far, float(1 - points.fnr[first]), float(points.thresholds[first]))


def _speechbrain_metrics(
    sorted_scores: np.ndarray,
    sorted_labels: np.ndarray,
    grouped: OperatingPoints,
    p_targets: Sequence[float],
) -> tuple[float, float, tuple[MinDcf, ...]]:
    """SpeechBrain 1.1 ``EER`` and ``minDCF``, reproduced bit for bit (see module docstring)."""
    distinct = grouped.thresholds[:-1]
    thresholds = np.empty(2 * distinct.size - 1)
    thresholds[0::2] = distinct
    thresholds[1::2] = (distinct[:-1] + distinct[1:]) / 2  # lies between its neighbours: already sorted
    target_scores = sorted_scores[sorted_labels]
    nontarget_scores = sorted_scores[~sorted_labels]
    # SpeechBrain: FRR = #(target <= t) / P and FAR = #(non-target > t) / N, in float32.
    frr = np.searchsorted(target_scores, thresholds, side="right").astype(np.float32)
    frr /= np.float32(target_scores.size)
    far = (nontarget_scores.size - np.searchsorted(nontarget_scores, thresholds, side="right")).astype(np.float32)
    far /= np.float32(nontarget_scores.size)

    eer_index = _speechbrain_eer_index(frr, far)
    eer = (float(far[eer_index]) + float(frr[eer_index])) / 2

    min_dcf = []
    for p_target in p_targets:
        cost = frr * np.float32(p_target) + far * np.float32(1 - p_target)
        best = int(np.argmin(cost))
        min_dcf.append(MinDcf(p_target, float(cost[best]), float(thresholds[best])))
    return eer, float(thresholds[eer_index]), tuple(min_dcf)


def _speechbrain_eer_index(frr: np.ndarray, far: np.ndarray) -> int:
    """Index where SpeechBrain's EER loop stops, without the loop.

    The loop keeps index ``m`` and moves to ``i`` when ``r[i] < e[m]``, where ``r`` is
    ``|FAR - FRR|`` subtracted in float32 and ``e`` the same difference taken exactly
    (in float64). Since ``r`` is ``e`` rounded, the first index reaching ``min(r)`` is
    always taken, no other value can win afterwards, and later indices with the same
    ``r`` keep being taken until one whose exact gap ``e`` is not above ``min(r)``.
    """
    rounded_gap = np.abs(far - frr).astype(np.float64)
    exact_gap = np.abs(far.astype(np.float64) - frr.astype(np.float64))
    smallest = rounded_gap.min()
    ties = np.flatnonzero(rounded_gap == smallest)
    settled = ties[exact_gap[ties] <= smallest]
    return int(settled[0]) if settled.size else int(ties[-1])
