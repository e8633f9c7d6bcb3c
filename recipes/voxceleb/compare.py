#!/usr/bin/env python3
"""Compare experiments on their cached stage-3 scores: tables with intervals, differences, DET overlays.

    python recipes/voxceleb/compare.py EXP [EXP ...] [--baseline EXP] --out DIR \
        [--backend cosine] [--n_resamples 1000] [--seed 0] [--confidence 0.95]

Each EXP is an experiment folder scored by stage 3 (``EXP/scores/results.<backend>.json`` and
its score files); nothing is re-extracted. Writes ``DIR/summary.md`` (the wide table and the
differences to the baseline), ``DIR/<list>.md``, ``DIR/<list>.det.png`` and
``DIR/comparison.json``, and prints the summary. This is ``qmargin-spk compare`` with the
published names of the VoxCeleb1 lists (Vox1-O, Vox1-E, Vox1-H, in that order). See docs/evidence.md.
"""

from __future__ import annotations

import argparse
import sys

from qmargin_spk.cli import UserError, add_compare_options, run_compare

# Published names of the VoxCeleb1 lists (cleaned "2" versions and originals), and their table order.
VOXCELEB_LIST_LABELS = {
    "veri_test2": "Vox1-O",
    "veri_test": "Vox1-O",
    "list_test_all2": "Vox1-E",
    "list_test_all": "Vox1-E",
    "list_test_hard2": "Vox1-H",
    "list_test_hard": "Vox1-H",
}
VOXCELEB_LIST_ORDER = ("Vox1-O", "Vox1-E", "Vox1-H")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_compare_options(parser)
    args = parser.parse_args(argv)
    try:
        run_compare(args, VOXCELEB_LIST_LABELS, VOXCELEB_LIST_ORDER)
    except (UserError, OSError) as error:
        print(f"compare: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
