"""``qmargin-spk``: embed, verify, score, calibrate and export with a packaged model folder.

    qmargin-spk embed --model DIR (FILE... | --list wav.scp) --out emb.ark|emb.npz|emb/
    qmargin-spk verify --model DIR A.wav B.wav [--p_target 0.01]
    qmargin-spk score --model DIR --trials LIST [--trials LIST2] --root DIR --out DIR
                      [--backend cosine|asnorm --cohort train.csv [--cohort_per_speaker 20] [--top_n 300]]
    qmargin-spk calibrate --model DIR --scores SCOREFILE [--quality --root DIR --cohort LIST]
    qmargin-spk export --model DIR --format onnx|torchscript [--quantize int8]
    qmargin-spk import speechbrain|wespeaker|3dspeaker SOURCE --out DIR
    qmargin-spk compare EXP [EXP ...] --out DIR [--baseline EXP] [--backend cosine] [--n_resamples N]
    qmargin-spk study SPEC.yaml --out DIR [--jobs N] [--n_resamples N]
    qmargin-spk --version

A mistake in the input (missing or malformed file, bad audio, a folder that is not a
model) ends with one line on stderr and exit status 1; usage errors exit with 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from qmargin_spk import __version__
from qmargin_spk.cli.commands import (
    UserError,
    run_calibrate,
    run_compare,
    run_embed,
    run_export,
    run_import,
    run_score,
    run_study,
    run_verify,
)

PROG = "qmargin-spk"

__all__ = ["PROG", "UserError", "add_compare_options", "build_parser", "main", "run_compare"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 on success)."""
    args = build_parser().parse_args(argv)
    from qmargin_spk.data.audio import AudioError
    from qmargin_spk.data.trials import MissingTrialFilesError
    from qmargin_spk.utils.messages import one_line

    try:
        args.run(args)
    except (UserError, AudioError, MissingTrialFilesError, OSError, ValueError, KeyError) as err:
        print(f"{PROG}: error: {one_line(err)}", file=sys.stderr)  # the file (and line) the user needs
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Speaker verification with a packaged qmargin_spk model.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    embed = commands.add_parser(
        "embed",
        help="L2-normalised embeddings of audio files into .ark/.scp, .npz or a folder of .npy",
        description="Embed audio files; the output's name picks the form: X.ark (Kaldi ark with X.scp beside it), "
        "X.npz (ids [N], embeddings [N, D]) or a folder X/ (one <id>.npy each; a trailing '/' or no extension).",
    )
    _model_options(embed)
    embed.add_argument("files", nargs="*", type=Path, metavar="FILE", help="audio files (ids: the paths)")
    embed.add_argument("--list", type=Path, help="Kaldi wav.scp: one '<id> <path>' per line (instead of FILEs)")
    embed.add_argument("--out", required=True, help="output .ark, .npz or folder/ (written atomically)")
    _embedding_options(embed)
    embed.set_defaults(run=run_embed)

    verify = commands.add_parser(
        "verify",
        help="score two recordings and decide",
        description="Score two recordings; print the score, the LLR (when the model is "
        "calibrated) and the decision at the Bayes threshold for --p_target.",
    )
    _model_options(verify)
    verify.add_argument("a", type=Path, metavar="A", help="first recording")
    verify.add_argument("b", type=Path, metavar="B", help="second recording")
    verify.add_argument("--p_target", type=_probability, default=0.01, help="prior of a target trial (0.01)")
    verify.set_defaults(run=run_verify)

    score = commands.add_parser(
        "score",
        help="score trial lists as the recipe's stage 3 does",
        description="Embed, score (cosine or AS-norm) and measure trial lists with the "
        "scoring pipeline of stage 3; with a calibrated model, also LLR score "
        "files and results.<backend>.calibrated.json (Cllr, actual DCF).",
    )
    _model_options(score)
    score.add_argument(
        "--trials", type=Path, action="append", required=True, help="trial list in any form (repeatable)"
    )
    score.add_argument(
        "--root", type=Path, required=True, help="folder the lists' paths are relative to, Kaldi data dir or manifest"
    )
    score.add_argument("--out", type=Path, required=True, help="output folder")
    score.add_argument(
        "--backend",
        choices=("cosine", "asnorm"),
        default="cosine",
        help="scoring back-end (cosine); asnorm needs --cohort",
    )
    score.add_argument(
        "--cohort",
        type=Path,
        help="training manifest CSV (ID,wav,duration,spk_id, as prepare writes it): its speakers "
        "form the AS-norm cohort and its mean embedding is subtracted, as in stage 3",
    )
    score.add_argument(
        "--cohort_per_speaker",
        type=_positive_int,
        default=20,
        help="cohort utterances per speaker, the first by id (20, cohort_utts_per_speaker)",
    )
    score.add_argument("--top_n", type=int, default=300, help="top cohort scores per utterance in AS-norm (300)")
    score.add_argument(
        "--enroll_map",
        type=Path,
        help="'<model> <utt1> <utt2> ...' per line: an enrolment item naming a model scores the average of its "
        "utterances' normalised embeddings (CN-Celeb enroll.map, Kaldi spk2utt)",
    )
    _embedding_options(score)
    score.set_defaults(run=run_score)

    calibrate = commands.add_parser(
        "calibrate",
        help="fit score -> LLR calibration into DIR/calibration.json",
        description="Fit logistic-regression calibration on a score file "
        "('enrol test score label' lines, e.g. from `score`), store it "
        "in the model folder (for this model's identity) and rewrite its model card.",
    )
    _model_options(calibrate)
    calibrate.add_argument("--scores", type=Path, required=True, help="score file to fit on")
    calibrate.add_argument("--prior", type=_probability, default=0.5, help="effective target prior of the fit (0.5)")
    calibrate.add_argument(
        "--quality",
        action="store_true",
        help="also use log durations and imposter means of both sides (needs --root, --cohort)",
    )
    calibrate.add_argument("--root", type=Path, help="folder the score file's utterances are relative to")
    calibrate.add_argument("--cohort", type=Path, help="wav.scp of cohort recordings (other speakers)")
    calibrate.add_argument("--top_n", type=int, default=300, help="cohort scores averaged per imposter mean (300)")
    _embedding_options(calibrate)
    calibrate.set_defaults(run=run_calibrate)

    export = commands.add_parser(
        "export",
        help="write ONNX or TorchScript (features inside the graph)",
        description="Export the model: waveform [batch, samples] in, embedding out.",
    )
    _model_options(export)
    export.add_argument("--format", choices=("onnx", "torchscript"), required=True)
    export.add_argument("--quantize", choices=("int8",), help="dynamic int8 weights (onnx only)")
    export.add_argument("--out", type=Path, help="output file (default: inside the model folder)")
    export.set_defaults(run=run_export)

    imported = commands.add_parser(
        "import",
        help="turn a published SpeechBrain / WeSpeaker / 3D-Speaker model into a model folder",
        description="Read a published model folder as its project publishes it (never evaluating its "
        "files), check every weight against the model it describes, and write a model folder.",
    )
    imported.add_argument("source_format", choices=("speechbrain", "wespeaker", "3dspeaker"), metavar="FORMAT")
    imported.add_argument("source", type=Path, metavar="SOURCE", help="the published folder")
    imported.add_argument("--out", type=Path, required=True, help="model folder to write (written atomically)")
    imported.set_defaults(run=run_import)

    compare = commands.add_parser(
        "compare",
        help="compare scored experiments: intervals, paired differences, DET",
        description="Compare experiment folders on their cached stage-3 scores "
        "(speaker-bootstrap intervals, paired differences to --baseline, "
        "DET overlays); trial lists are labelled by their names.",
    )
    add_compare_options(compare)
    compare.set_defaults(run=run_compare)

    study = commands.add_parser(
        "study",
        help="run systems x grid points x seeds of the recipe and pool them (docs/studies.md)",
        description="Run (or resume) every run a study spec names as experiment folders under DIR/runs, "
        "then write DIR/report.md and report.json: per system the mean over seeds, the seed spread and "
        "the seed-and-speaker pooled interval, paired differences to the baseline, ablations, plots.",
    )
    study.add_argument("spec", type=Path, metavar="SPEC", help="the study's SPEC.yaml")
    study.add_argument("--out", type=Path, required=True, help="the study's folder (runs, report)")
    study.add_argument("--jobs", type=_positive_int, default=1, help="runs at once, threads split among them (1)")
    study.add_argument("--n_resamples", type=_positive_int, default=1000, help="speaker-bootstrap resamples (1000)")
    study.set_defaults(run=run_study)
    return parser


def add_compare_options(parser: argparse.ArgumentParser) -> None:
    """The options of ``compare`` (shared with ``recipes/voxceleb/compare.py``)."""
    parser.add_argument("experiments", nargs="+", metavar="EXP", help="experiment folders (the --exp of run.sh)")
    parser.add_argument("--baseline", help="experiment the others are compared with (paired differences)")
    parser.add_argument("--out", required=True, help="output folder for the tables, plots and JSON")
    parser.add_argument("--backend", default="cosine", help="which stage-3 scores to read (cosine or asnorm)")
    parser.add_argument("--n_resamples", type=int, default=1000, help="speaker-bootstrap resamples (1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the resamples (0)")
    parser.add_argument("--confidence", type=float, default=0.95, help="confidence level of the intervals (0.95)")


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="packaged model folder")
    parser.add_argument("--device", default="cpu", help="torch device (cpu)")


def _embedding_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch_size", type=_positive_int, default=16, help="utterances per batch (16)")
    parser.add_argument("--chunk_seconds", type=float, help="embed long files in chunks of about this length, averaged")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be strictly between 0 and 1, got {text}")
    return value
