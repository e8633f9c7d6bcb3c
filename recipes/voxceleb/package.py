#!/usr/bin/env python3
"""Stage 4: package the trained model of an experiment into ``EXP/model`` for use outside the toolkit.

    python recipes/voxceleb/package.py hparams/demo_cpu_qmargin.yaml --exp exp/demo [--key=value ...]

The folder loads with ``qmargin_spk.inference.SpeakerModel.from_folder``, SpeechBrain's
``EncoderClassifier.from_hparams`` and, after ``qmargin-spk export``, onnxruntime alone.
"""
import argparse
import sys

from qmargin_spk.experiment import StageError, stage_options
from qmargin_spk.inference.stage import package_stage


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("hparams", help="hparams YAML file of the experiment")
    parser.add_argument("--exp", required=True, help="experiment folder")
    args, rest = parser.parse_known_args(argv)
    _, overrides = stage_options(args.hparams, rest, {"output_folder": args.exp})
    try:
        print(package_stage(args.hparams, overrides))
    except StageError as err:
        print(f"package.py: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
