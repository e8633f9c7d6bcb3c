"""Calibration metrics of log-likelihood-ratio scores: Cllr, min Cllr and actual DCF.

Conventions (natural-log LLRs, ``c_miss = c_fa = 1``):

``Cllr`` (Brümmer and du Preez, 2006), in bits::

    Cllr = 1 / (2 log 2) * ( mean_targets log(1 + e^-llr) + mean_nontargets log(1 + e^llr) )

It is 1 for a system that always says LLR = 0, and 0 only for perfect, infinitely
confident LLRs.

``min Cllr``: the Cllr of the best monotonic (non-decreasing) map of the scores to
LLRs, found by the pool-adjacent-violators algorithm (scikit-learn's
``IsotonicRegression``) fitted to the 0/1 labels; the resulting posteriors ``p`` become
LLRs ``logit(p) - log(N_target / N_nontarget)`` (the empirical prior removed). Tied scores
are pooled into one block and so share one LLR: a function of the scores cannot
separate them (the "secondary" tie convention, neither optimistic nor pessimistic).
``Cllr - min Cllr`` is the calibration loss; min Cllr is unchanged by any increasing map
of the scores, so it is defined for raw scores too.

``actual DCF`` at a target prior ``P``: trials are accepted when
``llr >= log((1 - P) / P)`` (the Bayes threshold ``-logit(P)``), and the cost
``P * P_miss + (1 - P) * P_fa`` is normalised by ``min(P, 1 - P)`` like the default
minDCF, so ``actual DCF >= minDCF`` always and equality means perfect calibration at P.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from numpy.typing import ArrayLike
from sklearn.isotonic import IsotonicRegression

from qmargin_spk.metrics.verification import DEFAULT_P_TARGETS, validate_trials


@dataclass(frozen=True)
class ActDcf:
    """Normalised detection cost at ``p_target`` when deciding at the Bayes threshold of the LLRs."""

    p_target: float
    value: float
    threshold: float


@dataclass(frozen=True)
class CalibrationMetrics:
    """Cllr, min Cllr (bits) and the actual DCF at each target prior of one list of LLR scores."""

    cllr: float
    min_cllr: float
    act_dcf: tuple[ActDcf, ...]

    def act_dcf_at(self, p_target: float) -> ActDcf:
        """The actual-DCF entry computed for ``p_target``."""
        return next(entry for entry in self.act_dcf if entry.p_target == p_target)

    def to_dict(self) -> dict:
        """JSON-ready dict; priors become keys formatted with ``%g``."""
        return {
            "cllr": self.cllr,
            "min_cllr": self.min_cllr,
            "act_dcf": {f"{e.p_target:g}": {"value": e.value, "threshold": e.threshold} for e in self.act_dcf},
        }


def bayes_threshold(p_target: float) -> float:
    """LLR above which accepting costs less than rejecting at prior ``p_target``: ``log((1 - P) / P)``."""
    if not 0 < p_target < 1:
        raise ValueError(f"p_target must be in (0, 1), got {p_target}")
    return math.log((1 - p_target) / p_target)


def cllr(llrs: ArrayLike, labels: ArrayLike) -> float:
    """Log-likelihood-ratio cost in bits (module docstring); ``llrs`` may hold +-inf."""
    llrs, labels = _validate_llrs(llrs, labels)
    return _cllr(llrs, labels)


def min_cllr(scores: ArrayLike, labels: ArrayLike) -> float:
    """Cllr after the optimal monotonic score-to-LLR map (PAV, ties pooled)."""
    scores, labels = validate_trials(scores, labels)
    return _cllr(pav_llrs(scores, labels), labels)


def pav_llrs(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """LLRs of the PAV (isotonic) fit of the labels on the scores; +-inf where a block is pure."""
    posteriors = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True).fit_transform(
        scores, labels.astype(np.float64)
    )
    n_target = int(labels.sum())
    prior_log_odds = math.log(n_target / (labels.size - n_target))
    with np.errstate(divide="ignore"):
        return np.log(posteriors) - np.log1p(-posteriors) - prior_log_odds


def actual_dcf(llrs: ArrayLike, labels: ArrayLike, p_target: float) -> ActDcf:
    """Normalised cost of the Bayes decisions ``llr >= log((1 - P) / P)`` at ``p_target``."""
    llrs, labels = _validate_llrs(llrs, labels)
    return _actual_dcf(llrs, labels, p_target)


def calibration_metrics(
    llrs: ArrayLike, labels: ArrayLike, p_targets: Sequence[float] = DEFAULT_P_TARGETS
) -> CalibrationMetrics:
    """Cllr, min Cllr and actual DCF at each of ``p_targets`` of LLR scores."""
    llrs, labels = _validate_llrs(llrs, labels)
    finite_scores = np.clip(llrs, -np.finfo(np.float64).max, np.finfo(np.float64).max)
    return CalibrationMetrics(
        cllr=_cllr(llrs, labels),
        min_cllr=_cllr(pav_llrs(finite_scores, labels), labels),
        act_dcf=tuple(_actual_dcf(llrs, labels, p) for p in p_targets),
    )


def _validate_llrs(llrs: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Like :func:`validate_trials`, except that infinite LLRs (certainty) are allowed; NaN is not."""
    llrs = np.asarray(llrs, dtype=np.float64)
    nan = np.flatnonzero(np.isnan(llrs).reshape(-1))
    if nan.size:
        raise ValueError(f"{nan.size} LLRs are NaN (first at index {nan[0]})")
    _, labels = validate_trials(np.where(np.isinf(llrs), 0.0, llrs), labels)
    return llrs, labels


def _cllr(llrs: np.ndarray, labels: np.ndarray) -> float:
    """Cllr of validated arrays; ``logaddexp`` keeps it exact for large and infinite LLRs."""
    target_cost = np.logaddexp(0.0, -llrs[labels]).mean()
    nontarget_cost = np.logaddexp(0.0, llrs[~labels]).mean()
    return float((target_cost + nontarget_cost) / (2 * math.log(2)))


def _actual_dcf(llrs: np.ndarray, labels: np.ndarray, p_target: float) -> ActDcf:
    threshold = bayes_threshold(p_target)
    accepted = llrs >= threshold
    miss = float(np.mean(~accepted[labels]))
    false_alarm = float(np.mean(accepted[~labels]))
    cost = p_target * miss + (1 - p_target) * false_alarm
    return ActDcf(p_target, cost / min(p_target, 1 - p_target), threshold)
