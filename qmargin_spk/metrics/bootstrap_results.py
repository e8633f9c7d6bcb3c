"""What the speaker bootstrap returns: intervals, paired differences, their settings and the raw replicates.

Each result serialises to JSON with :meth:`to_dict` (priors and FARs as ``%g`` keys, as in
:meth:`VerificationMetrics.to_dict`); the design is described in :mod:`qmargin_spk.metrics.bootstrap`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qmargin_spk.metrics.verification import VerificationMetrics

DESIGN = "two-way speaker bootstrap (speakers drawn with replacement; target weight m_s, non-target m_s*m_t)"
INTERVAL = "percentile"


@dataclass(frozen=True)
class Interval:
    """A metric's point estimate and its bootstrap interval (all None when the metric is not reported)."""

    value: float | None
    low: float | None
    high: float | None

    def to_dict(self) -> dict:
        return {"value": self.value, "low": self.low, "high": self.high}


@dataclass(frozen=True)
class Difference:
    """System b minus system a on one metric: point difference, its interval and two-sided p-value."""

    a: float | None
    b: float | None
    difference: float | None
    low: float | None
    high: float | None
    p_value: float | None

    def to_dict(self) -> dict:
        return {
            "a": self.a,
            "b": self.b,
            "difference": self.difference,
            "low": self.low,
            "high": self.high,
            "p_value": self.p_value,
        }


@dataclass(frozen=True)
class BootstrapSettings:
    """How the intervals were made (recorded with every result)."""

    n_resamples: int
    seed: int
    confidence: float
    n_speakers: int
    n_degenerate: int

    def to_dict(self) -> dict:
        return {
            "design": DESIGN,
            "interval": INTERVAL,
            "n_resamples": self.n_resamples,
            "seed": self.seed,
            "confidence": self.confidence,
            "n_speakers": self.n_speakers,
            "n_degenerate": self.n_degenerate,
        }


@dataclass(frozen=True)
class BootstrapResult:
    """Intervals of EER, minDCF per P_target and TAR per FAR of one system on one trial list."""

    eer: Interval
    min_dcf: dict[float, Interval]
    tar_at_far: dict[float, Interval]
    settings: BootstrapSettings

    def to_dict(self) -> dict:
        """JSON-ready; priors and FARs become ``%g`` keys as in :meth:`VerificationMetrics.to_dict`."""
        return _nested(self.eer, self.min_dcf, self.tar_at_far, self.settings)


@dataclass(frozen=True)
class ComparisonResult:
    """Differences ``b - a`` of every metric from the same resamples of both systems."""

    eer: Difference
    min_dcf: dict[float, Difference]
    tar_at_far: dict[float, Difference]
    settings: BootstrapSettings

    def to_dict(self) -> dict:
        return _nested(self.eer, self.min_dcf, self.tar_at_far, self.settings)


@dataclass(frozen=True)
class Replicates:
    """One system's metrics on the list (``point``) and on every resample (``values``).

    ``values`` has one row per metric, in the order EER, minDCF per P_target, TAR per
    FAR, and one column per resample; degenerate resamples are NaN.
    """

    point: VerificationMetrics
    values: np.ndarray

    def point_values(self) -> list[float | None]:
        """The point estimates in the row order of ``values``."""
        return (
            [self.point.eer]
            + [entry.value for entry in self.point.min_dcf]
            + [entry.tar for entry in self.point.tar_at_far]
        )


def _nested(eer, min_dcf: dict, tar_at_far: dict, settings: BootstrapSettings) -> dict:
    return {
        "eer": eer.to_dict(),
        "min_dcf": {f"{p:g}": entry.to_dict() for p, entry in min_dcf.items()},
        "tar_at_far": {f"{far:g}": entry.to_dict() for far, entry in tar_at_far.items()},
        "bootstrap": settings.to_dict(),
    }
