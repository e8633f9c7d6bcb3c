"""Result files of a scoring run: score files, JSON and a Markdown table, all written atomically.

A result entry (one per trial list) is a dict with at least ``list``, ``backend``,
``n_trials`` and ``metrics`` (:meth:`VerificationMetrics.to_dict`). The results file
of an experiment gathers the lists of every scoring run with the same model and
settings: each run replaces the entries of the lists it scored and keeps the others,
under a lock, so runs on different lists (one after the other or at the same time)
all end up in it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

from qmargin_spk.utils.atomic import atomic_open, atomic_write_text, exclusive_lock
from qmargin_spk.utils.markdown import markdown_table

logger = logging.getLogger(__name__)


def write_score_file(
    path: str | os.PathLike, enrol: Sequence[str], test: Sequence[str], scores: ArrayLike, labels: ArrayLike
) -> None:
    """One ``enrol test score label`` line per trial; scores as ``repr`` of float64 (round-trips exactly)."""
    scores = np.asarray(scores, dtype=np.float64)
    if not len(enrol) == len(test) == scores.size == len(labels):
        raise ValueError("enrol, test, scores and labels must have the same length")
    rows = zip(np.asarray(enrol).tolist(), np.asarray(test).tolist(), scores.tolist(), np.asarray(labels).tolist())
    with atomic_open(path, "w") as handle:
        handle.writelines(f"{e} {t} {s!r} {int(y)}\n" for e, t, s, y in rows)


def read_score_file(path: str | os.PathLike) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """Inverse of :func:`write_score_file`: ``(enrol, test, float64 scores, int8 labels)``."""
    enrol, test, scores, labels = [], [], [], []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            fields = line.split()
            if len(fields) != 4:
                raise ValueError(f"{path}:{number}: expected 'enrol test score label', got {line.strip()!r}")
            enrol.append(fields[0])
            test.append(fields[1])
            scores.append(float(fields[2]))
            labels.append(int(fields[3]))
    return enrol, test, np.array(scores, dtype=np.float64), np.array(labels, dtype=np.int8)


def results_table(results: Sequence[dict]) -> str:
    """Markdown table: list, back-end, trials, EER %, minDCF per prior, TAR % per FAR.

    Entries with ``intervals`` (speaker-bootstrap, see docs/evidence.md) show each number as
    ``value [low, high]``.
    """
    if not results:
        raise ValueError("no results to tabulate")
    priors = list(results[0]["metrics"]["min_dcf"])
    fars = list(results[0]["metrics"]["tar_at_far"])
    header = ["list", "back-end", "trials", "EER %"]
    header += [f"minDCF@{p}" for p in priors] + [f"TAR@FAR={far} %" for far in fars]
    rows = []
    for result in results:
        metrics, intervals = result["metrics"], result.get("intervals") or {}
        cells = [
            result["list"],
            result["backend"],
            str(result["n_trials"]),
            _with_interval(metrics["eer"], intervals.get("eer"), 100, 3),
        ]
        cells += [
            _with_interval(metrics["min_dcf"][p]["value"], intervals.get("min_dcf", {}).get(p), 1, 4) for p in priors
        ]
        cells += [
            _with_interval(metrics["tar_at_far"][far]["tar"], intervals.get("tar_at_far", {}).get(far), 100, 2)
            for far in fars
        ]
        rows.append(cells)
    return markdown_table(header, rows) + "\n"


def write_results(run: dict, json_path: str | os.PathLike, markdown_path: str | os.PathLike) -> tuple[dict, str]:
    """Merge ``run`` into the JSON results file and rewrite its Markdown table; return both.

    Under an exclusive lock (``<json_path>.lock``) the file is read, the entries of the
    lists in ``run["results"]`` replace those of the same name (in place; new lists are
    appended), and entries of other lists are kept when the file describes the same
    run (every key but ``results``: model, back-end, settings, ...); a file from
    another model or other settings is replaced, with a warning naming its lists.
    """
    with exclusive_lock(f"{json_path}.lock"):
        merged = _merge(_read_results(json_path), run, json_path)
        table = results_table(merged["results"])
        atomic_write_text(json_path, json.dumps(merged, indent=2, allow_nan=False) + "\n")
        atomic_write_text(markdown_path, table)
    return merged, table


def _read_results(json_path: str | os.PathLike) -> dict | None:
    """The results file's content, or None when absent or unreadable (logged)."""
    try:
        with open(json_path, encoding="utf-8") as handle:
            stored = json.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        logger.warning("%s: unreadable results file, replacing it (%s)", json_path, err)
        return None
    return stored if isinstance(stored, dict) and isinstance(stored.get("results"), list) else None


def _merge(stored: dict | None, run: dict, json_path: str | os.PathLike) -> dict:
    """``run`` with the entries of ``stored`` for lists that ``run`` did not score (same run identity only)."""
    if stored is None:
        return run
    identity = json.loads(json.dumps({key: value for key, value in run.items() if key != "results"}))  # as stored
    if {key: value for key, value in stored.items() if key != "results"} != identity:
        dropped = [entry.get("list") for entry in stored["results"]]
        logger.warning(
            "%s: dropping the results of lists %s, scored with another model or other settings", json_path, dropped
        )
        return run
    fresh = {entry["list"]: entry for entry in run["results"]}
    results = [fresh.pop(entry["list"], entry) for entry in stored["results"]]
    return {**run, "results": results + list(fresh.values())}


def format_interval(
    value: float | None, low: float | None, high: float | None, factor: float = 1.0, digits: int = 3
) -> str:
    """``value [low, high]`` (each times ``factor``), ``value`` alone without bounds, ``n/a`` without a value."""
    if value is None:
        return "n/a"
    text = f"{factor * value:.{digits}f}"
    if low is not None:
        text += f" [{factor * low:.{digits}f}, {factor * high:.{digits}f}]"
    return text


def format_difference(
    value: float | None,
    low: float | None,
    high: float | None,
    p_value: float | None,
    factor: float = 1.0,
    digits: int = 3,
) -> str:
    """``-0.45 [-0.80, -0.12] p=0.008`` (signed, each times ``factor``); parts without a value are left out."""
    if value is None:
        return "n/a"
    text = f"{factor * value:+.{digits}f}"
    if low is not None and high is not None:
        text += f" [{factor * low:+.{digits}f}, {factor * high:+.{digits}f}]"
    if p_value is not None:
        text += f" p={p_value:.3f}"
    return text


def _with_interval(value: float | None, interval: dict | None, factor: float, digits: int) -> str:
    """A metric of ``results`` with its interval entry (if any) in the table's format."""
    interval = interval or {}
    return format_interval(value, interval.get("low"), interval.get("high"), factor, digits)
