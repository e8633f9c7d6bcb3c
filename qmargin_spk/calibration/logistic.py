"""Logistic-regression calibration of verification scores into log-likelihood ratios.

The linear fusion of BOSARIS (``train_llr_fusion``) and WeSpeaker's score calibration:
``llr = w . x + b`` where ``x`` is the raw score, optionally followed by quality measures
(:mod:`qmargin_spk.calibration.quality`). The weights minimise the prior-weighted
cross-entropy: target trials carry total weight ``prior`` and non-target trials
``1 - prior`` whatever their counts, so the fitted log-odds are posterior log-odds at
that prior and ``llr = log-odds - logit(prior)``. The result does not depend on the
class proportions of the training list; ``prior`` picks the operating region the fit
favours (0.5 by default, like ``Cllr``, which it then minimises).

Saved as JSON (``calibration.json``): the input names in order, the weights, the offset,
the prior and, for quality inputs that need a cohort, where its embeddings are.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

import numpy as np
from numpy.typing import ArrayLike
from sklearn.linear_model import LogisticRegression

from qmargin_spk.metrics.verification import validate_trials
from qmargin_spk.utils.atomic import atomic_write_text

CALIBRATION_FORMAT = 1
SCORE_INPUT = "score"


@dataclass(frozen=True)
class Calibration:
    """An affine map of ``inputs`` (``"score"`` first) to natural-log LLRs.

    ``cohort`` describes the cohort the imposter-mean inputs were computed against
    (``{"file": ..., "top_n": ...}``, the file relative to the calibration file) or is
    None when no input needs one; ``fit`` holds what the fit reported (trial counts,
    Cllr before and after) for the record.
    """

    inputs: tuple[str, ...]
    weights: tuple[float, ...]
    offset: float
    prior: float
    cohort: dict | None = None
    fit: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.inputs or self.inputs[0] != SCORE_INPUT:
            raise ValueError(f"the first calibration input must be {SCORE_INPUT!r}, got {list(self.inputs)}")
        if len(self.weights) != len(self.inputs):
            raise ValueError(f"{len(self.inputs)} inputs but {len(self.weights)} weights")
        if not all(math.isfinite(v) for v in (*self.weights, self.offset)):
            raise ValueError("calibration weights and offset must be finite")
        if not 0 < self.prior < 1:
            raise ValueError(f"prior must be in (0, 1), got {self.prior}")

    @property
    def uses_quality(self) -> bool:
        """Whether inputs other than the score are needed."""
        return len(self.inputs) > 1

    def llrs(self, values: Mapping[str, ArrayLike]) -> np.ndarray:
        """LLRs (float64) of trials whose inputs are given by name (``values["score"]``, ...)."""
        return _design_matrix(values, self.inputs) @ np.asarray(self.weights) + self.offset

    def to_dict(self) -> dict:
        return {"format": CALIBRATION_FORMAT, "kind": "logistic_regression", **asdict(self)}

    def save(self, path: str | os.PathLike) -> None:
        """Write ``path`` (JSON) atomically."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Calibration":
        """Read a file written by :meth:`save`; ValueError naming the file when it is not one."""
        try:
            data = json.loads(open(path, encoding="utf-8").read())
            if data.get("format") != CALIBRATION_FORMAT or data.get("kind") != "logistic_regression":
                raise ValueError(f"format {data.get('format')!r} / kind {data.get('kind')!r} not supported")
            return cls(
                inputs=tuple(data["inputs"]),
                weights=tuple(float(w) for w in data["weights"]),
                offset=float(data["offset"]),
                prior=float(data["prior"]),
                cohort=data.get("cohort"),
                fit=data.get("fit", {}),
            )
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: not a calibration file ({err})") from err


def fit_calibration(
    scores: ArrayLike,
    labels: ArrayLike,
    quality: Mapping[str, ArrayLike] | None = None,
    prior: float = 0.5,
    cohort: dict | None = None,
) -> Calibration:
    """Fit ``llr = w . [score, quality...] + b`` by prior-weighted logistic regression.

    ``quality`` maps extra input names to per-trial arrays (aligned with ``scores``).
    Inputs are standardised for the solver and the weights mapped back, so the
    stored map applies to raw inputs. No regularisation (``C = inf``).
    """
    scores, labels = validate_trials(scores, labels)
    inputs = (SCORE_INPUT, *(quality or {}))
    x = _design_matrix({SCORE_INPUT: scores, **(quality or {})}, inputs)
    centre, scale = x.mean(axis=0), x.std(axis=0)
    constant = np.flatnonzero(scale == 0)
    if constant.size:
        raise ValueError(f"calibration input {inputs[constant[0]]!r} is constant over the trials: nothing to fit")
    n_target = int(labels.sum())
    n_nontarget = labels.size - n_target
    weight = np.where(labels, prior * labels.size / n_target, (1 - prior) * labels.size / n_nontarget)
    model = LogisticRegression(C=np.inf, tol=1e-10, max_iter=1000)
    model.fit((x - centre) / scale, labels, sample_weight=weight)
    weights = model.coef_[0] / scale
    log_odds_offset = float(model.intercept_[0] - weights @ centre)
    return Calibration(
        inputs=inputs,
        weights=tuple(float(w) for w in weights),
        offset=log_odds_offset - math.log(prior / (1 - prior)),
        prior=prior,
        cohort=cohort,
        fit={"n_target": n_target, "n_nontarget": n_nontarget},
    )


def _design_matrix(values: Mapping[str, ArrayLike], inputs: Sequence[str]) -> np.ndarray:
    """Columns ``inputs`` of ``values`` as a float64 ``[N, K]`` matrix; errors name the offending input."""
    missing = [name for name in inputs if name not in values]
    if missing:
        raise ValueError(f"calibration inputs missing: {missing} (needs {list(inputs)})")
    columns = [np.asarray(values[name], dtype=np.float64) for name in inputs]
    for name, column in zip(inputs, columns):
        if column.ndim != 1 or column.shape != columns[0].shape:
            raise ValueError(f"calibration input {name!r} has shape {column.shape}, expected {columns[0].shape}")
        if not np.all(np.isfinite(column)):
            raise ValueError(f"calibration input {name!r} has NaN or inf values")
    return np.stack(columns, axis=1)
