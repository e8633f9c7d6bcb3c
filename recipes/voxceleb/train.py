#!/usr/bin/env python3
"""Stage 2: train ECAPA-TDNN with the loss named in the hparams file.

    python recipes/voxceleb/train.py hparams/demo_cpu_qmargin.yaml --output_folder=exp/demo [--key=value ...]
    torchrun --nproc_per_node=2 recipes/voxceleb/train.py hparams/... --distributed_backend=gloo ...
"""
import sys

import speechbrain as sb

from qmargin_spk.training.stage import train_stage

if __name__ == "__main__":
    hparams_file, run_opts, overrides = sb.parse_arguments(sys.argv[1:])
    train_stage(hparams_file, run_opts, overrides)
