"""Speaker-verification metrics: EER, minDCF, TAR at fixed FAR, DET curves, speaker-bootstrap intervals, seed pooling.

Cllr and actual DCF of calibrated LLRs are :mod:`qmargin_spk.calibration`'s."""

from qmargin_spk.metrics.bootstrap import (
    BootstrapResult,
    ComparisonResult,
    Difference,
    Interval,
    Replicates,
    SpeakerBootstrap,
    bootstrap_metrics,
    paired_comparison,
    utterance_speakers,
)
from qmargin_spk.metrics.det import det_available, plot_det, plot_det_curves, probit
from qmargin_spk.metrics.pooled import (
    PooledEntry,
    PooledResult,
    pool_difference,
    pool_system,
    pool_systems_against_baseline,
)
from qmargin_spk.metrics.verification import (
    CONVENTIONS,
    DEFAULT_FARS,
    DEFAULT_P_TARGETS,
    MinDcf,
    OperatingPoints,
    TarAtFar,
    VerificationMetrics,
    compute_metrics,
    operating_points,
    validate_trials,
)

__all__ = [
    "BootstrapResult",
    "CONVENTIONS",
    "ComparisonResult",
    "DEFAULT_FARS",
    "DEFAULT_P_TARGETS",
    "Difference",
    "Interval",
    "MinDcf",
    "OperatingPoints",
    "PooledEntry",
    "PooledResult",
    "Replicates",
    "SpeakerBootstrap",
    "TarAtFar",
    "VerificationMetrics",
    "bootstrap_metrics",
    "compute_metrics",
    "det_available",
    "operating_points",
    "paired_comparison",
    "plot_det",
    "plot_det_curves",
    "pool_difference",
    "pool_system",
    "pool_systems_against_baseline",
    "probit",
    "utterance_speakers",
    "validate_trials",
]
