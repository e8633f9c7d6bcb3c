"""Enrollment models: one vector per model from several utterances, and the model's speaker.

A model's vector is the average of its utterances' embeddings, each first mean-subtracted
(when the back-end subtracts a cohort mean) and scaled to unit length, so every utterance
weighs the same whatever its norm; the back-ends then normalise the average like any
other row. This is the "average" CN-Celeb protocol (``enroll.map``); a model is one
speaker, so the speaker bootstrap resamples the speaker, not the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from qmargin_spk.data.enrollment import EnrollmentMap
from qmargin_spk.scoring.backends import l2_normalise


def model_vectors(
    vectors: torch.Tensor, rows: Sequence[Sequence[int]], mean: torch.Tensor | None = None
) -> torch.Tensor:
    """``[M, D]`` float64: for each model (its utterances' ``rows`` of ``vectors``) the average normalised vector.

    With ``mean`` the result is ``mean + average(normalise(v - mean))``: the back-ends subtract
    ``mean`` again before normalising, which leaves the average of the normalised vectors.
    """
    normalised = l2_normalise(vectors, mean)
    averages = torch.stack([normalised[list(model_rows)].mean(dim=0) for model_rows in rows])
    return averages if mean is None else averages + mean.to(averages)


def model_speakers(
    enrollment: EnrollmentMap, models: Sequence[str], speaker_of: Callable[[str], str]
) -> dict[str, str]:
    """The one speaker of each model's utterances; ValueError at ``map:line`` for a model of several speakers."""
    speakers = {}
    for model in models:
        found = sorted({speaker_of(utt) for utt in enrollment.models[model]})
        if len(found) != 1:
            raise ValueError(
                f"{enrollment.path}:{enrollment.line_numbers[model]}: model {model!r} has utterances of "
                f"{len(found)} speakers ({', '.join(found[:5])}); a model is one speaker"
            )
        speakers[model] = found[0]
    return speakers
