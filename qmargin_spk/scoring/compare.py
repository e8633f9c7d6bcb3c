"""Compare experiments from their cached stage-3 scores: tables with intervals, paired differences, DET overlays.

Reads ``EXP/scores/results.<backend>.json`` and the score files next to it (no
re-extraction), bootstraps every system on every trial list with the same speaker
resamples (:class:`~qmargin_spk.metrics.SpeakerBootstrap`), and writes to the output
folder: ``<list>.md`` (one table per list, plus the differences to the baseline),
``summary.md`` (the wide table in the layout of published VoxCeleb tables, plus the wide
table of differences), ``comparison.json`` (every number) and ``<list>.det.png`` (all
systems overlaid, when matplotlib is installed). Mistakes in the inputs raise
:class:`CompareError` with a one-line message.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from qmargin_spk.metrics import (
    DEFAULT_FARS,
    DEFAULT_P_TARGETS,
    BootstrapResult,
    ComparisonResult,
    SpeakerBootstrap,
    det_available,
    plot_det_curves,
)
from qmargin_spk.metrics.bootstrap import DEFAULT_RESAMPLES, DESIGN, INTERVAL
from qmargin_spk.scoring.report import format_interval, read_score_file
from qmargin_spk.utils.atomic import atomic_write_text

# Published names of the VoxCeleb1 lists (cleaned "2" versions and originals), in table order.
LIST_LABELS = {
    "veri_test2": "Vox1-O",
    "veri_test": "Vox1-O",
    "list_test_all2": "Vox1-E",
    "list_test_all": "Vox1-E",
    "list_test_hard2": "Vox1-H",
    "list_test_hard": "Vox1-H",
}
_LABEL_ORDER = ("Vox1-O", "Vox1-E", "Vox1-H")
# Columns of the wide table per list, as in published VoxCeleb tables.
WIDE_P_TARGET = 0.01
WIDE_FARS = (1e-3, 1e-4)
EXPERIMENT_FIELDS = ("loss", "alpha", "scale", "margin")


class CompareError(Exception):
    """A user mistake (missing experiment or score file, mismatched trials): the message is one line."""


@dataclass(frozen=True)
class ScoredList:
    """One experiment's scores on one trial list, as read from its score file."""

    name: str
    path: Path
    enrol: list[str]
    test: list[str]
    scores: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class Experiment:
    """An experiment folder's identity (from the results JSON's ``experiment`` entry if any) and its scores."""

    name: str
    path: Path
    loss: str | None
    alpha: float | None
    scale: float | None
    margin: float | None
    model_id: str | None
    lists: dict[str, ScoredList]

    def describe(self) -> dict:
        return {
            "name": self.name,
            "path": str(self.path),
            **{field: getattr(self, field) for field in EXPERIMENT_FIELDS},
            "model_id": self.model_id,
            "lists": list(self.lists),
        }


def list_label(name: str) -> str:
    """The published name of a trial list (``veri_test2`` -> ``Vox1-O``), else the list's own name."""
    return LIST_LABELS.get(name, name)


def load_experiment(path: str | os.PathLike, backend: str = "cosine") -> Experiment:
    """Read an experiment's results JSON and score files; raise :class:`CompareError` on anything missing."""
    path = Path(path)
    if not path.is_dir():
        raise CompareError(f"{path}: no such experiment folder")
    results_file = path / "scores" / f"results.{backend}.json"
    if not results_file.is_file():
        raise CompareError(f"{path}: no {backend} results ({results_file} is missing; run stage 3 first)")
    try:
        run = json.loads(results_file.read_text(encoding="utf-8"))
        entries = run["results"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise CompareError(f"{results_file}: not a stage-3 results file ({error})") from None
    if not entries:
        raise CompareError(f"{results_file}: no trial lists in 'results'")
    info = run.get("experiment") or {}
    lists = {}
    for entry in entries:
        scored = _read_list(path, entry, backend, results_file)
        lists[scored.name] = scored
    return Experiment(
        name=info.get("name") or path.name,
        path=path,
        **{field: info.get(field) for field in EXPERIMENT_FIELDS},
        model_id=run.get("model_id"),
        lists=lists,
    )


def compare_experiments(
    experiment_paths: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    baseline: str | os.PathLike | None = None,
    backend: str = "cosine",
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict:
    """Tables, differences to ``baseline`` and DET overlays for the experiments; returns the JSON content.

    ``baseline`` is one of ``experiment_paths`` or another experiment folder, which is then
    added first. The returned dict also holds the Markdown
    of ``summary.md`` under ``table``.
    """
    if not experiment_paths:
        raise CompareError("no experiments given")
    if n_resamples < 2:
        raise CompareError(f"n_resamples must be at least 2, got {n_resamples}")
    if not 0 < confidence < 1:
        raise CompareError(f"confidence must be between 0 and 1 (e.g. 0.95), got {confidence}")
    paths = [Path(p) for p in experiment_paths]
    base_index = None
    if baseline is not None:
        matches = [i for i, p in enumerate(paths) if p.resolve() == Path(baseline).resolve()]
        if not matches:
            paths.insert(0, Path(baseline))
        base_index = matches[0] if matches else 0
    experiments = _load_all(paths, backend)
    base = None if base_index is None else experiments[base_index]
    out_dir = Path(out_dir)

    list_names = sorted({name for e in experiments for name in e.lists}, key=_list_sort_key)
    lists = [
        _compare_list(name, experiments, base, out_dir, backend, n_resamples, seed, confidence) for name in list_names
    ]
    summary = {
        "backend": backend,
        "baseline": None if base is None else base.name,
        "bootstrap": {
            "design": DESIGN,
            "interval": INTERVAL,
            "n_resamples": n_resamples,
            "seed": seed,
            "confidence": confidence,
        },
        "experiments": [e.describe() for e in experiments],
        "lists": lists,
    }
    for entry in lists:
        atomic_write_text(entry["table"], list_table(summary, entry))
    table = wide_table(summary)
    atomic_write_text(out_dir / "summary.md", table)
    atomic_write_text(out_dir / "comparison.json", json.dumps(summary, indent=2, allow_nan=False) + "\n")
    return {**summary, "table": table}


def list_table(summary: dict, entry: dict) -> str:
    """Markdown for one list: every metric of every system with its interval, then the differences."""
    p_targets, fars = _metric_keys(entry)
    header = ["experiment", *EXPERIMENT_FIELDS, "EER %"]
    header += [f"minDCF@{p}" for p in p_targets] + [f"TAR@FAR={far} %" for far in fars]
    rows = []
    for experiment in _experiments_on(summary, entry):
        result = entry["systems"][experiment["name"]]
        cells = _identity_cells(experiment) + [_interval(result["eer"], percent=True)]
        cells += [_interval(result["min_dcf"][p], percent=False) for p in p_targets]
        cells += [_interval(result["tar_at_far"][far], percent=True) for far in fars]
        rows.append(cells)
    title = f"## {entry['label']} ({entry['list']}: {entry['n_trials']} trials, {entry['n_speakers']} speakers)"
    text = [title, "", _markdown(header, rows), _interval_note(summary)]
    if entry["differences"]:
        header = ["experiment", "ΔEER (points)"]
        header += [f"ΔminDCF@{p}" for p in p_targets] + [f"ΔTAR@FAR={far} (points)" for far in fars]
        rows = []
        for name, difference in entry["differences"].items():
            cells = [_escape(name), _difference(difference["eer"], percent=True)]
            cells += [_difference(difference["min_dcf"][p], percent=False) for p in p_targets]
            cells += [_difference(difference["tar_at_far"][far], percent=True) for far in fars]
            rows.append(cells)
        text += ["", f"Differences to the baseline {summary['baseline']} (experiment - baseline), "
                 "paired over the same resamples:", "", _markdown(header, rows)]
    return "\n".join(text) + "\n"


def wide_table(summary: dict) -> str:
    """The published-table layout: one row per experiment, a column group per list (EER, minDCF, TAR)."""
    groups = summary["lists"]
    metrics = [("EER %", "eer", None)]
    metrics += [(f"minDCF@{WIDE_P_TARGET:g}", "min_dcf", f"{WIDE_P_TARGET:g}")]
    metrics += [(f"TAR@FAR={far:g} %", "tar_at_far", f"{far:g}") for far in WIDE_FARS]
    header = ["experiment", *EXPERIMENT_FIELDS]
    header += [f"{entry['label']} {title}" for entry in groups for title, _, _ in metrics]
    rows = []
    for experiment in summary["experiments"]:
        cells = _identity_cells(experiment)
        for entry in groups:
            result = entry["systems"].get(experiment["name"])
            for _, kind, key in metrics:
                value = None if result is None else _lookup(result, kind, key)
                cells.append("—" if value is None else _interval(value, percent=kind != "min_dcf"))
        rows.append(cells)
    text = ["## Summary", "", _markdown(header, rows), _interval_note(summary)]
    if summary["baseline"] is not None:
        header = ["experiment"] + [f"{entry['label']} Δ{title}" for entry in groups for title, _, _ in metrics]
        rows = []
        for experiment in summary["experiments"]:
            if experiment["name"] == summary["baseline"]:
                continue
            cells = [_escape(experiment["name"])]
            for entry in groups:
                difference = entry["differences"].get(experiment["name"])
                for _, kind, key in metrics:
                    value = None if difference is None else _lookup(difference, kind, key)
                    cells.append("—" if value is None else _difference(value, percent=kind != "min_dcf"))
            rows.append(cells)
        text += ["", f"Differences to the baseline {summary['baseline']} (experiment - baseline; EER and TAR "
                 "in percentage points), with their intervals and paired bootstrap p-values:", "",
                 _markdown(header, rows)]
    return "\n".join(text) + "\n"


def _read_list(path: Path, entry: dict, backend: str, results_file: Path) -> ScoredList:
    """The score file of one results entry: ``EXP/scores/<list>.<backend>.scores``, else the recorded path."""
    try:
        name = entry["list"]
    except (KeyError, TypeError):
        raise CompareError(f"{results_file}: a results entry has no 'list' name") from None
    score_file = path / "scores" / f"{name}.{backend}.scores"
    if not score_file.is_file() and entry.get("score_file") and Path(entry["score_file"]).is_file():
        score_file = Path(entry["score_file"])
    if not score_file.is_file():
        raise CompareError(f"{path}: score file of list {name!r} is missing ({score_file})")
    try:
        enrol, test, scores, labels = read_score_file(score_file)
    except (ValueError, UnicodeDecodeError) as error:
        raise CompareError(str(error).splitlines()[0]) from None
    if not labels.size:
        raise CompareError(f"{score_file}: no trials")
    expected = entry.get("n_trials")
    if expected is not None and expected != labels.size:
        raise CompareError(
            f"{score_file}: {labels.size} trials but {results_file} says {expected}; re-run stage 3"
        )
    return ScoredList(name, score_file, enrol, test, scores, labels)


def _load_all(paths: list[Path], backend: str) -> list[Experiment]:
    """Load every experiment; two with the same name are told apart by the path given on the command line."""
    resolved = [p.resolve() for p in paths]
    if len(set(resolved)) != len(resolved):
        raise CompareError("an experiment folder is given twice")
    experiments = [load_experiment(p, backend) for p in paths]
    names = [e.name for e in experiments]
    return [replace(e, name=str(p)) if names.count(e.name) > 1 else e for p, e in zip(paths, experiments)]


def _compare_list(
    list_name: str,
    experiments: list[Experiment],
    base: Experiment | None,
    out_dir: Path,
    backend: str,
    n_resamples: int,
    seed: int,
    confidence: float,
) -> dict:
    """Bootstrap every system on one list (same resamples), differences to the baseline, table and DET plot."""
    present = [e for e in experiments if list_name in e.lists]
    reference = present[0].lists[list_name]
    for experiment in present[1:]:
        _check_same_trials(reference, present[0].name, experiment.lists[list_name], experiment.name)
    try:
        bootstrap = SpeakerBootstrap(
            reference.labels, reference.enrol, reference.test, n_resamples=n_resamples, seed=seed,
            p_targets=DEFAULT_P_TARGETS, fars=DEFAULT_FARS,
        )
        replicates = {e.name: bootstrap.replicates(e.lists[list_name].scores) for e in present}
    except (ValueError, KeyError) as error:
        raise CompareError(f"{reference.path}: {str(error).splitlines()[0]}") from None
    systems: dict[str, BootstrapResult] = {
        name: bootstrap.intervals(reps, confidence) for name, reps in replicates.items()
    }
    differences: dict[str, ComparisonResult] = {}
    if base is not None and base.name in replicates:
        for name, reps in replicates.items():
            if name != base.name:
                differences[name] = bootstrap.compare(replicates[base.name], reps, confidence)

    det_file = None
    if det_available():
        det_file = out_dir / f"{list_name}.det.png"
        curves = {e.name: (e.lists[list_name].scores, e.lists[list_name].labels) for e in present}
        plot_det_curves(curves, det_file, title=f"{list_label(list_name)} ({backend})")
    entry = {
        "list": list_name,
        "label": list_label(list_name),
        "n_trials": int(reference.labels.size),
        "n_speakers": bootstrap.n_speakers,
        "score_files": {e.name: str(e.lists[list_name].path) for e in present},
        "systems": {name: result.to_dict() for name, result in systems.items()},
        "differences": {name: result.to_dict() for name, result in differences.items()},
        "det_plot": None if det_file is None else str(det_file),
        "table": str(out_dir / f"{list_name}.md"),
    }
    return entry


def _check_same_trials(a: ScoredList, a_name: str, b: ScoredList, b_name: str) -> None:
    """Systems compared on one list must have scored the same trials, in the same order."""
    if a.labels.size != b.labels.size:
        raise CompareError(
            f"list {a.name!r}: {a_name} has {a.labels.size} trials but {b_name} has {b.labels.size}; "
            "compare systems scored on the same trial list"
        )
    same = (np.array(a.enrol) == np.array(b.enrol)) & (np.array(a.test) == np.array(b.test)) & (a.labels == b.labels)
    if not same.all():
        i = int(np.argmin(same))
        raise CompareError(
            f"list {a.name!r}: trial {i + 1} differs ({a_name}: {a.enrol[i]} {a.test[i]} {a.labels[i]}, "
            f"{b_name}: {b.enrol[i]} {b.test[i]} {b.labels[i]}); compare systems scored on the same trial list"
        )


def _list_sort_key(name: str) -> tuple:
    label = list_label(name)
    return (_LABEL_ORDER.index(label) if label in _LABEL_ORDER else len(_LABEL_ORDER), label, name)


def _metric_keys(entry: dict) -> tuple[list[str], list[str]]:
    any_result = next(iter(entry["systems"].values()))
    return list(any_result["min_dcf"]), list(any_result["tar_at_far"])


def _experiments_on(summary: dict, entry: dict) -> list[dict]:
    return [e for e in summary["experiments"] if e["name"] in entry["systems"]]


def _lookup(result: dict, kind: str, key: str | None) -> dict | None:
    return result[kind] if key is None else result[kind].get(key)


def _identity_cells(experiment: dict) -> list[str]:
    cells = [_escape(experiment["name"])]
    for field in EXPERIMENT_FIELDS:
        value = experiment[field]
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        cells.append("" if value is None else _escape(f"{value:g}" if numeric else str(value)))
    return cells


def _interval(entry: dict, percent: bool) -> str:
    """``1.07 [0.95, 1.21]`` (percent) or ``0.123 [0.110, 0.140]``; ``n/a`` when not reported."""
    scale, digits = (100, 2) if percent else (1, 3)
    return format_interval(entry["value"], entry["low"], entry["high"], scale, digits)


def _difference(entry: dict, percent: bool) -> str:
    """``-0.45 [-0.80, -0.12] p=0.008``; ``n/a`` when either system's metric is not reported."""
    if entry["difference"] is None:
        return "n/a"
    scale, digits = (100, 2) if percent else (1, 3)
    value, low, high = (scale * entry[key] for key in ("difference", "low", "high"))
    return f"{value:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}] p={entry['p_value']:.3f}"


def _interval_note(summary: dict) -> str:
    settings = summary["bootstrap"]
    return (
        f"\nValues with {100 * settings['confidence']:g} % {settings['interval']} intervals from a "
        f"{settings['n_resamples']}-resample speaker bootstrap (seed {settings['seed']}); back-end "
        f"{summary['backend']}."
    )


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def _escape(text: str) -> str:
    return text.replace("|", "\\|")
