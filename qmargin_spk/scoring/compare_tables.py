"""Markdown of a comparison (the dict :func:`~qmargin_spk.scoring.compare.compare_experiments` returns).

Two layouts: :func:`list_table`, every metric of every system on one list with its
interval, then the differences to the baseline; :func:`wide_table`, the layout of published
VoxCeleb tables, one row per system and a column group per list. Each system is identified
by its label, its loss and its loss settings as ``key value`` pairs, taken from its own
description (see :mod:`qmargin_spk.scoring.scored_system`).
"""

from __future__ import annotations

from collections.abc import Mapping

from qmargin_spk.scoring.report import format_difference, format_interval
from qmargin_spk.utils.markdown import markdown_table

# Columns of the wide table per list, as in published VoxCeleb tables.
WIDE_P_TARGET = 0.01
WIDE_FARS = (1e-3, 1e-4)
IDENTITY_HEADER = ("experiment", "loss", "loss settings")


def list_table(summary: dict, entry: dict) -> str:
    """Markdown for one list: every metric of every system with its interval, then the differences."""
    p_targets, fars = _metric_keys(entry)
    header = [*IDENTITY_HEADER, "EER %"]
    header += [f"minDCF@{p}" for p in p_targets] + [f"TAR@FAR={far} %" for far in fars]
    rows = []
    for system in _systems_on(summary, entry):
        result = entry["systems"][system["name"]]
        cells = identity_cells(system) + [_interval(result["eer"], percent=True)]
        cells += [_interval(result["min_dcf"][p], percent=False) for p in p_targets]
        cells += [_interval(result["tar_at_far"][far], percent=True) for far in fars]
        rows.append(cells)
    title = f"## {entry['label']} ({entry['list']}: {entry['n_trials']} trials, {entry['n_speakers']} speakers)"
    text = [title, "", markdown_table(header, rows), _interval_note(summary)]
    if entry["differences"]:
        header = ["experiment", "ΔEER (points)"]
        header += [f"ΔminDCF@{p}" for p in p_targets] + [f"ΔTAR@FAR={far} (points)" for far in fars]
        rows = []
        for name, difference in entry["differences"].items():
            cells = [name, _difference(difference["eer"], percent=True)]
            cells += [_difference(difference["min_dcf"][p], percent=False) for p in p_targets]
            cells += [_difference(difference["tar_at_far"][far], percent=True) for far in fars]
            rows.append(cells)
        text += [
            "",
            f"Differences to the baseline {summary['baseline']} (experiment - baseline), "
            "paired over the same resamples:",
            "",
            markdown_table(header, rows),
        ]
    return "\n".join(text) + "\n"


def wide_table(summary: dict) -> str:
    """The published-table layout: one row per system, a column group per list (EER, minDCF, TAR)."""
    groups = summary["lists"]
    metrics = [("EER %", "eer", None)]
    metrics += [(f"minDCF@{WIDE_P_TARGET:g}", "min_dcf", f"{WIDE_P_TARGET:g}")]
    metrics += [(f"TAR@FAR={far:g} %", "tar_at_far", f"{far:g}") for far in WIDE_FARS]
    header = [*IDENTITY_HEADER]
    header += [f"{entry['label']} {title}" for entry in groups for title, _, _ in metrics]
    rows = []
    for system in summary["experiments"]:
        cells = identity_cells(system)
        for entry in groups:
            result = entry["systems"].get(system["name"])
            for _, kind, key in metrics:
                value = None if result is None else _lookup(result, kind, key)
                cells.append("—" if value is None else _interval(value, percent=kind != "min_dcf"))
        rows.append(cells)
    text = ["## Summary", "", markdown_table(header, rows), _interval_note(summary)]
    if summary["baseline"] is not None:
        header = ["experiment"] + [f"{entry['label']} Δ{title}" for entry in groups for title, _, _ in metrics]
        rows = []
        for system in summary["experiments"]:
            if system["name"] == summary["baseline"]:
                continue
            cells = [system["name"]]
            for entry in groups:
                difference = entry["differences"].get(system["name"])
                for _, kind, key in metrics:
                    value = None if difference is None else _lookup(difference, kind, key)
                    cells.append("—" if value is None else _difference(value, percent=kind != "min_dcf"))
            rows.append(cells)
        text += [
            "",
            f"Differences to the baseline {summary['baseline']} (experiment - baseline; EER and TAR "
            "in percentage points), with their intervals and paired bootstrap p-values:",
            "",
            markdown_table(header, rows),
        ]
    return "\n".join(text) + "\n"


def identity_cells(system: dict) -> list[str]:
    """``[label, loss, "key value, ..."]`` of a described system; settings that are None are left out."""
    return [system["name"], system.get("loss") or "", format_settings(system.get("loss_settings") or {})]


def format_settings(settings: Mapping[str, object]) -> str:
    """``alpha 1.5, scale 10, margin_ramp [0, 5]``: one ``key value`` pair per setting that has a value."""
    pairs = [f"{key} {_format_value(value)}" for key, value in settings.items() if not _unset(value)]
    return ", ".join(pairs)


def _format_value(value: object) -> str:
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value).lower()
    if isinstance(value, (int, float)):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_format_value(item) for item in value) + "]"
    if isinstance(value, Mapping):
        return "{" + format_settings(value) + "}"
    return str(value)


def _unset(value: object) -> bool:
    """None, or a list of nothing but None (older files record an unused margin ramp as ``[null, null]``)."""
    return value is None or (isinstance(value, (list, tuple)) and all(item is None for item in value))


def _metric_keys(entry: dict) -> tuple[list[str], list[str]]:
    any_result = next(iter(entry["systems"].values()))
    return list(any_result["min_dcf"]), list(any_result["tar_at_far"])


def _systems_on(summary: dict, entry: dict) -> list[dict]:
    return [s for s in summary["experiments"] if s["name"] in entry["systems"]]


def _lookup(result: dict, kind: str, key: str | None) -> dict | None:
    return result[kind] if key is None else result[kind].get(key)


def _interval(entry: dict, percent: bool) -> str:
    """``1.07 [0.95, 1.21]`` (percent) or ``0.123 [0.110, 0.140]``; ``n/a`` when not reported."""
    scale, digits = (100, 2) if percent else (1, 3)
    return format_interval(entry["value"], entry["low"], entry["high"], scale, digits)


def _difference(entry: dict, percent: bool) -> str:
    """``-0.45 [-0.80, -0.12] p=0.008``; ``n/a`` when either system's metric is not reported."""
    scale, digits = (100, 2) if percent else (1, 3)
    return format_difference(entry["difference"], entry["low"], entry["high"], entry["p_value"], scale, digits)


def _interval_note(summary: dict) -> str:
    settings = summary["bootstrap"]
    return (
        f"\nValues with {100 * settings['confidence']:g} % {settings['interval']} intervals from a "
        f"{settings['n_resamples']}-resample speaker bootstrap (seed {settings['seed']}); back-end "
        f"{summary['backend']}."
    )
