#!/usr/bin/env python3
"""Stage 3: embed the trial utterances with the trained model, score, and report EER / minDCF / TAR@FAR.

    python recipes/voxceleb/score.py [HPARAMS] --exp exp/demo --test_root DIR --trials LIST [--trials LIST2 ...] \\
        [--score_backend=asnorm] [--key=value ...]

The experiment is its record, ``EXP/hyperparams.yaml`` (written by stage 2); an experiment file,
fragment flag or override given here must agree with it on every key that shapes the model.
``--exp``, ``--test_root`` and ``--trials`` are taken as paths, never as YAML.
"""

import sys

from qmargin_spk.data.trials import MissingTrialFilesError
from qmargin_spk.stages.experiment import StageError
from qmargin_spk.stages.runner import parse_stage_arguments, stage_main, stage_parser
from qmargin_spk.stages.score import score_stage


def main(argv: list[str]) -> int:
    parser = stage_parser(__doc__, hparams_required=False)
    parser.add_argument("--test_root", required=True, help="VoxCeleb1-layout folder holding wav/")
    parser.add_argument("--trials", action="append", required=True, help="trial list (repeatable)")
    args = parse_stage_arguments(parser, argv, lambda args: {"test_root": args.test_root, "trial_files": args.trials})
    return stage_main(
        "score.py",
        lambda: score_stage(args.exp, args.hparams, args.choices, args.overrides, device=args.run_opts.get("device")),
        (StageError, MissingTrialFilesError, FileNotFoundError, ValueError),
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
