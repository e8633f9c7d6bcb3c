"""Benchmark: our verification metrics vs SpeechBrain and a scikit-learn ROC EER; prints JSON.

Synthetic continuous cosine-like scores (about 50 % target trials, as in the cleaned
VoxCeleb1 lists) at Vox1-E size (579,818 trials) and Vox1-O size (37,611 trials).
With continuous scores all conventions should agree on the EER (the equal-EER checks).
Run: ``.venv/bin/python bench/metrics.py``.
"""

from __future__ import annotations

import json
import os
import platform
import time

import numpy as np
import torch

from qmargin_spk.metrics import compute_metrics

VOX1_E_TRIALS = 579_818
VOX1_O_TRIALS = 37_611
TARGET_FRACTION = 0.5
SPEECHBRAIN_MINDCF_LIMIT_BYTES = 2 * 2**30


def synthetic_trials(n_trials: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Target scores ~ N(0.56, 0.12), non-target ~ N(0.05, 0.10): EER near 1 %, like a good ECAPA."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n_trials) < TARGET_FRACTION).astype(np.int8)
    scores = np.where(labels == 1, rng.normal(0.56, 0.12, n_trials), rng.normal(0.05, 0.10, n_trials))
    return scores, labels


def best_time(function, repeats: int) -> tuple[float, object]:
    """Fastest of ``repeats`` runs (seconds) and the last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return min(times), result


def sklearn_roc_eer(scores: np.ndarray, labels: np.ndarray) -> float:
    """EER from ``sklearn.metrics.roc_curve``: linear interpolation where FNR crosses FPR."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    fnr = 1 - tpr
    upper = int(np.argmax(fnr <= fpr))  # ROC points go from reject-all to accept-all
    lower = upper - 1
    weight = (fpr[lower] - fnr[lower]) / ((fnr[upper] - fnr[lower]) - (fpr[upper] - fpr[lower]))
    return float(fnr[lower] + weight * (fnr[upper] - fnr[lower]))


def speechbrain_mindcf_bytes(n_target: int, n_nontarget: int, n_distinct: int) -> int:
    """Peak of SpeechBrain's minDCF: float64 thresholds x targets copy plus its bool mask (then non-targets)."""
    n_thresholds = 2 * n_distinct - 1
    return n_thresholds * max(n_target, n_nontarget) * (8 + 1)


def full_metrics(scores: np.ndarray, labels: np.ndarray, convention: str = "default"):
    """EER + minDCF at 0.01 and 0.05 + TAR at four FARs (the project's report)."""
    return compute_metrics(scores, labels, convention=convention)


def main() -> None:
    from speechbrain.utils.metric_stats import EER, minDCF

    report: dict = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "torch": torch.__version__,
        },
        "data": f"synthetic continuous scores, target fraction {TARGET_FRACTION}",
    }

    e_scores, e_labels = synthetic_trials(VOX1_E_TRIALS, seed=1)
    e_time, e_metrics = best_time(lambda: full_metrics(e_scores, e_labels), repeats=5)
    sklearn_e_time, sklearn_e_eer = best_time(lambda: sklearn_roc_eer(e_scores, e_labels), repeats=3)
    report["vox1_e_size"] = {
        "n_trials": VOX1_E_TRIALS,
        "n_target": e_metrics.n_target,
        "ours_full_metrics_s": round(e_time, 4),
        "target_s": 1.0,
        "meets_target": e_time < 1.0,
        "ours_eer_percent": 100 * e_metrics.eer,
        "sklearn_roc_eer_s": round(sklearn_e_time, 4),
        "sklearn_roc_eer_percent": 100 * sklearn_e_eer,
        "abs_diff_eer_percent_vs_sklearn": abs(100 * (e_metrics.eer - sklearn_e_eer)),
        "tar_at_far": {key: value["tar"] for key, value in e_metrics.to_dict()["tar_at_far"].items()},
    }

    o_scores, o_labels = synthetic_trials(VOX1_O_TRIALS, seed=2)
    o_time, o_metrics = best_time(lambda: full_metrics(o_scores, o_labels), repeats=5)
    o_kaldi_time, o_kaldi = best_time(lambda: full_metrics(o_scores, o_labels, "kaldi"), repeats=5)
    o_sb_conv_time, o_sb_conv = best_time(lambda: full_metrics(o_scores, o_labels, "speechbrain"), repeats=5)
    sklearn_o_time, sklearn_o_eer = best_time(lambda: sklearn_roc_eer(o_scores, o_labels), repeats=5)
    positive = torch.tensor(o_scores[o_labels == 1])
    negative = torch.tensor(o_scores[o_labels == 0])
    sb_eer_time, (sb_eer, sb_eer_threshold) = best_time(lambda: EER(positive, negative), repeats=1)

    n_distinct = np.unique(o_scores).size
    mindcf_bytes = speechbrain_mindcf_bytes(positive.numel(), negative.numel(), n_distinct)
    if mindcf_bytes <= SPEECHBRAIN_MINDCF_LIMIT_BYTES:
        sb_dcf_time, (sb_dcf, _) = best_time(lambda: minDCF(positive, negative, p_target=0.01), repeats=1)
        speechbrain_mindcf = {"s": round(sb_dcf_time, 3), "raw_value": sb_dcf}
    else:
        speechbrain_mindcf = {
            "skipped": f"needs about {mindcf_bytes / 2**30:.1f} GiB (thresholds x trials matrices), "
            f"limit {SPEECHBRAIN_MINDCF_LIMIT_BYTES / 2**30:.0f} GiB",
            "estimated_peak_bytes": mindcf_bytes,
        }
    report["vox1_o_size"] = {
        "n_trials": VOX1_O_TRIALS,
        "n_target": o_metrics.n_target,
        "ours_full_metrics_s": round(o_time, 5),
        "ours_kaldi_convention_s": round(o_kaldi_time, 5),
        "ours_speechbrain_convention_s": round(o_sb_conv_time, 5),
        "speechbrain_eer_s": round(sb_eer_time, 3),
        "speechbrain_eer_subsampled": False,
        "speedup_speechbrain_eer_over_ours_full": round(sb_eer_time / o_time, 1),
        "speedup_target": 100,
        "meets_speedup_target": sb_eer_time / o_time >= 100,
        "speechbrain_mindcf_p0.01": speechbrain_mindcf,
        "sklearn_roc_eer_s": round(sklearn_o_time, 5),
        "eer_percent": {
            "ours_default": 100 * o_metrics.eer,
            "ours_kaldi": 100 * o_kaldi.eer,
            "ours_speechbrain_convention": 100 * o_sb_conv.eer,
            "speechbrain_EER": 100 * sb_eer,
            "sklearn_roc": 100 * sklearn_o_eer,
        },
        "checks": {
            "speechbrain_convention_equals_speechbrain_EER": (o_sb_conv.eer, o_sb_conv.eer_threshold)
            == (sb_eer, sb_eer_threshold),
            "abs_diff_eer_percent_default_vs_kaldi": abs(100 * (o_metrics.eer - o_kaldi.eer)),
            "abs_diff_eer_percent_default_vs_sklearn": abs(100 * (o_metrics.eer - sklearn_o_eer)),
            "abs_diff_eer_percent_default_vs_speechbrain": abs(100 * (o_metrics.eer - sb_eer)),
            "speechbrain_step_percent": 100 / min(positive.numel(), negative.numel()),
            "mindcf_0.01_default": o_metrics.min_dcf_at(0.01).value,
            "mindcf_0.01_kaldi": o_kaldi.min_dcf_at(0.01).value,
            "mindcf_0.01_speechbrain_convention_normalised": o_sb_conv.min_dcf_at(0.01).value / 0.01,
        },
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
