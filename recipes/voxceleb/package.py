#!/usr/bin/env python3
"""Stage 4: package the trained model of an experiment into ``EXP/model`` for use outside the toolkit.

    python recipes/voxceleb/package.py [HPARAMS] --exp exp/demo [--key=value ...]

The model is described by the experiment's record (``EXP/hyperparams.yaml``). The folder loads with
``qmargin_spk.inference.SpeakerModel.from_folder``, SpeechBrain's ``EncoderClassifier.from_hparams``
and, after ``qmargin-spk export``, onnxruntime alone.
"""

import sys

from qmargin_spk.inference.package import ModelFolderError
from qmargin_spk.stages.experiment import StageError
from qmargin_spk.stages.package import package_stage
from qmargin_spk.stages.runner import parse_stage_arguments, stage_main, stage_parser


def main(argv: list[str]) -> int:
    args = parse_stage_arguments(stage_parser(__doc__, hparams_required=False), argv, lambda args: {})
    return stage_main(
        "package.py",
        lambda: print(package_stage(args.exp, args.hparams, args.choices, args.overrides)),
        (StageError, ModelFolderError),
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
