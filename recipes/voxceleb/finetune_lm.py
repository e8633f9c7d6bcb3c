#!/usr/bin/env python3
"""Stage 5: large-margin fine-tuning of a trained experiment into a new experiment folder.

    python recipes/voxceleb/finetune_lm.py hparams/demo_cpu_qmargin.yaml --init exp/demo --exp exp/demo_lm \\
        [--lm_number_of_epochs=1 ...] [--key=value ...]

Starts from the averaged model of ``--init`` with the hparams' ``lm_overrides`` (longer crops,
larger margin, small LR, no speed classes); score the result with stage 3 like any experiment.
"""
import argparse
import sys

from qmargin_spk.experiment import StageError, stage_options
from qmargin_spk.training.checkpointing import SaveFolderBusyError
from qmargin_spk.training.stage import finetune_stage


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("hparams", help="hparams YAML file of the initial experiment")
    parser.add_argument("--init", required=True, help="trained experiment folder to start from")
    parser.add_argument("--exp", required=True, help="new experiment folder for the fine-tuned model")
    args, rest = parser.parse_known_args(argv)
    run_opts, overrides = stage_options(args.hparams, rest, {"output_folder": args.exp})
    try:
        finetune_stage(args.hparams, run_opts, args.init, overrides)
    except (StageError, SaveFolderBusyError, FileNotFoundError) as err:
        print(f"finetune_lm.py: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
