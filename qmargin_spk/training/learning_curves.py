"""The learning curve of a run (``EXP/valid_curve.csv``: train loss and validation metrics per epoch) and its plot.

One row per epoch, rewritten atomically; logging an epoch again (a resumed run replays it)
replaces its row and drops later ones, as the epoch log does. Validation columns are empty for
epochs that were not validated (``valid_every`` > 1). :func:`plot_learning_curves` overlays the
curves of several runs (one run's plot, or a study's), when matplotlib is installed.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import math
import os
from collections.abc import Mapping
from pathlib import Path

from qmargin_spk.utils.atomic import atomic_open, atomic_write_text

PathLike = str | os.PathLike
FIRST_COLUMNS = ("epoch", "train_loss")


def write_curve_row(path: PathLike, epoch: int, train_loss: float, valid: Mapping[str, float]) -> None:
    """Add (or replace) the row of ``epoch``: its train loss and the ``valid_*`` metrics (may be empty).

    Columns are the union of those already in the file and this row's, in first-seen order.
    """
    path = Path(path)
    rows = [row for row in read_curve(path) if int(row["epoch"]) < epoch] if path.is_file() else []
    new = {"epoch": epoch, "train_loss": train_loss, **{f"valid_{key}": value for key, value in valid.items()}}
    columns = list(FIRST_COLUMNS)
    for row in [*rows, new]:
        columns += [key for key in row if key not in columns]
    text = io.StringIO()
    writer = csv.DictWriter(text, columns, lineterminator="\n")
    writer.writeheader()
    for row in [*rows, new]:
        writer.writerow({key: _text(row.get(key)) for key in columns})
    atomic_write_text(path, text.getvalue())


def read_curve(path: PathLike) -> list[dict[str, float | None]]:
    """The rows of a curve file, numbers as floats (``epoch`` as int), empty cells as None."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = []
        for line, row in enumerate(csv.DictReader(handle), start=2):
            try:
                parsed = {key: float(value) if value not in ("", None) else None for key, value in row.items()}
                parsed["epoch"] = int(parsed["epoch"])
            except (TypeError, ValueError):
                raise ValueError(f"{path}:{line}: expected numbers, got {row}") from None
            rows.append(parsed)
        return rows


def _text(value: object) -> str:
    """Full precision (``repr``) for floats, so a reader gets back the logged value exactly; empty for None."""
    if value is None:
        return ""
    return repr(float(value)) if isinstance(value, float) else str(value)


def plot_available() -> bool:
    """True when matplotlib is installed, so :func:`plot_learning_curves` can draw."""
    return importlib.util.find_spec("matplotlib") is not None


def plot_learning_curves(curves: Mapping[str, PathLike], out_png: PathLike, title: str | None = None) -> bool:
    """Overlay the learning curves of several runs (label -> curve CSV) in ``out_png``; False without matplotlib.

    Panels: the training loss, then each validation metric the files hold (EER and minDCF), per epoch.
    A run without validation adds its loss only.
    """
    if not curves:
        raise ValueError("no learning curves to plot")
    if not plot_available():
        return False
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    loaded = {label: read_curve(path) for label, path in curves.items()}
    metrics = [column for column in _columns(loaded.values()) if column.startswith("valid_")]
    panels = ["train_loss", *metrics]
    figure = Figure(figsize=(4 * len(panels), 3.6), dpi=100)
    FigureCanvasAgg(figure)
    for index, column in enumerate(panels):
        axes = figure.add_subplot(1, len(panels), index + 1)
        for number, (label, rows) in enumerate(loaded.items()):
            points = [(row["epoch"], row.get(column)) for row in rows if _finite(row.get(column))]
            if points:
                epochs, values = zip(*points)
                axes.plot(epochs, values, marker="o", markersize=3, color=f"C{number % 10}", label=label or None)
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_title(_panel_title(column))
        axes.grid(alpha=0.3)
        if index == 0 and any(loaded):
            axes.legend(fontsize="small")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    with atomic_open(out_png, "wb") as handle:
        figure.savefig(handle, format="png")
    return True


def _panel_title(column: str) -> str:
    """``valid_min_dcf_0.01`` -> ``validation minDCF (P_target 0.01)``; ``valid_eer`` -> ``validation EER``."""
    if column == "train_loss":
        return "training loss"
    name = column.removeprefix("valid_")
    if name.startswith("min_dcf_"):
        return f"validation minDCF (P_target {name.removeprefix('min_dcf_')})"
    return f"validation {name.upper() if name == 'eer' else name}"


def _columns(tables) -> list[str]:
    columns: list[str] = []
    for rows in tables:
        for row in rows:
            columns += [key for key in row if key not in columns]
    return columns


def _finite(value: object) -> bool:
    return isinstance(value, float) and math.isfinite(value)
