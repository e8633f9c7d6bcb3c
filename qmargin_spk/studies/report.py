"""A study's report: pooled metrics per system, paired differences to the baseline, ablations and plots.

Every run's stage-3 scores are read as compare reads them
(:func:`~qmargin_spk.scoring.scored_system.load_scored_system`); runs of one system (and grid
point) over the seeds are pooled with :func:`qmargin_spk.metrics.pooled.pool_systems_against_baseline` (the seed
spread with a small-sample t correction and the test speakers' bootstrap, docs/metrics.md), and
each system is compared with the baseline seed by seed (the same function, one bootstrap for all runs).
Writes ``DIR/report.md``, ``DIR/report.json`` and ``DIR/plots/*.png``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

from qmargin_spk.metrics import DEFAULT_P_TARGETS, utterance_speakers
from qmargin_spk.metrics.pooled import METHOD, MIN_SEEDS, pool_systems_against_baseline
from qmargin_spk.scoring.compare_tables import format_settings, wide_table
from qmargin_spk.scoring.report import format_difference
from qmargin_spk.scoring.scored_system import (
    CompareError,
    ScoredSystem,
    check_same_trials,
    load_scored_system,
    trial_speakers,
)
from qmargin_spk.studies.plots import numeric_values, plot_available, plot_metric_panels
from qmargin_spk.studies.runner import BACKEND, StudyRun, plan_runs
from qmargin_spk.studies.spec import StudyError, StudySpec
from qmargin_spk.utils.atomic import atomic_write_text
from qmargin_spk.utils.markdown import markdown_table

INTERVAL = "seed-and-speaker pooled"
VALID_CURVE = "valid_curve.csv"
FARS = (1e-2, 1e-3, 1e-4)  # TAR is reported at these (where the list has false accepts enough)


def write_report(
    spec: StudySpec, out: str | Path, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> dict:
    """Pool every finished run of the study into ``DIR/report.{md,json}`` and plots; returns the JSON content."""
    out = Path(out)
    runs = plan_runs(spec, out)
    groups: dict[str, list[StudyRun]] = {}
    for run in runs:
        groups.setdefault(run.label, []).append(run)
    scored = {run.name: _load(run) for run in runs}
    # The baseline system's first grid point is the baseline of every difference.
    base_label = next(label for label, members in groups.items() if members[0].system.label == spec.baseline)
    settings = dict(p_targets=DEFAULT_P_TARGETS, fars=FARS, n_resamples=n_resamples, confidence=confidence, seed=seed)
    lists = [
        _pool_list(name, label, runs, groups, scored, base_label, settings)
        for name, label in spec.list_labels().items()
    ]
    report = {
        "spec": str(spec.path),
        "seeds": spec.seeds,
        "baseline": base_label,
        "backend": BACKEND,
        "method": {
            "interval": INTERVAL,
            "pooling": METHOD,
            "confidence": confidence,
            "n_resamples": n_resamples,
            "seed": seed,
        },
        "warnings": seed_warnings(len(spec.seeds)),
        "systems": {
            label: {
                "system": members[0].system.label,
                "grid_point": members[0].point.values,
                "runs": [run.name for run in members],
                "loss": scored[members[0].name].loss,
                "loss_settings": scored[members[0].name].loss_settings,
            }
            for label, members in groups.items()
        },
        "lists": lists,
    }
    report["ablations"] = _ablations(spec, groups, report, out)
    report["plots"] = _system_plots(report, out)
    report["learning_curves"] = _learning_curves(runs, out)
    atomic_write_text(out / "report.json", json.dumps(report, indent=2, allow_nan=False) + "\n")
    atomic_write_text(out / "report.md", report_markdown(report))
    return report


def seed_warnings(n_seeds: int) -> list[str]:
    """What the report warns about the number of seeds (nothing from ``MIN_SEEDS`` on)."""
    if n_seeds == 1:
        return [
            "one seed: the intervals cover the test speakers only, not the variation between training runs; "
            f"use {MIN_SEEDS} or more seeds"
        ]
    if n_seeds < MIN_SEEDS:
        return [
            f"only {n_seeds} seed(s): the seed-to-seed spread rests on few runs, so the pooled intervals "
            f"are wide (t-quantile with {n_seeds - 1} degrees of freedom); use {MIN_SEEDS} or more seeds"
        ]
    return []


def _pool_list(
    list_name: str,
    list_label: str,
    runs: list[StudyRun],
    groups: dict[str, list[StudyRun]],
    scored: dict[str, ScoredSystem],
    base_label: str,
    settings: dict,
) -> dict:
    """One trial list: every system pooled over its seeds, and its paired difference to the baseline."""
    reference = scored[runs[0].name].lists[list_name]
    try:
        for run in runs[1:]:
            check_same_trials(reference, runs[0].name, scored[run.name].lists[list_name], run.name)
    except CompareError as err:
        raise StudyError(str(err)) from None
    try:  # the speakers the runs recorded (test manifest or enrollment map), as compare uses them
        speakers = trial_speakers([(run.name, scored[run.name].lists[list_name]) for run in runs])
    except CompareError as err:
        raise StudyError(str(err)) from None
    labels = reference.labels
    enrol, test = utterance_speakers(reference.enrol, speakers), utterance_speakers(reference.test, speakers)

    def scores_of(label: str) -> list:
        return [scored[run.name].lists[list_name].scores for run in groups[label]]

    try:
        pooled, pooled_differences = pool_systems_against_baseline(
            {label: scores_of(label) for label in groups}, base_label, labels, enrol, test, **settings
        )
    except ValueError as err:
        raise StudyError(f"{reference.path}: {str(err).splitlines()[0]}") from None
    systems = {label: _flat(result.to_json()) for label, result in pooled.items()}
    differences = {label: _flat(result.to_json()) for label, result in pooled_differences.items()}
    return {
        "list": list_name,
        "label": list_label,
        "n_trials": int(labels.size),
        "n_target": int(labels.sum()),
        "n_speakers": len(set(enrol) | set(test)),
        "systems": systems,
        "differences": differences,
        "resolution": {
            metric: {label: diff[metric].get("half_width") for label, diff in differences.items()}
            for metric in _metrics(systems)
        },
    }


def report_markdown(report: dict) -> str:
    """The Markdown of ``report.json``: per list the systems, the differences and what they resolve, then the rest."""
    method = report["method"]
    text = [
        f"# Study {report['spec']}",
        "",
        f"Seeds {report['seeds']}; baseline {report['baseline']}; back-end {report['backend']}. Each value is the "
        f"mean over seeds ± the seed-to-seed standard deviation, with its {100 * method['confidence']:g} % "
        f"{method['interval']} interval (t over seeds, {method['n_resamples']}-resample speaker bootstrap, "
        "docs/metrics.md).",
    ]
    text += [f"\n**Warning:** {warning}." for warning in report["warnings"]]
    for entry in report["lists"]:
        metrics = _metrics(entry["systems"])
        text += [
            "",
            f"## {entry['label']} ({entry['list']}: {entry['n_trials']} trials, {entry['n_target']} target, "
            f"{entry['n_speakers']} speakers)",
            "",
        ]
        header = ["system", "loss", "loss settings", *(_title(m) for m in metrics)]
        rows = [
            [label, report["systems"][label]["loss"] or "", format_settings(report["systems"][label]["loss_settings"])]
            + [_pooled_cell(result[m], m) for m in metrics]
            for label, result in entry["systems"].items()
        ]
        text.append(markdown_table(header, rows))
        if entry["differences"]:
            header = ["system", *(f"Δ{_title(m)}" for m in metrics)]
            differences = entry["differences"].items()
            rows = [[label, *(_difference_cell(diff[m], m) for m in metrics)] for label, diff in differences]
            text += ["", f"Paired differences to {report['baseline']} (system - baseline, seed by seed):", ""]
            text.append(markdown_table(header, rows))
            header = ["system", *(_title(m) for m in metrics)]
            rows = [
                [label, *(_half_width(entry["resolution"][m][label], m) for m in metrics)]
                for label in entry["differences"]
            ]
            text += ["", "Smallest difference each comparison resolves (half-width of its interval):", ""]
            text.append(markdown_table(header, rows))
    published = wide_table(_compare_summary(report)).replace("## Summary\n\n", "")
    published = published.replace("paired bootstrap p-values", "pooled p-values (paired by seed)")
    text += ["", "## Published layout", "", published]
    for ablation in report["ablations"]:
        text += ["", f"## Ablation of {ablation['system']} over {', '.join(ablation['keys'])}", ""]
        text.append(markdown_table(ablation["header"], ablation["rows"]))
        text += [f"\n![{Path(png).stem}](plots/{Path(png).name})" for png in ablation["plots"]]
    if report["plots"] or report["learning_curves"]:
        text += ["", "## Plots", ""]
        text += [f"![{Path(png).stem}](plots/{Path(png).name})" for png in report["plots"]]
        if report["learning_curves"]:
            text.append(f"![learning curves](plots/{Path(report['learning_curves']).name})")
    return "\n".join(text) + "\n"


# ---------------------------------------------------------------- parts


def _load(run: StudyRun) -> ScoredSystem:
    try:
        return load_scored_system(run.folder, BACKEND)
    except CompareError as err:
        raise StudyError(f"run {run.name} is not finished ({err}); run the study to finish it") from None


def _ablations(spec: StudySpec, groups: dict[str, list[StudyRun]], report: dict, out: Path) -> list[dict]:
    """Per system with a grid: a table of every grid point, and per list a plot of each metric against a single key."""
    ablations = []
    for system in spec.systems.values():
        if not system.grid:
            continue
        labels = [label for label, members in groups.items() if members[0].system is system]
        keys = list(system.grid)
        header, rows, plots = [*keys], [[] for _ in labels], []
        for entry in report["lists"]:
            metrics = _metrics(entry["systems"])
            header += [f"{entry['label']} {_title(m)}" for m in metrics]
            for row, label in zip(rows, labels):
                row += [_pooled_cell(entry["systems"][label][m], m) for m in metrics]
            if len(keys) == 1 and plot_available():
                key, values = keys[0], system.grid[keys[0]]
                numeric = numeric_values(values)
                panels = {
                    _title(m): {
                        str(value): _point(entry["systems"][label][m], m) for value, label in zip(values, labels)
                    }
                    for m in metrics
                }
                png = out / "plots" / f"ablation_{system.label}_{key}_{entry['list']}.png"
                title = f"{system.label} over {key}: {entry['label']} (mean, {INTERVAL} interval)"
                if plot_metric_panels(panels, png, key, title, numeric):
                    plots.append(str(png))
        points = [groups[label][0].point.values for label in labels]
        rows = [[str(point[key]) for key in keys] + row for point, row in zip(points, rows)]
        ablations.append({"system": system.label, "keys": keys, "header": header, "rows": rows, "plots": plots})
    return ablations


def _system_plots(report: dict, out: Path) -> list[str]:
    """Per list, each metric of every system with its pooled interval."""
    plots = []
    for entry in report["lists"]:
        metrics = _metrics(entry["systems"])
        panels = {
            _title(m): {label: _point(result[m], m) for label, result in entry["systems"].items()} for m in metrics
        }
        png = out / "plots" / f"systems_{entry['list']}.png"
        if plot_metric_panels(panels, png, "system", f"{entry['label']}: mean over seeds, {INTERVAL} interval", False):
            plots.append(str(png))
    return plots


def _learning_curves(runs: Sequence[StudyRun], out: Path) -> str | None:
    """The validation curves of every run overlaid (None when no run validated, or without matplotlib)."""
    curves = {run.name: run.folder / VALID_CURVE for run in runs if (run.folder / VALID_CURVE).is_file()}
    if not curves:
        return None
    from qmargin_spk.training.learning_curves import plot_learning_curves

    png = out / "plots" / "learning_curves.png"
    return str(png) if plot_learning_curves(curves, png, title="learning curves of the study's runs") else None


def _compare_summary(report: dict) -> dict:
    """The report in the layout :func:`~qmargin_spk.scoring.compare_tables.wide_table` reads (compare's JSON)."""

    def nested(result: dict, difference: bool) -> dict:
        tree: dict = {"eer": None, "min_dcf": {}, "tar_at_far": {}}
        for metric, value in result.items():
            kind, key = metric_kind(metric)
            cell = {"low": value.get("low"), "high": value.get("high")}
            if difference:
                cell.update(difference=value.get("mean"), p_value=value.get("p_value"))
            else:
                cell["value"] = value.get("mean")
            if key is None:
                tree[kind] = cell
            else:
                tree[kind][key] = cell
        return tree

    return {
        "backend": report["backend"],
        "baseline": report["baseline"],
        "bootstrap": {**report["method"]},
        "experiments": [
            {"name": label, "loss": system["loss"], "loss_settings": system["loss_settings"]}
            for label, system in report["systems"].items()
        ],
        "lists": [
            {
                "label": entry["label"],
                "systems": {label: nested(result, False) for label, result in entry["systems"].items()},
                "differences": {label: nested(result, True) for label, result in entry["differences"].items()},
            }
            for entry in report["lists"]
        ],
    }


def _flat(pooled: dict) -> dict[str, dict]:
    """A pooled result's metrics under one key each: ``eer``, ``min_dcf@0.01``, ``tar_at_far@0.001``."""
    flat = {"eer": pooled["eer"]}
    flat.update({f"min_dcf@{key}": entry for key, entry in pooled["min_dcf"].items()})
    flat.update({f"tar_at_far@{key}": entry for key, entry in pooled["tar_at_far"].items()})
    return flat


def metric_kind(metric: str) -> tuple[str, str | None]:
    """``("eer", None)``, ``("min_dcf", "0.01")`` or ``("tar_at_far", "0.001")`` for a pooled metric's key."""
    number = re.search(r"(\d+(?:\.\d*)?(?:e-?\d+)?)\s*$", metric)
    key = None if number is None else f"{float(number.group(1)):g}"
    lowered = metric.lower()
    if "dcf" in lowered:
        return "min_dcf", key
    if "tar" in lowered:
        return "tar_at_far", key
    return "eer", None


def _metrics(systems: dict) -> list[str]:
    return list(next(iter(systems.values())))


def _title(metric: str) -> str:
    kind, key = metric_kind(metric)
    return {"eer": "EER %", "min_dcf": f"minDCF@{key}", "tar_at_far": f"TAR@FAR={key} %"}[kind]


def _scale(metric: str) -> tuple[float, int]:
    return (1.0, 3) if metric_kind(metric)[0] == "min_dcf" else (100.0, 2)


def _point(value: dict, metric: str) -> tuple[float | None, float | None, float | None]:
    scale, _ = _scale(metric)
    return tuple(None if value.get(k) is None else scale * value[k] for k in ("mean", "low", "high"))


def _pooled_cell(value: dict, metric: str) -> str:
    """``1.07 ± 0.12 [0.80, 1.34]`` (mean ± seed std [pooled interval]); ``n/a`` when undefined."""
    scale, digits = _scale(metric)
    if value.get("mean") is None:
        return "n/a"
    text = f"{scale * value['mean']:.{digits}f}"
    if value.get("seed_std") is not None:
        text += f" ± {scale * value['seed_std']:.{digits}f}"
    if value.get("low") is not None and value.get("high") is not None:
        text += f" [{scale * value['low']:.{digits}f}, {scale * value['high']:.{digits}f}]"
    return text


def _difference_cell(value: dict, metric: str) -> str:
    """``-0.45 [-0.80, -0.12] p=0.008``; ``n/a`` when undefined."""
    scale, digits = _scale(metric)
    return format_difference(
        value.get("mean"), value.get("low"), value.get("high"), value.get("p_value"), scale, digits
    )


def _half_width(value: float | None, metric: str) -> str:
    scale, digits = _scale(metric)
    return "n/a" if value is None else f"{scale * value:.{digits}f}"
