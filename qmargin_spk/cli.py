"""``qmargin-spk``: embed, verify, score, calibrate and export with a packaged model folder.

    qmargin-spk embed --model DIR (FILE... | --list wav.scp) --out emb.npz
    qmargin-spk verify --model DIR A.wav B.wav [--p_target 0.01]
    qmargin-spk score --model DIR --trials LIST [--trials LIST2] --root DIR --out DIR
                      [--backend cosine|asnorm --cohort train.csv [--cohort_per_speaker 20] [--top_n 300]]
    qmargin-spk calibrate --model DIR --scores SCOREFILE [--quality --root DIR --cohort LIST]
    qmargin-spk export --model DIR --format onnx|torchscript [--quantize int8]
    qmargin-spk compare EXP [EXP ...] --out DIR [--baseline EXP] [--backend cosine] [--n_resamples N]
    qmargin-spk --version

A mistake in the input (missing or malformed file, bad audio, a folder that is not a
model) ends with one line on stderr and exit status 1; usage errors exit with 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from qmargin_spk import __version__

PROG = "qmargin-spk"


class UserError(Exception):
    """A problem with what the user asked for; reported as one line, without a traceback."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 on success)."""
    args = build_parser().parse_args(argv)
    from qmargin_spk.data.audio import AudioError
    from qmargin_spk.data.trials import MissingTrialFilesError

    try:
        args.run(args)
    except (UserError, AudioError, MissingTrialFilesError, OSError, ValueError, KeyError) as err:
        text = f"{err.filename}: {err.strerror}" if isinstance(err, OSError) and err.filename else str(err)
        message = text.strip().splitlines() or [type(err).__name__]
        print(
            f"{PROG}: error: {message[0]}" + (f" (+{len(message) - 1} more lines)" if len(message) > 1 else ""),
            file=sys.stderr,
        )
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Speaker verification with a packaged qmargin_spk model.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    embed = commands.add_parser(
        "embed",
        help="L2-normalised embeddings of audio files into an .npz",
        description="Embed audio files; writes ids [N] and embeddings [N, D] to an .npz.",
    )
    _model_options(embed)
    embed.add_argument("files", nargs="*", type=Path, metavar="FILE", help="audio files (ids: the paths)")
    embed.add_argument("--list", type=Path, help="Kaldi wav.scp: one '<id> <path>' per line (instead of FILEs)")
    embed.add_argument("--out", type=Path, required=True, help="output .npz (written atomically)")
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
        "--trials", type=Path, action="append", required=True, help="trial list '<label> <enrol> <test>' (repeatable)"
    )
    score.add_argument("--root", type=Path, required=True, help="folder the lists' paths are relative to")
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
    _embedding_options(score)
    score.set_defaults(run=run_score)

    calibrate = commands.add_parser(
        "calibrate",
        help="fit score -> LLR calibration into DIR/calibration.json",
        description="Fit logistic-regression calibration on a score file "
        "('enrol test score label' lines, e.g. from `score`) and store it "
        "in the model folder.",
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

    compare = commands.add_parser(
        "compare",
        help="compare scored experiments: intervals, paired differences, DET",
        description="Compare experiment folders on their cached stage-3 scores "
        "(speaker-bootstrap intervals, paired differences to --baseline, "
        "DET overlays); trial lists are labelled by their names.",
    )
    add_compare_options(compare)
    compare.set_defaults(run=run_compare)
    return parser


# ---------------------------------------------------------------- commands


def run_embed(args: argparse.Namespace) -> None:
    from qmargin_spk.utils.atomic import atomic_open

    if (args.list is None) == (not args.files):
        raise UserError("give either audio files or --list wav.scp (not both)")
    if args.list is not None:
        ids, paths = _read_wav_scp(args.list)
    else:
        ids, paths = [str(path) for path in args.files], list(args.files)
    model = _load_model(args)
    embeddings = model.embed(paths, batch_size=args.batch_size, chunk_seconds=args.chunk_seconds, progress=True)
    with atomic_open(args.out, "wb") as handle:
        np.savez(handle, ids=np.array(ids, dtype=str), embeddings=embeddings)
    print(f"{len(ids)} embeddings of size {embeddings.shape[1]} written to {args.out}")


def run_verify(args: argparse.Namespace) -> None:
    model = _load_model(args)
    result = model.verify(args.a, args.b, p_target=args.p_target)
    print(f"score: {result.score:.6f}")
    print(f"llr: {'n/a (model not calibrated)' if result.llr is None else f'{result.llr:.4f}'}")
    if result.decision is None:
        print(f"decision: none ({result.source})")
    else:
        verdict = "same speaker" if result.decision else "different speakers"
        print(
            f"decision: {verdict} at p_target {result.p_target:g} (threshold {result.threshold:.4f}; {result.source})"
        )


def run_score(args: argparse.Namespace) -> None:
    from qmargin_spk.calibration import calibrate_run
    from qmargin_spk.scoring.cohort import cohort_utterances
    from qmargin_spk.scoring.pipeline import score_trial_lists

    missing = [str(path) for path in args.trials if not path.is_file()]
    if missing:
        raise UserError(f"no such trial list: {', '.join(missing)}")
    if args.backend == "asnorm" and args.cohort is None:
        raise UserError("--backend asnorm needs --cohort (a training manifest CSV)")
    if args.cohort is not None and not args.cohort.is_file():
        raise UserError(f"{args.cohort}: no such cohort manifest")
    if args.top_n < 2:
        raise UserError(f"--top_n must be at least 2, got {args.top_n}")
    cohort_paths = cohort_speakers = None
    if args.cohort is not None:
        cohort_paths, cohort_speakers = cohort_utterances(args.cohort, args.cohort_per_speaker)
    model = _load_model(args)
    model_id = model.identity
    bar = _progress_bar("embedding")

    def embed_fn(wavs, rel_lens):
        bar.update(int(wavs.shape[0]))
        return model.embed_batch(wavs, rel_lens)

    try:  # the arguments of stage 3 (qmargin_spk.stages.score): one pipeline
        run = score_trial_lists(
            embed_fn,
            model_id,
            args.root,
            [str(path) for path in args.trials],
            args.out,
            backend=args.backend,
            cohort_paths=cohort_paths,
            cohort_speakers=cohort_speakers,
            top_n=args.top_n,
            subtract_mean=None if cohort_paths is not None else False,
            batch_size=args.batch_size,
            chunk_seconds=args.chunk_seconds,
            sample_rate=model.sample_rate,
        )
    finally:
        bar.close()
    if model.calibration is None:
        return
    quality_of = None
    if model.calibration.uses_quality:
        table = _stage_embeddings(model, model_id, args)

        def quality_of(result: dict) -> dict:
            enrol, test = _score_file_sides(result["score_file"])
            return _trial_quality(
                enrol,
                test,
                table.utt_ids,
                table.vectors.numpy(),
                args.root,
                model.cohort,
                model.calibration.cohort["top_n"],
            )

    print(calibrate_run(model.calibration, run, args.out, quality_of), end="")


def run_calibrate(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from qmargin_spk.calibration import cllr, fit_calibration, min_cllr
    from qmargin_spk.inference.package import CALIBRATION_FILE, COHORT_FILE
    from qmargin_spk.scoring.report import read_score_file
    from qmargin_spk.utils.atomic import atomic_open

    if args.quality and (args.root is None or args.cohort is None):
        raise UserError("--quality needs --root (where the scored utterances are) and --cohort (a wav.scp)")
    if args.top_n < 2:
        raise UserError(f"--top_n must be at least 2, got {args.top_n}")
    enrol, test, scores, labels = read_score_file(args.scores)
    model = _load_model(args)
    quality = cohort_spec = cohort = None
    if args.quality:
        _, cohort_paths = _read_wav_scp(args.cohort)
        cohort = model.embed(cohort_paths, batch_size=args.batch_size, chunk_seconds=args.chunk_seconds, progress=True)
        utts = sorted(set(enrol) | set(test))
        embeddings = model.embed(
            [args.root / utt for utt in utts],
            batch_size=args.batch_size,
            chunk_seconds=args.chunk_seconds,
            progress=True,
        )
        quality = _trial_quality(enrol, test, utts, embeddings, args.root, cohort, args.top_n)
        cohort_spec = {"file": COHORT_FILE, "top_n": args.top_n, "n_cohort": int(cohort.shape[0])}
    calibration = fit_calibration(scores, labels, quality=quality, prior=args.prior, cohort=cohort_spec)
    before, after = cllr(scores, labels), cllr(calibration.llrs({"score": scores, **(quality or {})}), labels)
    fit = {
        **calibration.fit,
        "scores": str(args.scores),
        "cllr_before": before,
        "cllr_after": after,
        "min_cllr": min_cllr(scores, labels),
        "model_sha256": model.info["checkpoint_sha256"],
    }
    calibration = replace(calibration, fit=fit)
    if cohort is not None:
        with atomic_open(args.model / COHORT_FILE, "wb") as handle:
            np.save(handle, cohort)
    calibration.save(args.model / CALIBRATION_FILE)
    print(
        f"calibration on {labels.size} trials ({int(labels.sum())} target) written to {args.model / CALIBRATION_FILE}"
    )
    print(f"inputs: {', '.join(calibration.inputs)}")
    print(f"Cllr before: {before:.4f}  after: {after:.4f}  (min Cllr {fit['min_cllr']:.4f}; on the fitting list)")


def run_export(args: argparse.Namespace) -> None:
    from qmargin_spk.inference import export as exporter

    if args.quantize and args.format != "onnx":
        raise UserError("--quantize applies to --format onnx only")
    model = _load_model(args)
    if args.format == "onnx":
        default = exporter.ONNX_INT8_FILE if args.quantize else exporter.ONNX_FILE
        out = exporter.export_onnx(model, args.out or args.model / default, quantize=args.quantize)
        print(f"ONNX written to {out}; onnxruntime vs PyTorch cosine on a test signal: {_onnx_check(model, out):.6f}")
    else:
        out = exporter.export_torchscript(model, args.out or args.model / exporter.TORCHSCRIPT_FILE)
        print(f"TorchScript written to {out}")


def run_compare(
    args: argparse.Namespace, list_labels: dict[str, str] | None = None, list_order: Sequence[str] = ()
) -> None:
    """Compare the experiments of ``args`` (see :func:`add_compare_options`); print the summary table.

    ``list_labels`` / ``list_order`` name and order the trial lists (a recipe supplies its corpus's names).
    """
    from qmargin_spk.scoring.compare import CompareError, compare_experiments

    try:
        summary = compare_experiments(
            args.experiments,
            args.out,
            baseline=args.baseline,
            backend=args.backend,
            n_resamples=args.n_resamples,
            seed=args.seed,
            confidence=args.confidence,
            list_labels=list_labels,
            list_order=list_order,
        )
    except CompareError as error:
        raise UserError(str(error)) from None
    print(summary["table"], end="")
    print(
        f"\nwritten to {args.out}: summary.md, comparison.json, "
        + ", ".join(
            f"{entry['list']}.md" + (f" + {entry['list']}.det.png" if entry["det_plot"] else "")
            for entry in summary["lists"]
        )
    )


# ---------------------------------------------------------------- helpers


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


def _load_model(args: argparse.Namespace):
    from qmargin_spk.inference import SpeakerModel

    return SpeakerModel.from_folder(args.model, device=args.device)


def _read_wav_scp(path: Path) -> tuple[list[str], list[Path]]:
    """``(ids, paths)`` of a Kaldi wav.scp (``<id> <path>`` lines; blank lines skipped; ids unique)."""
    if not path.is_file():
        raise UserError(f"{path}: no such list")
    ids, paths = [], []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2:
                raise UserError(f"{path}:{number}: expected '<id> <path>', got {line.strip()!r}")
            ids.append(fields[0])
            paths.append(Path(fields[1]))
    if not ids:
        raise UserError(f"{path}: no entries")
    if len(set(ids)) != len(ids):
        raise UserError(f"{path}: ids must be unique")
    return ids, paths


def _trial_quality(enrol, test, utts, embeddings, root: Path, cohort, top_n: int) -> dict:
    """Quality inputs of each trial: durations from the audio headers, imposter means against ``cohort``."""
    from qmargin_spk.calibration import trial_quality, utterance_quality
    from qmargin_spk.data.audio import audio_info

    row = {utt: index for index, utt in enumerate(utts)}
    durations = [audio_info(root / utt).duration for utt in utts]
    per_utterance = utterance_quality(durations, embeddings, cohort, top_n)
    return trial_quality(per_utterance, [row[u] for u in enrol], [row[u] for u in test])


def _stage_embeddings(model, model_id: str, args: argparse.Namespace):
    """The embeddings ``score_trial_lists`` just computed, read back from its cache."""
    from qmargin_spk.data.trials import read_trial_lists, unique_utterances
    from qmargin_spk.scoring.embeddings import extract_embeddings

    utts = unique_utterances(read_trial_lists([str(path) for path in args.trials])).tolist()
    return extract_embeddings(
        {utt: Path(args.root) / utt for utt in utts},
        model.embed_batch,
        Path(args.out) / "embeddings" / "test.pt",
        model_id,
        batch_size=args.batch_size,
        chunk_seconds=args.chunk_seconds,
        sample_rate=model.sample_rate,
    )


def _score_file_sides(score_file: str) -> tuple[list[str], list[str]]:
    from qmargin_spk.scoring.report import read_score_file

    enrol, test, _, _ = read_score_file(score_file)
    return enrol, test


def _onnx_check(model, path: Path) -> float:
    """Cosine between onnxruntime's and PyTorch's embedding of a 2-second test signal."""
    from qmargin_spk.inference.onnx_runtime import OnnxSpeakerModel

    rng = np.random.default_rng(0)
    t = np.arange(2 * model.sample_rate) / model.sample_rate
    wav = (0.3 * np.sin(2 * np.pi * 150 * t) + 0.02 * rng.normal(size=t.size)).astype(np.float32)
    return float(OnnxSpeakerModel(path).embed([wav])[0] @ model.embed(wav)[0])


def _progress_bar(description: str):
    from tqdm import tqdm

    return tqdm(desc=description, unit="seg", file=sys.stderr, delay=1.0)


if __name__ == "__main__":
    sys.exit(main())
