#!/usr/bin/env python3
"""Stage 3: embed the trial utterances with the trained model, score, and report EER / minDCF / TAR@FAR.

    python recipes/voxceleb/score.py [HPARAMS] --exp exp/demo --test_root DIR --trials LIST [--trials LIST2 ...] \\
        [--enroll_map FILE] [--test_name NAME] [--embedding_format ark|npz|npy] [--score_backend=asnorm] \\
        [--key=value ...]

The first test root scored writes to EXP/scores/; another root to EXP/scores/<test_name>/ (docs/training.md).

The experiment is its record, ``EXP/hyperparams.yaml`` (written by stage 2); an experiment file,
fragment flag or override given here must agree with it on every key that shapes the model.
``--exp``, ``--test_root``, ``--trials`` and ``--enroll_map`` are taken as paths, never as YAML. An
enrolment item of a trial that names a model of ``--enroll_map`` is scored as the average of the model's
utterances (docs/evidence.md, "Enrollment models").
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
    parser.add_argument(
        "--test_name",
        help="name of a test root other than the first scored: its results go to EXP/scores/<name>/ "
        "(default: the root's folder name)",
    )
    parser.add_argument(
        "--embedding_format",
        choices=("ark", "npz", "npy"),
        help="also write the test embeddings as Kaldi ark/scp, .npz or a folder of .npy (in the results' embeddings/)",
    )
    parser.add_argument("--enroll_map", help="enrollment models: '<model> <utt1> <utt2> ...' per line")
    args = parse_stage_arguments(parser, argv, _paths)
    return stage_main(
        "score.py",
        lambda: score_stage(
            args.exp,
            args.hparams,
            args.choices,
            args.overrides,
            device=args.run_opts.get("device"),
            test_name=args.test_name,
            embedding_format=args.embedding_format,
        ),
        (StageError, MissingTrialFilesError, FileNotFoundError, ValueError),
    )


def _paths(args) -> dict:
    """The path arguments as overrides (never parsed as YAML); ``enroll_map`` only when given."""
    paths = {"test_root": args.test_root, "trial_files": args.trials}
    return paths | ({"enroll_map": args.enroll_map} if args.enroll_map is not None else {})


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
