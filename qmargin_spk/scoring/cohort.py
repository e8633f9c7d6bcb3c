"""The AS-norm / mean-subtraction cohort: training utterances chosen alike by stage 3 and ``qmargin-spk score``."""

from __future__ import annotations

import os
from collections import defaultdict

from qmargin_spk.data.manifest import ManifestError, read_manifest


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
