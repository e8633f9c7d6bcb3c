"""Compare experiments from their cached stage-3 scores: tables with intervals, paired differences, DET overlays.

Reads each experiment's scored system (:func:`~qmargin_spk.scoring.scored_system.load_scored_system`:
results JSON, score files and the experiment's own description; no re-extraction),
bootstraps every system on every trial list with the same speaker resamples
(:class:`~qmargin_spk.metrics.SpeakerBootstrap`; each item's speaker as stage 3 recorded it in
``<list>.speakers``, from the test manifest or the enrollment map, else, for runs older than that
file, the first path component of the item), and writes to the output folder:
``<list>.md`` (one table per list, plus the differences to the baseline), ``summary.md``
(the wide table, one column group per list, plus the wide table of differences),
``comparison.json`` (every number) and ``<list>.det.png`` (all systems overlaid, when
matplotlib is installed). Lists are shown under their own names unless the caller maps
them to labels (a recipe knows its corpus: ``recipes/voxceleb/compare.py`` names the
VoxCeleb1 lists Vox1-O/E/H). Mistakes in the inputs raise :class:`CompareError` with a
one-line message.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

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
from qmargin_spk.scoring.compare_tables import list_table, wide_table
from qmargin_spk.scoring.scored_system import (
    CompareError,
    ScoredSystem,
    check_same_trials,
    load_scored_system,
    load_scored_systems,
    trial_speakers,
)
from qmargin_spk.utils.atomic import atomic_write_text

__all__ = ["CompareError", "ScoredSystem", "compare_experiments", "load_scored_system"]


class _ListNames:
    """How trial lists are named in tables and in which order: ``labels`` maps a list's name to its label
    (unmapped lists keep their name), ``order`` lists labels that come first, in that order; the others
    follow sorted by label."""

    def __init__(self, labels: Mapping[str, str] | None = None, order: Sequence[str] = ()) -> None:
        self.labels = dict(labels or {})
        self.order = tuple(order)

    def label(self, name: str) -> str:
        """The label of the list ``name`` (its own name when unmapped)."""
        return self.labels.get(name, name)

    def sort_key(self, name: str) -> tuple:
        """Labels of ``order`` first, then by label, then by list name."""
        label = self.label(name)
        rank = self.order.index(label) if label in self.order else len(self.order)
        return rank, label, name


def compare_experiments(
    experiment_paths: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    baseline: str | os.PathLike | None = None,
    backend: str = "cosine",
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    confidence: float = 0.95,
    list_labels: Mapping[str, str] | None = None,
    list_order: Sequence[str] = (),
) -> dict:
    """Tables, differences to ``baseline`` and DET overlays for the experiments; returns the JSON content.

    ``baseline`` is one of ``experiment_paths`` or another experiment folder, which is then
    added first. ``list_labels`` maps trial-list names to the labels shown in tables and plots
    (default: the names themselves); ``list_order`` gives the labels shown first, in that order.
    The returned dict also holds the Markdown of ``summary.md`` under ``table``.
    """
    if not experiment_paths:
        raise CompareError("no experiments given")
    if n_resamples < 2:
        raise CompareError(f"n_resamples must be at least 2, got {n_resamples}")
    if not 0 < confidence < 1:
        raise CompareError(f"confidence must be between 0 and 1 (e.g. 0.95), got {confidence}")
    names = _ListNames(list_labels, list_order)
    paths = [Path(p) for p in experiment_paths]
    base_index = None
    if baseline is not None:
        matches = [i for i, p in enumerate(paths) if p.resolve() == Path(baseline).resolve()]
        if not matches:
            paths.insert(0, Path(baseline))
        base_index = matches[0] if matches else 0
    systems = load_scored_systems(paths, backend)
    base = None if base_index is None else systems[base_index]
    out_dir = Path(out_dir)

    list_names = sorted({name for s in systems for name in s.lists}, key=names.sort_key)
    lists = [
        _compare_list(name, names.label(name), systems, base, out_dir, backend, n_resamples, seed, confidence)
        for name in list_names
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
        "experiments": [s.describe() for s in systems],
        "lists": lists,
    }
    for entry in lists:
        atomic_write_text(entry["table"], list_table(summary, entry))
    table = wide_table(summary)
    atomic_write_text(out_dir / "summary.md", table)
    atomic_write_text(out_dir / "comparison.json", json.dumps(summary, indent=2, allow_nan=False) + "\n")
    return {**summary, "table": table}


def _compare_list(
    list_name: str,
    label: str,
    systems: list[ScoredSystem],
    base: ScoredSystem | None,
    out_dir: Path,
    backend: str,
    n_resamples: int,
    seed: int,
    confidence: float,
) -> dict:
    """Bootstrap every system on one list (same resamples), differences to the baseline, table and DET plot."""
    present = [s for s in systems if list_name in s.lists]
    reference = present[0].lists[list_name]
    for system in present[1:]:
        check_same_trials(reference, present[0].name, system.lists[list_name], system.name)
    speakers = trial_speakers([(s.name, s.lists[list_name]) for s in present])
    try:
        bootstrap = SpeakerBootstrap(
            reference.labels,
            reference.enrol,
            reference.test,
            speakers,
            n_resamples=n_resamples,
            seed=seed,
            p_targets=DEFAULT_P_TARGETS,
            fars=DEFAULT_FARS,
        )
        replicates = {s.name: bootstrap.replicates(s.lists[list_name].scores) for s in present}
    except (ValueError, KeyError) as error:
        raise CompareError(f"{reference.path}: {str(error).splitlines()[0]}") from None
    results: dict[str, BootstrapResult] = {
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
        curves = {s.name: (s.lists[list_name].scores, s.lists[list_name].labels) for s in present}
        plot_det_curves(curves, det_file, title=f"{label} ({backend})")
    return {
        "list": list_name,
        "label": label,
        "n_trials": int(reference.labels.size),
        "n_speakers": bootstrap.n_speakers,
        "score_files": {s.name: str(s.lists[list_name].path) for s in present},
        "systems": {name: result.to_dict() for name, result in results.items()},
        "differences": {name: result.to_dict() for name, result in differences.items()},
        "det_plot": None if det_file is None else str(det_file),
        "table": str(out_dir / f"{list_name}.md"),
    }
