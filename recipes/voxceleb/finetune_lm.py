#!/usr/bin/env python3
"""Stage 5: large-margin fine-tuning of a trained experiment into a new experiment folder.

    python recipes/voxceleb/finetune_lm.py [HPARAMS] --init exp/demo --exp exp/demo_lm \\
        [--lm_number_of_epochs=1 ...] [--key=value ...]

Starts from the averaged model of ``--init`` with its record's ``lm_overrides`` (longer crops,
larger margin, small LR, no speed classes); score the result with stage 3 like any experiment.
"""

import sys

from qmargin_spk.stages.experiment import StageError
from qmargin_spk.stages.runner import parse_stage_arguments, stage_main, stage_parser
from qmargin_spk.stages.train import finetune_stage
from qmargin_spk.training.checkpointing import SaveFolderBusyError


def main(argv: list[str]) -> int:
    parser = stage_parser(__doc__, hparams_required=False)  # --exp: the new experiment folder of the fine-tuned model
    parser.add_argument("--init", required=True, help="trained experiment folder to start from")
    args = parse_stage_arguments(parser, argv, lambda args: {})
    return stage_main(
        "finetune_lm.py",
        lambda: finetune_stage(args.init, args.exp, args.run_opts, args.hparams, args.choices, args.overrides),
        (StageError, SaveFolderBusyError, FileNotFoundError),
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
