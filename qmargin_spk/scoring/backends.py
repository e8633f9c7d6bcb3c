"""Scoring back-ends over unique-utterance embeddings: cosine and AS-norm.

Embeddings are normalised once per unique utterance; trials only carry row indices,
and a trial's score is the dot product of its two rows, computed for a block of
trials at a time (a dense utterance x utterance product would need 84 GB on Vox1-E).
AS-norm (adaptive symmetric score normalisation, Matejka et al., Interspeech 2017,
as in WeSpeaker): each utterance's top-N cohort scores are summarised once, by one
matrix product against the cohort and a top-k, then

    s_norm = 0.5 * ((s - mean_e) / std_e + (s - mean_t) / std_t)

with the population standard deviation of the top-N cohort scores.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from numpy.typing import ArrayLike

TRIAL_BLOCK = 8192
UTTERANCE_BLOCK = 4096


def l2_normalise(embeddings: torch.Tensor, mean: torch.Tensor | None = None) -> torch.Tensor:
    """Float64 copy of ``embeddings`` [N, D], minus ``mean`` [D] if given, scaled to unit length."""
    vectors = embeddings.to(torch.float64)
    if mean is not None:
        vectors = vectors - mean.to(vectors)
    norms = vectors.norm(dim=1, keepdim=True)
    if bool((norms == 0).any()):
        raise ValueError("cannot normalise an all-zero embedding (after mean subtraction)")
    return vectors / norms


def speaker_means(embeddings: torch.Tensor, speakers: Sequence[str]) -> tuple[torch.Tensor, list[str]]:
    """Mean embedding per speaker: ``([S, D] tensor, sorted speaker names)``."""
    if len(speakers) != embeddings.shape[0]:
        raise ValueError(f"{embeddings.shape[0]} embeddings but {len(speakers)} speaker labels")
    names, owner = np.unique(np.asarray(speakers, dtype=str), return_inverse=True)
    owner = torch.from_numpy(owner.reshape(-1))
    sums = torch.zeros(len(names), embeddings.shape[1], dtype=torch.float64)
    sums.index_add_(0, owner, embeddings.to(torch.float64))
    counts = torch.bincount(owner, minlength=len(names)).to(torch.float64)
    return (sums / counts[:, None]).to(embeddings.dtype), names.tolist()


def pair_scores(normalised: torch.Tensor, enrol_index: ArrayLike, test_index: ArrayLike) -> np.ndarray:
    """Dot products of row pairs ``(enrol_index[i], test_index[i])`` as float64, block by block."""
    vectors = normalised.detach().to(device="cpu", dtype=torch.float64).numpy()
    enrol_index = np.asarray(enrol_index, dtype=np.int64)
    test_index = np.asarray(test_index, dtype=np.int64)
    if enrol_index.shape != test_index.shape or enrol_index.ndim != 1:
        raise ValueError("enrol_index and test_index must be 1-D and of equal length")
    scores = np.empty(enrol_index.size, dtype=np.float64)
    for start in range(0, enrol_index.size, TRIAL_BLOCK):
        block = slice(start, start + TRIAL_BLOCK)
        scores[block] = np.einsum("nd,nd->n", vectors[enrol_index[block]], vectors[test_index[block]])
    return scores


def cosine_scores(
    embeddings: torch.Tensor,
    enrol_index: ArrayLike,
    test_index: ArrayLike,
    mean: torch.Tensor | None = None,
) -> np.ndarray:
    """Cosine similarity of each trial (rows of ``embeddings``), after subtracting ``mean`` if given."""
    return pair_scores(l2_normalise(embeddings, mean), enrol_index, test_index)


def cohort_statistics(
    normalised: torch.Tensor, normalised_cohort: torch.Tensor, top_n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and population std of each utterance's ``top_n`` highest cohort scores."""
    if top_n < 2:
        raise ValueError(f"top_n must be at least 2, got {top_n}")
    count = min(top_n, normalised_cohort.shape[0])
    means, stds = [], []
    for start in range(0, normalised.shape[0], UTTERANCE_BLOCK):
        scores = normalised[start : start + UTTERANCE_BLOCK] @ normalised_cohort.T
        top = scores.topk(count, dim=1).values
        means.append(top.mean(dim=1))
        stds.append(top.std(dim=1, correction=0))
    return torch.cat(means), torch.cat(stds)


def asnorm_scores(
    embeddings: torch.Tensor,
    enrol_index: ArrayLike,
    test_index: ArrayLike,
    cohort: torch.Tensor,
    top_n: int = 300,
    mean: torch.Tensor | None = None,
) -> np.ndarray:
    """AS-norm of the cosine score of each trial against ``cohort`` [S, D] (e.g. speaker means).

    ``top_n`` larger than the cohort uses the whole cohort (plain symmetric s-norm).
    """
    if cohort.shape[0] < 2:
        raise ValueError(f"AS-norm needs a cohort of at least 2 vectors, got {cohort.shape[0]}")
    normalised = l2_normalise(embeddings, mean)
    cohort_mean, cohort_std = cohort_statistics(normalised, l2_normalise(cohort, mean), top_n)
    cohort_mean, cohort_std = cohort_mean.cpu().numpy(), cohort_std.cpu().numpy()
    if not np.all(cohort_std > 0):
        raise ValueError("some utterances have identical top-N cohort scores (std 0): cohort too small or degenerate")
    raw = pair_scores(normalised, enrol_index, test_index)
    enrol_index = np.asarray(enrol_index, dtype=np.int64)
    test_index = np.asarray(test_index, dtype=np.int64)
    enrol_z = (raw - cohort_mean[enrol_index]) / cohort_std[enrol_index]
    test_z = (raw - cohort_mean[test_index]) / cohort_std[test_index]
    return 0.5 * (enrol_z + test_z)
