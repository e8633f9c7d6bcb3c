"""Score calibration: fit scores (and quality measures) into log-likelihood ratios, apply, measure.

Everything but the quality measures lives in :mod:`qmargin_spk.calibration.llr`
(fit, apply to score files, Cllr, min Cllr, actual DCF, Bayes threshold); the quality
measures (durations, imposter means) in :mod:`qmargin_spk.calibration.quality`.
"""

from qmargin_spk.calibration.llr import (
    CALIBRATION_FORMAT,
    SCORE_INPUT,
    ActDcf,
    Calibration,
    CalibrationMetrics,
    actual_dcf,
    bayes_threshold,
    calibrate_run,
    calibrate_score_file,
    calibration_metrics,
    calibration_table,
    cllr,
    fit_calibration,
    llr_metrics,
    min_cllr,
    pav_llrs,
    write_calibrated_results,
)
from qmargin_spk.calibration.quality import (
    DEFAULT_TOP_N,
    QUALITY_INPUTS,
    imposter_means,
    trial_quality,
    utterance_quality,
)

__all__ = [
    "ActDcf",
    "CALIBRATION_FORMAT",
    "Calibration",
    "CalibrationMetrics",
    "DEFAULT_TOP_N",
    "QUALITY_INPUTS",
    "SCORE_INPUT",
    "actual_dcf",
    "bayes_threshold",
    "calibrate_run",
    "calibrate_score_file",
    "calibration_metrics",
    "calibration_table",
    "cllr",
    "fit_calibration",
    "imposter_means",
    "llr_metrics",
    "min_cllr",
    "pav_llrs",
    "trial_quality",
    "utterance_quality",
    "write_calibrated_results",
]
