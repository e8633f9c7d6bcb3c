"""Score calibration, in one place: fit scores into log-likelihood ratios, apply the map, measure LLRs.

Fit. The linear fusion of BOSARIS (``train_llr_fusion``) and WeSpeaker's score calibration:
``llr = w . x + b`` where ``x`` is the raw score, optionally followed by quality measures
(:mod:`qmargin_spk.calibration.quality`). The weights minimise the prior-weighted
cross-entropy: target trials carry total weight ``prior`` and non-target trials
``1 - prior`` whatever their counts, so the fitted log-odds are posterior log-odds at
that prior and ``llr = log-odds - logit(prior)``. The result does not depend on the
class proportions of the training list; ``prior`` picks the operating region the fit
favours (0.5 by default, like ``Cllr``, which it then minimises). Saved as JSON
(``calibration.json``): the input names in order, the weights, the offset, the prior and,
for quality inputs that need a cohort, where its embeddings are.

Apply. :func:`calibrate_score_file` / :func:`calibrate_run` turn score files into LLR score
files (same layout) and report EER, minDCF, Cllr, min Cllr and actual DCF.

Measure (natural-log LLRs, ``c_miss = c_fa = 1``). ``Cllr`` (Brümmer and du Preez, 2006), in bits::

    Cllr = 1 / (2 log 2) * ( mean_targets log(1 + e^-llr) + mean_nontargets log(1 + e^llr) )

It is 1 for a system that always says LLR = 0, and 0 only for perfect, infinitely
confident LLRs. ``min Cllr``: the Cllr of the best monotonic (non-decreasing) map of the
scores to LLRs, found by the pool-adjacent-violators algorithm (scikit-learn's
``IsotonicRegression``) fitted to the 0/1 labels; the resulting posteriors ``p`` become
LLRs ``logit(p) - log(N_target / N_nontarget)`` (the empirical prior removed). Tied scores
are pooled into one block and so share one LLR: a function of the scores cannot
separate them (the "secondary" tie convention, neither optimistic nor pessimistic).
``Cllr - min Cllr`` is the calibration loss; min Cllr is unchanged by any increasing map
of the scores, so it is defined for raw scores too. ``actual DCF`` at a target prior ``P``:
trials are accepted when ``llr >= log((1 - P) / P)`` (the Bayes threshold ``-logit(P)``),
and the cost ``P * P_miss + (1 - P) * P_fa`` is normalised by ``min(P, 1 - P)`` like the
default minDCF, so ``actual DCF >= minDCF`` always and equality means perfect calibration at P.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression

from qmargin_spk.metrics import DEFAULT_FARS, DEFAULT_P_TARGETS, compute_metrics, validate_trials
from qmargin_spk.scoring.report import read_score_file, write_score_file
from qmargin_spk.utils.atomic import atomic_write_text
from qmargin_spk.utils.markdown import markdown_table

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

    def fitted_for(self, identity: str, checkpoint_sha256: str | None = None) -> bool:
        """Whether the fit was made with the model of ``identity`` (``fit["model_identity"]``).

        A calibration that names no identity (written before calibrations recorded one) counts only when its
        ``fit["model_sha256"]`` is ``checkpoint_sha256``, the verified hash of the weights file it ships with.
        """
        if "model_identity" in self.fit:
            return self.fit["model_identity"] == identity
        return checkpoint_sha256 is not None and self.fit.get("model_sha256") == checkpoint_sha256

    def llrs(self, values: Mapping[str, ArrayLike]) -> np.ndarray:
        """LLRs (float64) of trials whose inputs are given by name (``values["score"]``, ...)."""
        return _design_matrix(values, self.inputs) @ np.asarray(self.weights) + self.offset

    def to_dict(self) -> dict:
        return {"format": CALIBRATION_FORMAT, "kind": "logistic_regression", **asdict(self)}

    def save(self, path: str | os.PathLike) -> None:
        """Write ``path`` (JSON) atomically."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Calibration:
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


# ---------------------------------------------------------------- measuring LLRs


@dataclass(frozen=True)
class ActDcf:
    """Normalised detection cost at ``p_target`` when deciding at the Bayes threshold of the LLRs."""

    p_target: float
    value: float
    threshold: float


@dataclass(frozen=True)
class CalibrationMetrics:
    """Cllr, min Cllr (bits) and the actual DCF at each target prior of one list of LLR scores."""

    cllr: float
    min_cllr: float
    act_dcf: tuple[ActDcf, ...]

    def act_dcf_at(self, p_target: float) -> ActDcf:
        """The actual-DCF entry computed for ``p_target``."""
        return next(entry for entry in self.act_dcf if entry.p_target == p_target)

    def to_dict(self) -> dict:
        """JSON-ready dict; priors become keys formatted with ``%g``."""
        return {
            "cllr": self.cllr,
            "min_cllr": self.min_cllr,
            "act_dcf": {f"{e.p_target:g}": {"value": e.value, "threshold": e.threshold} for e in self.act_dcf},
        }


def bayes_threshold(p_target: float) -> float:
    """LLR above which accepting costs less than rejecting at prior ``p_target``: ``log((1 - P) / P)``."""
    if not 0 < p_target < 1:
        raise ValueError(f"p_target must be in (0, 1), got {p_target}")
    return math.log((1 - p_target) / p_target)


def cllr(llrs: ArrayLike, labels: ArrayLike) -> float:
    """Log-likelihood-ratio cost in bits (module docstring); ``llrs`` may hold +-inf."""
    llrs, labels = _validate_llrs(llrs, labels)
    return _cllr(llrs, labels)


def min_cllr(scores: ArrayLike, labels: ArrayLike) -> float:
    """Cllr after the optimal monotonic score-to-LLR map (PAV, ties pooled)."""
    scores, labels = validate_trials(scores, labels)
    return _cllr(pav_llrs(scores, labels), labels)


def pav_llrs(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """LLRs of the PAV (isotonic) fit of the labels on the scores; +-inf where a block is pure."""
    posteriors = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True).fit_transform(
        scores, labels.astype(np.float64)
    )
    n_target = int(labels.sum())
    prior_log_odds = math.log(n_target / (labels.size - n_target))
    with np.errstate(divide="ignore"):
        return np.log(posteriors) - np.log1p(-posteriors) - prior_log_odds


def actual_dcf(llrs: ArrayLike, labels: ArrayLike, p_target: float) -> ActDcf:
    """Normalised cost of the Bayes decisions ``llr >= log((1 - P) / P)`` at ``p_target``."""
    llrs, labels = _validate_llrs(llrs, labels)
    return _actual_dcf(llrs, labels, p_target)


def calibration_metrics(
    llrs: ArrayLike, labels: ArrayLike, p_targets: Sequence[float] = DEFAULT_P_TARGETS
) -> CalibrationMetrics:
    """Cllr, min Cllr and actual DCF at each of ``p_targets`` of LLR scores."""
    llrs, labels = _validate_llrs(llrs, labels)
    finite_scores = np.clip(llrs, -np.finfo(np.float64).max, np.finfo(np.float64).max)
    return CalibrationMetrics(
        cllr=_cllr(llrs, labels),
        min_cllr=_cllr(pav_llrs(finite_scores, labels), labels),
        act_dcf=tuple(_actual_dcf(llrs, labels, p) for p in p_targets),
    )


def llr_metrics(
    llrs: ArrayLike,
    labels: ArrayLike,
    p_targets: Sequence[float] = DEFAULT_P_TARGETS,
    fars: Sequence[float] = DEFAULT_FARS,
) -> dict:
    """Everything measured on LLR scores, JSON-ready: ``compute_metrics(...).to_dict()`` (EER, minDCF,
    TAR) plus :meth:`CalibrationMetrics.to_dict` (``cllr``, ``min_cllr``, ``act_dcf`` keyed like ``min_dcf``)."""
    verification = compute_metrics(llrs, labels, p_targets=p_targets, fars=fars).to_dict()
    return {**verification, **calibration_metrics(llrs, labels, p_targets).to_dict()}


def _validate_llrs(llrs: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Like :func:`validate_trials`, except that infinite LLRs (certainty) are allowed; NaN is not."""
    llrs = np.asarray(llrs, dtype=np.float64)
    nan = np.flatnonzero(np.isnan(llrs).reshape(-1))
    if nan.size:
        raise ValueError(f"{nan.size} LLRs are NaN (first at index {nan[0]})")
    _, labels = validate_trials(np.where(np.isinf(llrs), 0.0, llrs), labels)
    return llrs, labels


def _cllr(llrs: np.ndarray, labels: np.ndarray) -> float:
    """Cllr of validated arrays; ``logaddexp`` keeps it exact for large and infinite LLRs."""
    target_cost = np.logaddexp(0.0, -llrs[labels]).mean()
    nontarget_cost = np.logaddexp(0.0, llrs[~labels]).mean()
    return float((target_cost + nontarget_cost) / (2 * math.log(2)))


def _actual_dcf(llrs: np.ndarray, labels: np.ndarray, p_target: float) -> ActDcf:
    threshold = bayes_threshold(p_target)
    accepted = llrs >= threshold
    miss = float(np.mean(~accepted[labels]))
    false_alarm = float(np.mean(accepted[~labels]))
    cost = p_target * miss + (1 - p_target) * false_alarm
    return ActDcf(p_target, cost / min(p_target, 1 - p_target), threshold)


# ---------------------------------------------------------------- applying to score files


def calibrate_score_file(
    calibration: Calibration,
    score_file: str | os.PathLike,
    llr_file: str | os.PathLike,
    quality: Mapping[str, np.ndarray] | None = None,
    p_targets: Sequence[float] = DEFAULT_P_TARGETS,
    fars: Sequence[float] = DEFAULT_FARS,
) -> dict:
    """Turn a score file into an LLR score file (same layout) and measure the LLRs.

    ``quality`` holds the calibration's extra inputs per trial (aligned with the file)
    when it uses any. Returns a result entry: ``score_file``, ``llr_file``, ``n_trials``
    and ``metrics`` (:func:`llr_metrics`).
    """
    enrol, test, scores, labels = read_score_file(score_file)
    llrs = calibration.llrs({SCORE_INPUT: scores, **(quality or {})})
    write_score_file(llr_file, enrol, test, llrs, labels)
    metrics = llr_metrics(llrs, labels, p_targets=p_targets, fars=fars)
    return {"score_file": str(score_file), "llr_file": str(llr_file), "n_trials": int(labels.size), "metrics": metrics}


def calibration_table(entries: Sequence[dict]) -> str:
    """Markdown table of calibrated entries (with ``list``): EER, Cllr, min Cllr, minDCF and actual DCF per prior."""
    if not entries:
        raise ValueError("no calibrated results to tabulate")
    priors = list(entries[0]["metrics"]["act_dcf"])
    header = ["list", "trials", "EER %", "Cllr", "min Cllr"]
    header += [f"{kind}@{p}" for p in priors for kind in ("minDCF", "actDCF")]
    rows = []
    for entry in entries:
        metrics = entry["metrics"]
        cells = [
            entry["list"],
            str(entry["n_trials"]),
            f"{100 * metrics['eer']:.3f}",
            f"{metrics['cllr']:.4f}",
            f"{metrics['min_cllr']:.4f}",
        ]
        for p in priors:
            cells += [f"{metrics['min_dcf'][p]['value']:.4f}", f"{metrics['act_dcf'][p]['value']:.4f}"]
        rows.append(cells)
    return markdown_table(header, rows) + "\n"


def write_calibrated_results(run: dict, json_path: str | os.PathLike, markdown_path: str | os.PathLike) -> str:
    """Write ``run`` (with calibrated ``results`` entries) as JSON and its table as Markdown; return the table."""
    table = calibration_table(run["results"])
    atomic_write_text(Path(json_path), json.dumps(run, indent=2, allow_nan=False) + "\n")
    atomic_write_text(Path(markdown_path), table)
    return table


def calibrate_run(
    calibration: Calibration,
    run: dict,
    out_dir: str | os.PathLike,
    quality_of: Callable[[dict], Mapping[str, np.ndarray]] | None = None,
) -> str:
    """Calibrate every score file of a scoring run (``score_trial_lists``' return) and write the results.

    Writes ``<list>.<backend>.llr.scores`` per list and ``results.<backend>.calibrated.json`` / ``.md``
    into ``out_dir``; ``quality_of(result)`` gives the quality inputs of a result's trials when the
    calibration uses any. Returns the Markdown table.
    """
    out_dir = Path(out_dir)
    backend = run["backend"]
    entries = []
    for result in run["results"]:
        quality = quality_of(result) if quality_of is not None else None
        llr_file = out_dir / f"{result['list']}.{backend}.llr.scores"
        entry = calibrate_score_file(calibration, result["score_file"], llr_file, quality)
        entries.append({"list": result["list"], **entry})
    calibrated = {"model_id": run["model_id"], "calibration": calibration.to_dict(), "results": entries}
    return write_calibrated_results(
        calibrated, out_dir / f"results.{backend}.calibrated.json", out_dir / f"results.{backend}.calibrated.md"
    )
