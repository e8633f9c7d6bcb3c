#!/usr/bin/env python3
"""Stage 5: large-margin fine-tuning of a trained experiment into a new experiment folder.

    python recipes/voxceleb/finetune_lm.py hparams/demo_cpu_qmargin.yaml --init exp/demo --exp exp/demo_lm \\
        [--lm_number_of_epochs=1 ...] [--key=value ...]

Starts from the averaged model of ``--init`` with the hparams' ``lm_overrides`` (longer crops,
larger margin, small LR, no speed classes); score the result with stage 3 like any experiment.
"""
import sys

from qmargin_spk.experiment import StageError, stage_main, stage_options, stage_parser
from qmargin_spk.training.checkpointing import SaveFolderBusyError
from qmargin_spk.training.stage import finetune_stage


def main(argv: list[str]) -> int:
    parser = stage_parser(__doc__)  # --exp: the new experiment folder of the fine-tuned model
    parser.add_argument("--init", required=True, help="trained experiment folder to start from")
    args, rest = parser.parse_known_args(argv)
    run_opts, overrides = stage_options(args.hparams, rest, {"output_folder": args.exp})
    return stage_main("finetune_lm.py", lambda: finetune_stage(args.hparams, run_opts, args.init, overrides),
                      (StageError, SaveFolderBusyError, FileNotFoundError))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
