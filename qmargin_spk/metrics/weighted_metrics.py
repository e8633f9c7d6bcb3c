"""Verification metrics of one scored list under many integer trial weightings at once (bootstrap kernels).

A speaker resample keeps every trial with an integer weight (see :mod:`qmargin_spk.metrics.bootstrap`).
The trials are sorted by score once; for a block of resamples the weighted target and
non-target counts below each operating point are row-wise cumulative sums, from which EER,
minDCF and TAR@FAR follow with the conventions of ``compute_metrics(convention="default")``
(ties grouped, interpolated EER, normalised minDCF, the highest TAR with FPR <= FAR), so a
weighting gives the same floats as ``compute_metrics`` on the materialised resampled list.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class WeightedTrials:
    """One system's trials sorted once; metrics for any block of speaker multiplicities."""

    def __init__(self, scores: np.ndarray, labels: np.ndarray, enrol_index: np.ndarray, test_index: np.ndarray) -> None:
        order = np.argsort(scores, kind="stable")
        sorted_scores, sorted_labels = scores[order], labels[order]
        # Operating points as in verification._grouped_points: one per distinct score, plus reject-all.
        group_starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
        trials_below = np.r_[group_starts, sorted_scores.size]
        targets_before = np.r_[0, np.cumsum(sorted_labels, dtype=np.int64)]
        self.targets_below = targets_before[trials_below]  # unweighted counts: where to read the cumulative sums
        self.nontargets_below = trials_below - self.targets_below
        target_trials, nontarget_trials = order[sorted_labels], order[~sorted_labels]
        self.target_speaker = enrol_index[target_trials]
        self.nontarget_enrol = enrol_index[nontarget_trials]
        self.nontarget_test = test_index[nontarget_trials]

    def metrics(self, counts: np.ndarray, p_targets: Sequence[float], fars: Sequence[float]) -> np.ndarray:
        """``(metrics, resamples)`` values for the speaker counts ``(resamples, speakers)``."""
        # np.take keeps rows contiguous (``a[:, index]`` would not), which the row-wise reductions need.
        target_below = np.take(_cumulative(np.take(counts, self.target_speaker, axis=1)), self.targets_below, axis=1)
        enrol_counts = np.take(counts, self.nontarget_enrol, axis=1)
        nontarget_weights = enrol_counts * np.take(counts, self.nontarget_test, axis=1)
        nontarget_below = np.take(_cumulative(nontarget_weights), self.nontargets_below, axis=1)
        n_target, n_nontarget = target_below[:, -1:], nontarget_below[:, -1:]
        with np.errstate(divide="ignore", invalid="ignore"):
            fnr = target_below / n_target
            # -FPR, exactly (negation is exact in IEEE arithmetic): ascending, so searchsorted needs no copy.
            neg_fpr = (nontarget_below - n_nontarget) / n_nontarget
        values = np.vstack(
            [_equal_error_rates(fnr, neg_fpr)]
            + [(fnr * p - neg_fpr * (1 - p)).min(axis=1) / min(p, 1 - p) for p in p_targets]
            + [_tar_at_far(fnr, neg_fpr, far) for far in fars]
        )
        degenerate = (n_target[:, 0] == 0) | (n_nontarget[:, 0] == 0)
        values[:, degenerate] = np.nan
        return values


def _cumulative(weights: np.ndarray) -> np.ndarray:
    """Row-wise cumulative sums with a leading 0: column ``k`` is the sum of the first ``k`` weights."""
    out = np.zeros((weights.shape[0], weights.shape[1] + 1), dtype=np.int64)
    np.cumsum(weights, axis=1, dtype=np.int64, out=out[:, 1:])
    return out


def _equal_error_rates(fnr: np.ndarray, neg_fpr: np.ndarray) -> np.ndarray:
    """Row-wise ``OperatingPoints.equal_error_rate`` (same arithmetic, so the same floats)."""
    rows = np.arange(fnr.shape[0])
    diff = fnr + neg_fpr  # FNR - FPR
    upper = np.argmax(diff >= 0, axis=1)
    lower = np.maximum(upper - 1, 0)
    fnr_upper, fnr_lower = fnr[rows, upper], fnr[rows, lower]
    fpr_upper, fpr_lower = -neg_fpr[rows, upper], -neg_fpr[rows, lower]
    with np.errstate(divide="ignore", invalid="ignore"):
        weight = diff[rows, upper] / (fpr_lower - fpr_upper - (fnr_lower - fnr_upper))
        eer = fnr_upper + weight * (fnr_lower - fnr_upper)
    return np.where(upper == 0, fnr[:, 0], eer)


def _tar_at_far(fnr: np.ndarray, neg_fpr: np.ndarray, far: float) -> np.ndarray:
    """Row-wise TAR at the first point with FPR <= ``far`` (-FPR is non-decreasing along a row)."""
    first = np.array([np.searchsorted(row, -far, side="left") for row in neg_fpr])
    first = np.minimum(first, fnr.shape[1] - 1)  # only NaN rows (degenerate resamples) can run past the end
    return 1 - fnr[np.arange(fnr.shape[0]), first]
