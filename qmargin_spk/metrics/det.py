"""DET curves (probit axes, EER marked), one system or several overlaid, written as a PNG; matplotlib is optional."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping

import numpy as np
import torch
from numpy.typing import ArrayLike

from qmargin_spk.metrics.verification import operating_points
from qmargin_spk.utils.atomic import atomic_open

# Axis range and ticks (error rates as fractions) of a conventional DET plot.
_AXIS_LIMITS = (1e-4, 0.5)
_TICKS = (1e-4, 1e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.2, 0.4)


def det_available() -> bool:
    """True when matplotlib is installed, so :func:`plot_det` can run."""
    return importlib.util.find_spec("matplotlib") is not None


def probit(probabilities: ArrayLike) -> np.ndarray:
    """Inverse standard-normal CDF; 0 and 1 map to -inf and +inf."""
    return torch.special.ndtri(torch.as_tensor(np.asarray(probabilities, dtype=np.float64))).numpy()


def plot_det(scores: ArrayLike, labels: ArrayLike, path: str | os.PathLike, title: str | None = None) -> None:
    """Draw the DET curve of a trial list (default-convention operating points) to ``path``."""
    plot_det_curves({"": (scores, labels)}, path, title=title)


def plot_det_curves(
    curves: Mapping[str, tuple[ArrayLike, ArrayLike]], path: str | os.PathLike, title: str | None = None
) -> None:
    """Overlay the DET curves of several systems (name -> ``(scores, labels)``), EER of each marked, to ``path``."""
    if not det_available():
        raise RuntimeError("DET plots need matplotlib: pip install matplotlib (the 'plot' extra)")
    if not curves:
        raise ValueError("no curves to plot")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    low, high = probit(np.array(_AXIS_LIMITS))
    figure = Figure(figsize=(5, 5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot([low, high], [low, high], color="0.8", linewidth=0.8)
    for index, (name, (scores, labels)) in enumerate(curves.items()):
        points = operating_points(scores, labels)
        eer, _ = points.equal_error_rate()
        # Points at FNR or FPR 0/1 lie at infinity; clip them just outside the visible range.
        fpr = np.clip(probit(points.fpr), low - 1, high + 1)
        fnr = np.clip(probit(points.fnr), low - 1, high + 1)
        colour = f"C{index % 10}"
        label = f"{name} (EER {100 * eer:.3f} %)" if name else f"EER {100 * eer:.3f} %"
        axes.plot(fpr, fnr, color=colour, linewidth=1.2, label=label)
        eer_probit = float(probit(np.array([eer]))[0])
        axes.plot([eer_probit], [eer_probit], "o", color=colour)
    ticks = probit(np.array(_TICKS))
    labels_text = [f"{100 * tick:g}" for tick in _TICKS]
    axes.set_xticks(ticks, labels_text)
    axes.set_yticks(ticks, labels_text)
    axes.set_xlim(low, high)
    axes.set_ylim(low, high)
    axes.set_xlabel("false-accept rate (%)")
    axes.set_ylabel("false-reject rate (%)")
    axes.grid(True, linewidth=0.5, alpha=0.6)
    axes.legend(loc="upper right", fontsize="small")
    if title:
        axes.set_title(title)
    figure.tight_layout()
    with atomic_open(path, "wb") as handle:
        figure.savefig(handle, format="png")
