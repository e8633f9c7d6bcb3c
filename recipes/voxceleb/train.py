#!/usr/bin/env python3
"""Stage 2: train ECAPA-TDNN with the loss named in the hparams file.

    python recipes/voxceleb/train.py hparams/demo_cpu_qmargin.yaml --exp exp/demo [--key=value ...]
    torchrun --nproc_per_node=2 recipes/voxceleb/train.py hparams/... --exp DIR --distributed_backend=gloo ...

``--exp`` is taken as a path, never as YAML; ``--key=value`` overrides hparams keys.
"""
import argparse
import sys

from qmargin_spk.experiment import StageError, stage_options
from qmargin_spk.training.checkpointing import SaveFolderBusyError
from qmargin_spk.training.stage import train_stage


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("hparams", help="hparams YAML file")
    parser.add_argument("--exp", required=True, help="experiment folder (the hparams' output_folder)")
    args, rest = parser.parse_known_args(argv)
    run_opts, overrides = stage_options(args.hparams, rest, {"output_folder": args.exp})
    try:
        train_stage(args.hparams, run_opts, overrides)
    except (StageError, SaveFolderBusyError, FileNotFoundError) as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
