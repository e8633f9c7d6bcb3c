"""Speaker-verification metrics: EER, minDCF, TAR at fixed FAR, DET curves."""
from qmargin_spk.metrics.det import det_available, plot_det, probit
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
    "CONVENTIONS",
    "DEFAULT_FARS",
    "DEFAULT_P_TARGETS",
    "MinDcf",
    "OperatingPoints",
    "TarAtFar",
    "VerificationMetrics",
    "compute_metrics",
    "det_available",
    "operating_points",
    "plot_det",
    "probit",
    "validate_trials",
]
