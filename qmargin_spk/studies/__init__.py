"""Studies: many runs of the recipe (systems x grid points x seeds), run the same way and pooled over seeds.

``spec.py`` reads and checks SPEC.yaml, ``runner.py`` runs (and resumes) the experiment folders,
``report.py`` pools their scores into ``report.md`` / ``report.json`` with plots (``plots.py``);
docs/studies.md shows a study end to end.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from qmargin_spk.studies.report import write_report
from qmargin_spk.studies.runner import StudyRun, plan_runs, run_study
from qmargin_spk.studies.spec import StudyError, StudySpec, load_spec

__all__ = [
    "StudyError",
    "StudyRun",
    "StudySpec",
    "load_spec",
    "plan_runs",
    "run_and_report",
    "run_study",
    "write_report",
]


def run_and_report(
    spec_file: str | Path,
    out: str | Path,
    jobs: int = 1,
    n_resamples: int = 1000,
    log: Callable[[str], None] | None = None,
) -> dict:
    """``qmargin-spk study``: check the spec, run what is unfinished, write the report (returned)."""
    log = log or _say
    spec = load_spec(spec_file)
    run_study(spec, out, jobs=jobs, log=log)
    report = write_report(spec, out, n_resamples=n_resamples)
    log(f"report: {Path(out) / 'report.md'}")
    return report


def _say(line: str) -> None:
    print(line, flush=True)  # progress of runs that take minutes: shown as it happens, also through a pipe
