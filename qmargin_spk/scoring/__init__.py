"""Scoring: trial lists, embedding extraction, cosine / AS-norm back-ends, the AS-norm cohort, reports, comparisons."""

from qmargin_spk.data.trials import (
    MissingTrialFilesError,
    TrialList,
    check_trial_files,
    read_trial_list,
    read_trial_lists,
    unique_utterances,
)
from qmargin_spk.scoring.backends import (
    asnorm_scores,
    cohort_statistics,
    cosine_scores,
    l2_normalise,
    pair_scores,
    speaker_means,
)
from qmargin_spk.scoring.compare import CompareError, compare_experiments, load_scored_system
from qmargin_spk.scoring.embeddings import EmbeddingTable, extract_embeddings
from qmargin_spk.scoring.pipeline import BACKENDS, score_trial_lists
from qmargin_spk.scoring.report import read_score_file, results_table, write_results, write_score_file

__all__ = [
    "BACKENDS",
    "CompareError",
    "EmbeddingTable",
    "MissingTrialFilesError",
    "TrialList",
    "asnorm_scores",
    "check_trial_files",
    "cohort_statistics",
    "compare_experiments",
    "cosine_scores",
    "extract_embeddings",
    "l2_normalise",
    "load_scored_system",
    "pair_scores",
    "read_score_file",
    "read_trial_list",
    "read_trial_lists",
    "results_table",
    "score_trial_lists",
    "speaker_means",
    "unique_utterances",
    "write_results",
    "write_score_file",
]
