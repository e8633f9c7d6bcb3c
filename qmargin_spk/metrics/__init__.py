"""Speaker-verification metrics: EER, minDCF, TAR at fixed FAR, DET curves; Cllr and actual DCF of LLRs."""
from qmargin_spk.metrics.calibration import (
    ActDcf,
    CalibrationMetrics,
    actual_dcf,
    bayes_threshold,
    calibration_metrics,
    cllr,
    min_cllr,
)
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
    "ActDcf",
    "CalibrationMetrics",
    "actual_dcf",
    "bayes_threshold",
    "calibration_metrics",
    "cllr",
    "min_cllr",
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
