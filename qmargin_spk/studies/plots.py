"""A study's plots: each metric per system with its pooled interval, and each metric against a swept key.

matplotlib is optional (the ``plot`` extra): without it nothing is drawn and the callers say so.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from qmargin_spk.metrics import det_available
from qmargin_spk.utils.atomic import atomic_open

# One pooled value: (mean, low, high), any of them None when the metric is undefined.
Point = tuple[float | None, float | None, float | None]


def plot_available() -> bool:
    """True when matplotlib is installed."""
    return det_available()


def plot_metric_panels(
    panels: Mapping[str, Mapping[str, Point]], out_png: str | os.PathLike, x_label: str, title: str, numeric: bool
) -> bool:
    """One panel per metric (title -> {x: (mean, low, high)}), points with interval bars; False if nothing was drawn.

    ``numeric``: the x values are numbers (a swept key) and are placed at their values, joined by a line;
    otherwise they are categories (systems) placed side by side.
    """
    panels = {metric: points for metric, points in panels.items() if any(p[0] is not None for p in points.values())}
    if not panels or not plot_available():  # a metric the lists do not define (TAR at a low FAR) is left out
        return False
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(3.6 * len(panels), 3.4), dpi=100)
    FigureCanvasAgg(figure)
    for index, (metric, points) in enumerate(panels.items()):
        axes = figure.add_subplot(1, len(panels), index + 1)
        names = list(points)
        shown = [(i, name, points[name]) for i, name in enumerate(names) if points[name][0] is not None]
        if shown:
            xs = [float(name) if numeric else i for i, name, _ in shown]
            means = [point[0] for _, _, point in shown]
            below = [point[0] - point[1] if point[1] is not None else 0.0 for _, _, point in shown]
            above = [point[2] - point[0] if point[2] is not None else 0.0 for _, _, point in shown]
            axes.errorbar(xs, means, yerr=[below, above], marker="o", capsize=4, linestyle="-" if numeric else "none")
        if not numeric:
            axes.set_xticks(range(len(names)))
            axes.set_xticklabels(names, rotation=30, ha="right", fontsize="small")
            axes.set_xlim(-0.5, len(names) - 0.5)
        axes.set_xlabel(x_label)
        axes.set_title(metric, fontsize="medium")
        axes.grid(alpha=0.3)
    figure.suptitle(title, fontsize="medium")
    figure.tight_layout()
    with atomic_open(out_png, "wb") as handle:
        figure.savefig(handle, format="png")
    return True


def numeric_values(values: Sequence[object]) -> bool:
    """Whether every swept value is a number (not a bool), so they can sit on a numeric axis."""
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
