"""What a study resolves: the half-width of a pooled difference by number of seeds and test speakers; prints JSON.

For each finished seeded demo given (the ``--out`` folder of ``demo.py --seeds``: ``OUT/study.yaml`` and
the study in ``OUT/study``), or ``SPEC.yaml:DIR`` of a ``qmargin-spk study`` run, pools the
paired difference of every system against the study's baseline over the first ``k`` seeds, for
each ``k`` of ``--seed_counts``, and prints the half-width of its 95 % seed-and-speaker interval
(the smallest difference the study resolves) per metric, with the number of test speakers and
trials. docs/studies.md quotes it for the demo corpus (40 test speakers) and the study corpus (200).
Run: ``.venv/bin/python bench/study_power.py exp/study_demo exp/study_demo40 [--seed_counts 3 5]``
(``exp/study_demo40``: ``demo.py --seeds 1 2 3 4 5 --preset demo --out exp/study_demo40``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from qmargin_spk.metrics import DEFAULT_P_TARGETS, utterance_speakers
from qmargin_spk.metrics.pooled import pool_difference
from qmargin_spk.scoring.scored_system import load_scored_system, trial_speakers
from qmargin_spk.studies.report import FARS
from qmargin_spk.studies.runner import BACKEND, plan_runs
from qmargin_spk.studies.spec import load_spec

METRICS = {"eer": ("eer", None), "min_dcf@0.01": ("min_dcf", "0.01"), "tar@0.001": ("tar_at_far", "0.001")}


def study_power(given: str, seed_counts: list[int], n_resamples: int) -> list[dict]:
    """Half-widths of every system's difference to the baseline, per trial list and number of seeds."""
    spec_file, _, folder = given.rpartition(":")
    if spec_file:
        spec, folder = load_spec(spec_file), Path(folder)
    else:
        spec, folder = load_spec(Path(folder) / "study.yaml"), Path(folder) / "study"
    rows = []
    for k in seed_counts:
        if k > len(spec.seeds):
            continue
        runs = plan_runs(dataclasses.replace(spec, seeds=spec.seeds[:k]), folder)
        scored = {run.name: load_scored_system(run.folder, BACKEND) for run in runs}
        for list_name in spec.list_labels():
            lists = [(run.name, scored[run.name].lists[list_name]) for run in runs]
            reference = lists[0][1]
            speakers = trial_speakers(lists)
            enrol = utterance_speakers(reference.enrol, speakers)
            test = utterance_speakers(reference.test, speakers)
            by_system: dict[str, list] = {}
            for run in runs:
                by_system.setdefault(run.label, []).append(scored[run.name].lists[list_name].scores)
            base = by_system.pop(spec.baseline)
            for label, scores in by_system.items():
                pooled = pool_difference(
                    base,
                    scores,
                    reference.labels,
                    enrol,
                    test,
                    p_targets=DEFAULT_P_TARGETS,
                    fars=FARS,
                    n_resamples=n_resamples,
                ).to_json()
                widths = {}
                for name, (kind, key) in METRICS.items():
                    entry = pooled[kind] if key is None else pooled[kind][key]
                    widths[name] = entry["half_width"]
                rows.append(
                    {
                        "study": str(folder),
                        "list": list_name,
                        "difference": f"{label} - {spec.baseline}",
                        "seeds": k,
                        "test_speakers": len(set(enrol) | set(test)),
                        "trials": int(reference.labels.size),
                        "half_width": widths,
                    }
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("studies", nargs="+", help="seeded demo folders (demo.py --seeds --out OUT), or SPEC.yaml:DIR")
    parser.add_argument("--seed_counts", nargs="+", type=int, default=[3, 5])
    parser.add_argument("--n_resamples", type=int, default=1000)
    args = parser.parse_args()
    rows = [row for folder in args.studies for row in study_power(folder, args.seed_counts, args.n_resamples)]
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
