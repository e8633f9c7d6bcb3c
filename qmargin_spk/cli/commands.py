"""What each ``qmargin-spk`` command does (the parser and ``main`` are in :mod:`qmargin_spk.cli`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np


class UserError(Exception):
    """A problem with what the user asked for; reported as one line, without a traceback."""


def run_embed(args: argparse.Namespace) -> None:
    from qmargin_spk.scoring.embedding_files import check_output, write_embeddings

    if (args.list is None) == (not args.files):
        raise UserError("give either audio files or --list wav.scp (not both)")
    if args.list is not None:
        ids, paths = _read_wav_scp(args.list)
    else:
        ids, paths = [str(path) for path in args.files], list(args.files)
    form = check_output(args.out, ids)  # a refused output (unknown extension, ids it cannot hold) costs no embedding
    model = _load_model(args)
    embeddings = model.embed(paths, batch_size=args.batch_size, chunk_seconds=args.chunk_seconds, progress=True)
    written = write_embeddings(args.out, ids, embeddings)
    where = f"{written[0]} and {written[1]}" if form == "ark" else args.out
    print(f"{len(ids)} embeddings of size {embeddings.shape[1]} written to {where}")


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
            frontend=_frontend(model),
            min_samples=model.min_samples,
            enroll_map=getattr(args, "enroll_map", None),
            test_set=_test_set(args.root),
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
    from qmargin_spk.inference.package import CALIBRATION_FILE, CARD_FILE, COHORT_FILE, model_card
    from qmargin_spk.scoring.report import read_score_file
    from qmargin_spk.utils.atomic import atomic_open, atomic_write_text

    if args.quality and (args.root is None or args.cohort is None):
        raise UserError("--quality needs --root (where the scored utterances are) and --cohort (a wav.scp)")
    if args.top_n < 2:
        raise UserError(f"--top_n must be at least 2, got {args.top_n}")
    enrol, test, scores, labels = read_score_file(args.scores)
    model = _load_model(args, calibrated=False)  # the folder's calibration, if any, is being replaced
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
        "model_identity": model.identity,  # of the loaded weights: the model this calibration belongs to
        "model_sha256": model.info["checkpoint_sha256"],
    }
    calibration = replace(calibration, fit=fit)
    if cohort is not None:
        with atomic_open(args.model / COHORT_FILE, "wb") as handle:
            np.save(handle, cohort)
    calibration.save(args.model / CALIBRATION_FILE)
    atomic_write_text(args.model / CARD_FILE, model_card(model.info, calibration))  # its SpeechBrain thresholds
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


def run_import(args: argparse.Namespace) -> None:
    from qmargin_spk.inference.importers import import_published

    result = import_published(args.source_format, args.source, args.out)
    for note in result.notes:
        print(f"note: {note}")
    print(f"{args.source_format} model from {args.source} written to {result.folder}")
    print(f"source sha256: {result.source_sha256}")


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


def run_study(args: argparse.Namespace) -> None:
    """Run (or resume) the study of ``args.spec`` in ``args.out`` and write its report (docs/studies.md)."""
    from qmargin_spk.studies import run_and_report

    run_and_report(args.spec, args.out, jobs=args.jobs, n_resamples=args.n_resamples)


def _load_model(args: argparse.Namespace, calibrated: bool = True):
    from qmargin_spk.inference import SpeakerModel

    return SpeakerModel.from_folder(args.model, device=args.device, calibrated=calibrated)


def _test_set(root: Path):
    """Where trial items find their audio: files under ``root`` for an audio tree (as before), the
    utterances of a Kaldi data dir or CSV/JSONL manifest (items are their ids, speakers theirs)."""
    from qmargin_spk.data.sources.detect import detect_format, read_input
    from qmargin_spk.data.sources.utterances import InputError
    from qmargin_spk.scoring.test_set import TestUtterances

    try:
        if detect_format(root) == "tree":
            return TestUtterances(root)
        source = read_input(root)
    except InputError as err:
        raise UserError(str(err)) from None
    audio = {u.id: u.address for u in source.utterances}
    return TestUtterances(root, audio, {u.id: u.spk for u in source.utterances}, source=root)


def _read_wav_scp(path: Path) -> tuple[list[str], list[str]]:
    """``(ids, audio)`` of a Kaldi wav.scp: files, ``cmd |`` pipes and ``file.ark:offset`` entries (docs/data.md)."""
    from qmargin_spk.data.sources.address import format_address
    from qmargin_spk.data.sources.kaldi_dir import read_wav_scp
    from qmargin_spk.data.sources.utterances import InputError

    if not path.is_file():
        raise UserError(f"{path}: no such list")
    try:
        entries = read_wav_scp(path)
    except InputError as err:
        raise UserError(str(err)) from None
    if not entries:
        raise UserError(f"{path}: no entries")
    return list(entries), [format_address(entry) for _, entry in entries.values()]


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
        frontend=_frontend(model),
    )


def _frontend(model) -> dict:
    """The model's front-end settings, which key the embedding cache with its identity (as in stage 3)."""
    from qmargin_spk.inference.package import model_description

    return model_description(model.info)[0]


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
