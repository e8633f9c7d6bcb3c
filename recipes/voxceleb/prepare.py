"""VoxCeleb recipe, stage 1: decode, scan and check the data, write manifests.

Example (VoxCeleb2 dev for training, VoxCeleb1 for the cleaned test lists):

    python recipes/voxceleb/prepare.py --train_root /data/vox2_dev --test_root /data/vox1 \\
        --trials /data/vox1/veri_test2.txt --trials /data/vox1/list_test_hard2.txt --out exp/data \\
        [--hparams hparams/<experiment>.yaml [--backbone NAME] [--loss NAME] [--setting NAME]]

With ``--hparams`` (the experiment, as run.sh passes it), test files shorter than the model's
shortest input are skipped and trials naming them refused. Re-running with unchanged inputs
does nothing; see qmargin_spk.data.prepare for details. ``--valid_speakers N`` (drawn with
``--data_seed``) or ``--valid_trials FILE`` writes a validation list to OUT and holds its speakers
out of training (qmargin_spk.data.validation_split); stage 2 scores it every ``valid_every`` epochs.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from qmargin_spk.data.prepare import PrepareError
from qmargin_spk.data.validation_split import ValidationSplitError
from qmargin_spk.stages.compose import KINDS
from qmargin_spk.stages.experiment import StageError
from qmargin_spk.stages.prepare import prepare_stage


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Prepare VoxCeleb-layout data: manifests, checks, m4a decoding.")
    parser.add_argument(
        "--train_root",
        action="append",
        required=True,
        help="audio tree (wav/, aac/ or <spk>/...), Kaldi data dir or CSV/JSONL manifest (repeatable)",
    )
    parser.add_argument("--test_root", required=True, help="test data (same forms) that the trial lists refer to")
    parser.add_argument(
        "--input_format",
        choices=("kaldi", "manifest", "tree"),
        help="force the form of every root (default: detected from its content; docs/data.md)",
    )
    parser.add_argument("--trials", action="append", default=[], help="trial list to validate (repeatable)")
    parser.add_argument("--out", required=True, help="output folder for manifests and listings")
    parser.add_argument("--allow_overlap", action="store_true", help="only warn when train and test share speakers")
    parser.add_argument("--min_duration", type=float, default=0.5, help="shortest training utterance kept, seconds")
    parser.add_argument("--num_workers", type=int, default=4, help="parallel header reads and ffmpeg processes")
    parser.add_argument(
        "--data_format",
        choices=("files", "shards"),
        default="files",
        help="shards: also write the training set as tar shards under OUT/shards",
    )
    parser.add_argument("--utts_per_shard", type=int, default=1000, help="utterances per tar shard")
    parser.add_argument("--seed", type=int, default=0, help="seed of the speaker mixing across shards")
    parser.add_argument("--hparams", help="experiment file: test files too short for its model are skipped")
    validation = parser.add_mutually_exclusive_group()
    validation.add_argument(
        "--valid_speakers", type=int, help="hold N training speakers out as a validation list (never the test lists)"
    )
    validation.add_argument("--valid_trials", help="validation trial list (training-side ids, or under --valid_root)")
    parser.add_argument("--valid_root", help="root with wav/ that --valid_trials refers to (else: the training data)")
    parser.add_argument("--data_seed", type=int, default=0, help="seed of the validation draw (not training's)")
    parser.add_argument("--valid_utts_per_speaker", type=int, default=8, help="utterances per validation speaker")
    for kind in KINDS:
        parser.add_argument(f"--{kind}", metavar="NAME", help=f"{kind} fragment of the experiment (with --hparams)")
    args = parser.parse_args(argv)
    choices = {kind: getattr(args, kind) for kind in KINDS if getattr(args, kind) is not None}
    if choices and args.hparams is None:
        parser.error(f"--{next(iter(choices))} needs --hparams")
    if args.valid_root is not None and args.valid_trials is None:
        parser.error("--valid_root needs --valid_trials")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = prepare_stage(
            args.train_root,
            args.test_root,
            args.trials,
            args.out,
            data_format=args.data_format,
            min_duration=args.min_duration,
            allow_overlap=args.allow_overlap,
            num_workers=args.num_workers,
            utts_per_shard=args.utts_per_shard,
            seed=args.seed,
            hparams_file=args.hparams,
            choices=choices,
            input_format=args.input_format,
            valid_speakers=args.valid_speakers,
            valid_trials=args.valid_trials,
            valid_root=args.valid_root,
            data_seed=args.data_seed,
            valid_utts_per_speaker=args.valid_utts_per_speaker,
        )
    except (PrepareError, StageError, ValidationSplitError) as err:
        print(f"prepare failed: {err}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
