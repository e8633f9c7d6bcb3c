#!/usr/bin/env python3
"""Stage 2: train ECAPA-TDNN with the loss named in the hparams file.

    python recipes/voxceleb/train.py hparams/demo_cpu_qmargin.yaml --exp exp/demo [--key=value ...]
    torchrun --nproc_per_node=2 recipes/voxceleb/train.py hparams/... --exp DIR --distributed_backend=gloo ...

``--exp`` is taken as a path, never as YAML; ``--key=value`` overrides hparams keys.
"""
import sys

from qmargin_spk.experiment import StageError, stage_main, stage_options, stage_parser
from qmargin_spk.training.checkpointing import SaveFolderBusyError
from qmargin_spk.training.stage import train_stage


def main(argv: list[str]) -> int:
    args, rest = stage_parser(__doc__).parse_known_args(argv)
    run_opts, overrides = stage_options(args.hparams, rest, {"output_folder": args.exp})
    return stage_main("train.py", lambda: train_stage(args.hparams, run_opts, overrides),
                      (StageError, SaveFolderBusyError, FileNotFoundError))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
