"""Enrollment maps: which utterances make up each enrollment model (CN-Celeb's ``enroll.map``, Kaldi's ``spk2utt``).

One model per line, ``<model> <utt1> <utt2> ...``; the items are written like trial items
(paths relative to a wav root for audio trees, utterance ids for Kaldi dirs and manifests).
A trial whose enrolment side names a model is scored against the average of its utterances'
normalised embeddings (:mod:`qmargin_spk.scoring.enrollment`).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

from qmargin_spk.data.trials import read_utf8_text


@dataclass(frozen=True)
class EnrollmentMap:
    """Model id -> its utterances (in file order), and the 1-based line of each model in ``path``."""

    path: Path
    models: dict[str, tuple[str, ...]]
    line_numbers: dict[str, int]

    def utterances(self) -> list[str]:
        """Every utterance named by some model, sorted, each once."""
        return sorted({utt for utts in self.models.values() for utt in utts})


def read_enroll_map(path: str | os.PathLike) -> EnrollmentMap:
    """Parse a map file; ValueError at ``file:line`` for a model without utterances, a model given twice
    or an utterance listed twice for one model (it would weigh double in the average)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: enrollment map not found")
    models: dict[str, tuple[str, ...]] = {}
    line_numbers: dict[str, int] = {}
    for number, line in enumerate(io.StringIO(read_utf8_text(path), newline=None), start=1):
        fields = line.split()
        if not fields:
            continue
        model, utterances = fields[0], fields[1:]
        if not utterances:
            raise ValueError(f"{path}:{number}: model {model!r} has no utterances (expected '<model> <utt1> ...')")
        if model in models:
            raise ValueError(f"{path}:{number}: model {model!r} is also on line {line_numbers[model]}")
        repeated = sorted({utt for utt in utterances if utterances.count(utt) > 1})
        if repeated:
            raise ValueError(f"{path}:{number}: model {model!r} lists {repeated[0]!r} more than once")
        models[model] = tuple(utterances)
        line_numbers[model] = number
    if not models:
        raise ValueError(f"{path}: no enrollment models")
    return EnrollmentMap(path, models, line_numbers)
