#!/usr/bin/env python3
"""Stage 3: embed the trial utterances with the trained model, score, and report EER / minDCF / TAR@FAR.

    python recipes/voxceleb/score.py hparams/demo_cpu_qmargin.yaml --exp exp/demo --test_root DIR \\
        --trials LIST [--trials LIST2 ...] [--score_backend=asnorm] [--key=value ...]

``--exp``, ``--test_root`` and ``--trials`` are taken as paths, never as YAML.
"""
import sys

from qmargin_spk.data.trials import MissingTrialFilesError
from qmargin_spk.experiment import StageError, stage_main, stage_options, stage_parser
from qmargin_spk.scoring.stage import score_stage


def main(argv: list[str]) -> int:
    parser = stage_parser(__doc__)
    parser.add_argument("--test_root", required=True, help="VoxCeleb1-layout folder holding wav/")
    parser.add_argument("--trials", action="append", required=True, help="trial list (repeatable)")
    args, rest = parser.parse_known_args(argv)
    run_opts, overrides = stage_options(
        args.hparams, rest, {"output_folder": args.exp, "test_root": args.test_root, "trial_files": args.trials})
    return stage_main("score.py", lambda: score_stage(args.hparams, overrides, device=run_opts.get("device")),
                      (StageError, MissingTrialFilesError, FileNotFoundError, ValueError))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
