"""Apply a calibration to score files: LLR score files and calibrated metrics (Cllr, min Cllr, actual DCF)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from qmargin_spk.calibration.logistic import SCORE_INPUT, Calibration
from qmargin_spk.metrics import DEFAULT_FARS, DEFAULT_P_TARGETS, compute_metrics
from qmargin_spk.scoring.report import read_score_file, write_score_file
from qmargin_spk.utils.atomic import atomic_write_text


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
    and ``metrics`` (:meth:`VerificationMetrics.to_dict` with ``cllr``, ``min_cllr``,
    ``act_dcf``).
    """
    enrol, test, scores, labels = read_score_file(score_file)
    llrs = calibration.llrs({SCORE_INPUT: scores, **(quality or {})})
    write_score_file(llr_file, enrol, test, llrs, labels)
    metrics = compute_metrics(llrs, labels, p_targets=p_targets, fars=fars, llr=True)
    return {"score_file": str(score_file), "llr_file": str(llr_file), "n_trials": int(labels.size),
            "metrics": metrics.to_dict()}


def calibration_table(entries: Sequence[dict]) -> str:
    """Markdown table of calibrated entries (with ``list``): EER, Cllr, min Cllr, minDCF and actual DCF per prior."""
    if not entries:
        raise ValueError("no calibrated results to tabulate")
    priors = list(entries[0]["metrics"]["act_dcf"])
    header = ["list", "trials", "EER %", "Cllr", "min Cllr"]
    header += [f"{kind}@{p}" for p in priors for kind in ("minDCF", "actDCF")]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in entries:
        metrics = entry["metrics"]
        cells = [entry["list"], str(entry["n_trials"]), f"{100 * metrics['eer']:.3f}",
                 f"{metrics['cllr']:.4f}", f"{metrics['min_cllr']:.4f}"]
        for p in priors:
            cells += [f"{metrics['min_dcf'][p]['value']:.4f}", f"{metrics['act_dcf'][p]['value']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


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
        entries.append({"list": result["list"], **calibrate_score_file(calibration, result["score_file"], llr_file, quality)})
    calibrated = {"model_id": run["model_id"], "calibration": calibration.to_dict(), "results": entries}
    return write_calibrated_results(calibrated, out_dir / f"results.{backend}.calibrated.json",
                                    out_dir / f"results.{backend}.calibrated.md")
