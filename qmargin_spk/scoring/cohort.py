"""The AS-norm / mean-subtraction cohort: training utterances chosen alike by stage 3 and ``qmargin-spk score``.

The cohort's speakers are the training manifest's ``spk_id`` (:func:`cohort_utterances`), never
guessed from utterance ids, which in Kaldi dirs and manifests need not start with the speaker.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Mapping

import torch

from qmargin_spk.data.manifest import ManifestError, read_manifest
from qmargin_spk.metrics.bootstrap import utterance_speakers
from qmargin_spk.scoring.backends import speaker_means
from qmargin_spk.scoring.embeddings import EmbeddingTable


def cohort_utterances(manifest: str | os.PathLike, per_speaker: int) -> tuple[dict[str, str], dict[str, str]]:
    """The first ``per_speaker`` utterances (by id) of every speaker of a training manifest: paths and speakers.

    Returns ``(utt id -> wav path, utt id -> speaker)``, the ``cohort_paths`` and
    ``cohort_speakers`` of :func:`qmargin_spk.scoring.pipeline.score_trial_lists`; the
    speaker is the manifest's ``spk_id``. ManifestError naming the file when it has no rows.
    """
    if per_speaker < 1:
        raise ValueError(f"per_speaker must be positive, got {per_speaker}")
    by_speaker: dict[str, list] = defaultdict(list)
    for row in sorted(read_manifest(manifest), key=lambda r: r.id):
        if len(by_speaker[row.spk_id]) < per_speaker:
            by_speaker[row.spk_id].append(row)
    rows = [row for group in by_speaker.values() for row in group]
    if not rows:
        raise ManifestError(f"{manifest}: no utterances for a cohort")
    return {row.id: row.wav for row in rows}, {row.id: row.spk_id for row in rows}


def cohort_means(
    table: EmbeddingTable, speakers: Mapping[str, str] | None, subtract_mean: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-speaker mean embeddings of the cohort and, if asked, the mean cohort embedding.

    ``speakers`` maps every cohort utterance to its speaker (:func:`cohort_utterances` gives the
    manifest's); without it the ids must be tree paths that start with the speaker.
    """
    labels = utterance_speakers(table.utt_ids, speakers)
    means, _ = speaker_means(table.vectors, labels.tolist())
    return means, table.vectors.mean(dim=0) if subtract_mean else None
