#!/usr/bin/env python3
"""Compare experiments on their cached stage-3 scores: tables with intervals, differences, DET overlays.

    python recipes/voxceleb/compare.py EXP [EXP ...] [--baseline EXP] --out DIR \
        [--backend cosine] [--n_resamples 1000] [--seed 0] [--confidence 0.95]

Each EXP is an experiment folder scored by stage 3 (``EXP/scores/results.<backend>.json`` and
its score files); nothing is re-extracted. Writes ``DIR/summary.md`` (the wide table and the
differences to the baseline), ``DIR/<list>.md``, ``DIR/<list>.det.png`` and
``DIR/comparison.json``, and prints the summary. See docs/evidence.md.
"""
from __future__ import annotations

import argparse
import sys

from qmargin_spk.scoring.compare import CompareError, compare_experiments


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiments", nargs="+", help="experiment folders (the --exp of run.sh)")
    parser.add_argument("--baseline", help="experiment the others are compared with (paired differences)")
    parser.add_argument("--out", required=True, help="output folder for the tables, plots and JSON")
    parser.add_argument("--backend", default="cosine", help="which stage-3 scores to read (cosine or asnorm)")
    parser.add_argument("--n_resamples", type=int, default=1000, help="speaker-bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0, help="seed of the resamples")
    parser.add_argument("--confidence", type=float, default=0.95, help="confidence level of the intervals")
    args = parser.parse_args(argv)
    try:
        summary = compare_experiments(
            args.experiments, args.out, baseline=args.baseline, backend=args.backend,
            n_resamples=args.n_resamples, seed=args.seed, confidence=args.confidence,
        )
    except CompareError as error:
        print(f"compare: {error}", file=sys.stderr)
        return 1
    print(summary["table"], end="")
    print(f"\nwritten to {args.out}: summary.md, comparison.json, " + ", ".join(
        f"{entry['list']}.md" + (f" + {entry['list']}.det.png" if entry["det_plot"] else "")
        for entry in summary["lists"]
    ))
    return 0


if __name__ == "__main__":
    sys.exit(main())
