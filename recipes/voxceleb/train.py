#!/usr/bin/env python3
"""Stage 2: train the experiment composed from an experiment file (backbone + loss + setting fragments).

    python recipes/voxceleb/train.py hparams/demo_cpu_qmargin.yaml --exp exp/demo [--loss aam] [--key=value ...]
    python recipes/voxceleb/train.py exp/demo/hyperparams.yaml --exp exp/demo      # repeat a recorded run
    torchrun --nproc_per_node=2 recipes/voxceleb/train.py hparams/... --exp DIR --distributed_backend=gloo ...

``--backbone/--loss/--setting NAME`` pick fragments (hparams/backbones/, losses/, settings/);
``--exp`` is taken as a path, never as YAML; ``--key=value`` overrides hparams keys. The composed
experiment is written to ``EXP/hyperparams.yaml``, which every later stage reads.
"""

import sys

from qmargin_spk.stages.experiment import StageError
from qmargin_spk.stages.runner import parse_stage_arguments, stage_main, stage_parser
from qmargin_spk.stages.train import train_stage
from qmargin_spk.training.checkpointing import SaveFolderBusyError


def main(argv: list[str]) -> int:
    args = parse_stage_arguments(stage_parser(__doc__), argv, lambda args: {})
    return stage_main(
        "train.py",
        lambda: train_stage(args.exp, args.hparams, args.run_opts, args.choices, args.overrides),
        (StageError, SaveFolderBusyError, FileNotFoundError),
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
