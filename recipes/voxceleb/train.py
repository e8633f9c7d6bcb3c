#!/usr/bin/env python3
"""Stage 2: train the experiment composed from an experiment file (backbone + loss + setting fragments).

    python recipes/voxceleb/train.py hparams/demo_cpu_qmargin.yaml --exp exp/demo [--loss aam] [--key=value ...]
    python recipes/voxceleb/train.py exp/demo/hyperparams.yaml --exp exp/demo      # repeat a recorded run
    torchrun --nproc_per_node=2 recipes/voxceleb/train.py hparams/... --exp DIR --distributed_backend=gloo ...
    python recipes/voxceleb/train.py hparams/demo_cpu_qmargin.yaml --exp exp/demo --start_afresh --batch_size=64
    python recipes/voxceleb/train.py hparams/demo_cpu_qmargin.yaml --exp exp/ft --init_model MODEL_DIR

``--backbone/--loss/--setting NAME`` pick fragments (hparams/backbones/, losses/, settings/);
``--exp`` is taken as a path, never as YAML; ``--key=value`` overrides hparams keys. The composed
experiment is written to ``EXP/hyperparams.yaml``, which every later stage reads. Run again in a
folder that holds checkpoints, it resumes that run, and refuses settings a resume may not change
(docs/training.md); ``--start_afresh`` moves the previous run to ``EXP/previous-<time>/`` and trains anew.
``--init_model DIR`` starts from a model folder (ours or imported) whose front-end and backbone are the
run's: its weights, and a head started as hparams ``init_head`` says (fresh or the speakers' class means).
"""

import sys

from qmargin_spk.stages.experiment import StageError
from qmargin_spk.stages.runner import parse_stage_arguments, stage_main, stage_parser
from qmargin_spk.stages.train import train_stage
from qmargin_spk.training.checkpointing import SaveFolderBusyError


def main(argv: list[str]) -> int:
    parser = stage_parser(__doc__)
    parser.add_argument(
        "--start_afresh",
        action="store_true",
        help="move a previous run in --exp (checkpoints, record, log, scores, model) to EXP/previous-<time>/ first",
    )
    parser.add_argument(
        "--init_model",
        metavar="DIR",
        help="start from this model folder's weights (its front-end and backbone must be the run's)",
    )
    args = parse_stage_arguments(parser, argv, lambda args: {})
    return stage_main(
        "train.py",
        lambda: train_stage(
            args.exp, args.hparams, args.run_opts, args.choices, args.overrides, args.start_afresh, args.init_model
        ),
        (StageError, SaveFolderBusyError, FileNotFoundError),
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
