#!/usr/bin/env python3
"""Stage 4: package the trained model of an experiment into ``EXP/model`` for use outside the toolkit.

    python recipes/voxceleb/package.py hparams/demo_cpu_qmargin.yaml --exp exp/demo [--key=value ...]

The folder loads with ``qmargin_spk.inference.SpeakerModel.from_folder``, SpeechBrain's
``EncoderClassifier.from_hparams`` and, after ``qmargin-spk export``, onnxruntime alone.
"""
import sys

from qmargin_spk.experiment import StageError, stage_main, stage_options, stage_parser
from qmargin_spk.inference.stage import package_stage


def main(argv: list[str]) -> int:
    args, rest = stage_parser(__doc__).parse_known_args(argv)
    _, overrides = stage_options(args.hparams, rest, {"output_folder": args.exp})
    return stage_main("package.py", lambda: print(package_stage(args.hparams, overrides)), (StageError,))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
