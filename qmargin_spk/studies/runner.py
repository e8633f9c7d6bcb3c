"""Run a study: stage 1 once for the study, then stages 2-3 of the recipe per system, grid point and seed.

Each run is an ordinary experiment folder ``DIR/runs/<system>[_<key>-<value>...]_seed<k>`` made by
``recipes/voxceleb/run.sh`` in its own process (seeding is process-wide state), with the run's seed
as the ``--seed=k`` override and the study's manifests (``DIR/data``, prepared once so that every run
trains and scores on the same data) as ``--data_folder``. A run whose results hold every trial list
is finished and is not started again; any other run is started again and run.sh resumes it (stage 2
from its last checkpoint, stage 3 from its embedding cache). ``jobs`` runs go at once with
``cores // jobs`` threads each (``OMP_NUM_THREADS`` and the ``num_threads`` key).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from qmargin_spk.studies.spec import GridPoint, StudyError, StudySpec, SystemSpec
from qmargin_spk.utils.atomic import atomic_write_text

RUN_SH = Path(__file__).resolve().parents[2] / "recipes" / "voxceleb" / "run.sh"
BACKEND = "cosine"
RUN_LOG = "study_run.log"


@dataclass(frozen=True)
class StudyRun:
    """One run of a study: a system at a grid point with one training seed, in its own experiment folder."""

    system: SystemSpec
    point: GridPoint
    seed: int
    folder: Path

    @property
    def label(self) -> str:
        """The system and grid point (what runs of different seeds share): ``qmargin_alpha-1.5``."""
        return self.system.label + self.point.suffix

    @property
    def name(self) -> str:
        return self.folder.name


def plan_runs(spec: StudySpec, out: str | Path) -> list[StudyRun]:
    """Every run of the study, by system, grid point and seed (the spec's order)."""
    runs = Path(out) / "runs"
    return [
        StudyRun(system, point, seed, runs / f"{system.label}{point.suffix}_seed{seed}")
        for system in spec.systems.values()
        for point in system.points()
        for seed in spec.seeds
    ]


def is_finished(run: StudyRun, spec: StudySpec) -> bool:
    """Whether the run's stage-3 results hold every trial list of the study."""
    results = run.folder / "scores" / f"results.{BACKEND}.json"
    try:
        entries = json.loads(results.read_text(encoding="utf-8"))["results"]
        scored = {entry["list"] for entry in entries}
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return set(spec.list_labels()) <= scored


def threads_per_job(jobs: int, cores: int | None = None) -> int:
    """Intra-op threads of each of ``jobs`` simultaneous runs, so that jobs x threads <= cores (at least 1)."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, jobs))


def run_study(
    spec: StudySpec, out: str | Path, jobs: int = 1, log: Callable[[str], None] = print, cores: int | None = None
) -> list[StudyRun]:
    """Prepare once, then run every unfinished run, ``jobs`` at a time; returns the runs (all finished).

    A failed run does not stop the others; :class:`StudyError` names the failed runs and their logs at the end.
    """
    if jobs < 1:
        raise StudyError(f"--jobs must be at least 1, got {jobs}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    threads = threads_per_job(jobs, cores)
    runs = plan_runs(spec, out)
    todo = [run for run in runs if not is_finished(run, spec)]
    log(
        f"study {spec.path}: {len(runs)} runs, {len(runs) - len(todo)} finished, {len(todo)} to run "
        f"({jobs} at a time, {threads} thread(s) each)"
    )
    if not todo:
        return runs
    _prepare(spec, out, threads)
    failed = []

    def one(run: StudyRun) -> None:
        began = time.time()
        code = _run_recipe(run, spec, out, threads)
        if code != 0:
            failed.append(run)
            log(f"  {run.name}: failed (exit {code}): {_last_line(run.folder / RUN_LOG)}")
        else:
            log(f"  {run.name}: done in {time.time() - began:.0f} s")

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(one, todo))
    if failed:
        names = ", ".join(str(run.folder / RUN_LOG) for run in failed)
        raise StudyError(f"{len(failed)} of {len(todo)} runs failed (logs: {names}); run the study again to resume")
    return runs


def run_sh_command(run: StudyRun, spec: StudySpec, out: Path, threads: int) -> list[str]:
    """The run.sh command of stages 2-3 for ``run`` (the manifests of the study's stage 1)."""
    overrides = {
        **run.system.overrides,
        **run.point.values,
        "seed": run.seed,
        "num_threads": threads,
        "data_folder": str(out / "data"),
    }
    return [
        "bash",
        str(RUN_SH),
        "--stage",
        "2",
        "--stop_stage",
        "3",
        "--exp",
        str(run.folder),
        "--hparams",
        str(run.system.hparams),
        *run.system.fragment_flags(),
        "--test_root",
        str(spec.test_root),
        *[flag for path in spec.trials.values() for flag in ("--trials", str(path))],
        *[f"--{key}={json.dumps(value)}" for key, value in overrides.items()],
    ]


def _prepare(spec: StudySpec, out: Path, threads: int) -> None:
    """Stage 1 into ``DIR/data`` (run.sh skips it when the manifests are already there)."""
    command = ["bash", str(RUN_SH), "--stage", "1", "--stop_stage", "1", "--exp", str(out)]
    command += [flag for root in spec.train_roots for flag in ("--train_root", str(root))]
    command += ["--test_root", str(spec.test_root)]
    command += [flag for path in spec.trials.values() for flag in ("--trials", str(path))]
    if spec.valid_trials is not None:
        command += ["--valid_trials", str(spec.valid_trials)]
    if spec.valid_speakers is not None:
        command += ["--valid_speakers", str(spec.valid_speakers)]
    log_file = out / "prepare.log"
    code = _logged(command, log_file, threads)
    if code != 0:
        raise StudyError(f"stage 1 of the study failed (exit {code}): {_last_line(log_file)} (log: {log_file})")


def _run_recipe(run: StudyRun, spec: StudySpec, out: Path, threads: int) -> int:
    run.folder.mkdir(parents=True, exist_ok=True)
    command = run_sh_command(run, spec, out, threads)
    atomic_write_text(run.folder / "study_command.json", json.dumps(command, indent=1) + "\n")
    return _logged(command, run.folder / RUN_LOG, threads)


def _logged(command: list[str], log_file: Path, threads: int) -> int:
    """Run ``command`` with its output appended to ``log_file``; its exit status."""
    env = {**os.environ, "PYTHON": os.environ.get("PYTHON", sys.executable), "OMP_NUM_THREADS": str(threads)}
    with open(log_file, "a", encoding="utf-8") as handle:
        handle.write(f"\n== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n")
        handle.flush()
        return subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env).returncode


def _last_line(log_file: Path) -> str:
    """The last line of a log that says something (a stage's one-line error, usually)."""
    try:
        lines = [line.strip() for line in log_file.read_text(encoding="utf-8", errors="replace").splitlines()]
    except OSError:
        return "no log"
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or [line for line in lines if line] or ["no output"])[-1][:300]
