#!/usr/bin/env python3
"""CN-Celeb recipe, stage 0: CN-Celeb's released layout -> manifests, trial lists and an enrollment map.

    python recipes/cnceleb/prepare.py --cnceleb1 /data/CN-Celeb_flac [--cnceleb2 /data/CN-Celeb2_flac] --out DIR

Writes DIR/train.csv (CN-Celeb1 dev speakers + all of CN-Celeb2), DIR/test.csv (CN-Celeb1 eval),
DIR/trials/CNC-Eval-Concat.lst (one concatenated enrollment file per model),
DIR/trials/CNC-Eval-Avg.lst and DIR/enroll.map (each model the average of its utterances);
see qmargin_spk.data.cnceleb. A folder not laid out as released ends with one line naming the file.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from qmargin_spk.data.cnceleb import prepare_cnceleb
from qmargin_spk.utils.messages import one_line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Turn CN-Celeb's released layout into the recipe's inputs.")
    parser.add_argument("--cnceleb1", required=True, help="CN-Celeb1 folder (data/, dev/dev.lst, eval/)")
    parser.add_argument("--cnceleb2", help="CN-Celeb2 folder (data/, spk.lst); all its speakers train")
    parser.add_argument("--out", required=True, help="folder for train.csv, test.csv, trials/, enroll.map")
    args = parser.parse_args(argv)
    try:
        written = prepare_cnceleb(args.cnceleb1, args.cnceleb2, args.out)
    except (ValueError, OSError) as err:  # CnCelebError, a list that is not UTF-8, an unreadable file
        print(f"prepare.py: error: {one_line(err)}", file=sys.stderr)
        return 1
    print(json.dumps({key: str(value) for key, value in asdict(written).items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
