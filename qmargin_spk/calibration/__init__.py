"""Score calibration: logistic regression of scores (and quality measures) into log-likelihood ratios."""
from qmargin_spk.calibration.apply import calibrate_run, calibrate_score_file, calibration_table, write_calibrated_results
from qmargin_spk.calibration.logistic import CALIBRATION_FORMAT, Calibration, fit_calibration
from qmargin_spk.calibration.quality import (
    DEFAULT_TOP_N,
    QUALITY_INPUTS,
    imposter_means,
    trial_quality,
    utterance_quality,
)

__all__ = [
    "CALIBRATION_FORMAT",
    "Calibration",
    "calibrate_run",
    "DEFAULT_TOP_N",
    "QUALITY_INPUTS",
    "calibrate_score_file",
    "calibration_table",
    "fit_calibration",
    "imposter_means",
    "trial_quality",
    "utterance_quality",
    "write_calibrated_results",
]
