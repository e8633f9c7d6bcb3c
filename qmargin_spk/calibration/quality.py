"""Quality measures for calibration (WeSpeaker's quality-measure functions, QMF).

Two measures per utterance, each used for both sides of a trial: the log of its
duration in seconds (short recordings give less reliable scores) and its imposter
mean, the mean cosine score against its ``top_n`` closest cohort embeddings
(an utterance near many other speakers scores high against everyone). The trial
inputs are named :data:`QUALITY_INPUTS`.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from numpy.typing import ArrayLike

from qmargin_spk.scoring.backends import cohort_statistics, l2_normalise

QUALITY_INPUTS = ("log_duration_enrol", "log_duration_test", "imposter_mean_enrol", "imposter_mean_test")
DEFAULT_TOP_N = 300


def imposter_means(embeddings: ArrayLike, cohort: ArrayLike, top_n: int = DEFAULT_TOP_N) -> np.ndarray:
    """Mean of each embedding's ``top_n`` highest cosine scores against ``cohort`` [M, D] (all of it if smaller)."""
    vectors = l2_normalise(torch.as_tensor(np.asarray(embeddings)))
    cohort_vectors = l2_normalise(torch.as_tensor(np.asarray(cohort)))
    if vectors.shape[1] != cohort_vectors.shape[1]:
        raise ValueError(f"embeddings have {vectors.shape[1]} dimensions but the cohort {cohort_vectors.shape[1]}")
    means, _ = cohort_statistics(vectors, cohort_vectors, top_n)
    return means.numpy()


def utterance_quality(
    durations: ArrayLike, embeddings: ArrayLike, cohort: ArrayLike, top_n: int = DEFAULT_TOP_N
) -> dict[str, np.ndarray]:
    """``{"log_duration", "imposter_mean"}`` of each utterance (durations in seconds)."""
    durations = np.asarray(durations, dtype=np.float64)
    if durations.ndim != 1 or not np.all(durations > 0):
        raise ValueError("durations must be a 1-D array of positive seconds")
    return {"log_duration": np.log(durations), "imposter_mean": imposter_means(embeddings, cohort, top_n)}


def trial_quality(
    per_utterance: Mapping[str, np.ndarray], enrol_index: ArrayLike, test_index: ArrayLike
) -> dict[str, np.ndarray]:
    """The :data:`QUALITY_INPUTS` of each trial from per-utterance measures and the rows of its two sides."""
    enrol_index = np.asarray(enrol_index, dtype=np.int64)
    test_index = np.asarray(test_index, dtype=np.int64)
    return {
        "log_duration_enrol": per_utterance["log_duration"][enrol_index],
        "log_duration_test": per_utterance["log_duration"][test_index],
        "imposter_mean_enrol": per_utterance["imposter_mean"][enrol_index],
        "imposter_mean_test": per_utterance["imposter_mean"][test_index],
    }
