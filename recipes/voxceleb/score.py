#!/usr/bin/env python3
"""Stage 3: embed the trial utterances with the trained model, score, and report EER / minDCF / TAR@FAR.

    python recipes/voxceleb/score.py hparams/demo_cpu_qmargin.yaml --output_folder=exp/demo \
        --test_root=DIR --trial_files=[trials.txt] [--score_backend=asnorm] [--key=value ...]
"""
import sys

import speechbrain as sb

from qmargin_spk.scoring.stage import score_stage

if __name__ == "__main__":
    hparams_file, run_opts, overrides = sb.parse_arguments(sys.argv[1:])
    score_stage(hparams_file, overrides, device=run_opts.get("device"))
