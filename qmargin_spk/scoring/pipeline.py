"""Scoring stage: trial lists -> embeddings -> scores -> metrics, plots and reports."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from qmargin_spk.data.enrollment import EnrollmentMap, read_enroll_map
from qmargin_spk.data.trials import (
    TrialFiles,
    TrialList,
    check_trial_files,
    check_trial_items,
    check_trial_labels,
    read_trial_lists,
    unique_utterances,
)
from qmargin_spk.metrics import (
    DEFAULT_FARS,
    DEFAULT_P_TARGETS,
    bootstrap_metrics,
    compute_metrics,
    det_available,
    plot_det,
)
from qmargin_spk.scoring.backends import asnorm_scores, cosine_scores
from qmargin_spk.scoring.cohort import cohort_means
from qmargin_spk.scoring.embeddings import EmbedFn, extract_embeddings
from qmargin_spk.scoring.enrollment import model_speakers, model_vectors
from qmargin_spk.scoring.report import write_results, write_score_file
from qmargin_spk.scoring.test_set import TestUtterances
from qmargin_spk.utils.atomic import atomic_write_text

logger = logging.getLogger(__name__)

BACKENDS = ("cosine", "asnorm")


def score_trial_lists(
    embed_fn: EmbedFn,
    model_id: str,
    test_root: str | os.PathLike,
    trial_files: TrialFiles,
    out_dir: str | os.PathLike,
    backend: str = "cosine",
    cohort_paths: Mapping[str, str | os.PathLike] | None = None,
    cohort_speakers: Mapping[str, str] | None = None,
    top_n: int = 300,
    subtract_mean: bool | None = None,
    batch_size: int = 16,
    chunk_seconds: float | None = None,
    sample_rate: int = 16000,
    max_padding: float = 0.0,
    max_batch_seconds: float = 300.0,
    p_targets: Sequence[float] = DEFAULT_P_TARGETS,
    fars: Sequence[float] = DEFAULT_FARS,
    max_missing_listed: int = 10,
    print_table: bool = True,
    experiment: Mapping | None = None,
    bootstrap_resamples: int = 1000,
    frontend: Mapping | None = None,
    min_samples: int | None = None,
    test_set: TestUtterances | None = None,
    enroll_map: str | os.PathLike | EnrollmentMap | None = None,
) -> dict:
    """Score every trial list with one set of embeddings and write all result files to ``out_dir``.

    ``test_root`` is the VoxCeleb1 ``wav/`` folder the lists' paths are relative to.
    ``batch_size``, ``chunk_seconds``, ``max_padding`` and ``max_batch_seconds`` are the
    batching of :func:`extract_embeddings`. The lists are merged into the results files
    with those of earlier runs of the same model and settings (:func:`write_results`).
    ``cohort_paths`` (utt id -> audio) are training utterances: their speaker means
    (speaker from ``cohort_speakers``, else the first path component of the utt id,
    as in VoxCeleb ids) form the AS-norm cohort, and their mean embedding is
    subtracted from every embedding when ``subtract_mean`` (default: whenever a
    cohort is given). Embeddings are cached under ``out_dir/embeddings`` keyed on
    ``model_id``, the front-end settings ``frontend`` and each audio file's content
    fingerprint. Writes per list ``<list>.<backend>.scores`` and ``.det.png`` (if
    matplotlib is installed), and ``results.<backend>.json`` / ``.md`` (with ``experiment``,
    e.g. the loss and its settings, when given); returns the JSON content plus the ``table``.
    Audio (or a chunk of it) shorter than ``min_samples``, the model's shortest input, stops
    the run, naming the files, before its extraction embeds anything: no list is scored in part.
    Every metric gets a 95 % speaker-bootstrap interval from ``bootstrap_resamples`` resamples
    (``intervals`` of each result; 0 turns them off).

    ``test_set`` (:class:`~qmargin_spk.scoring.test_set.TestUtterances`, default: the tree
    ``test_root``) says where items find their audio and speaker: with a manifest, items are its
    ids and speakers its ``spk_id``. ``enroll_map`` (a file or :class:`EnrollmentMap`) makes an
    enrolment item that names a model stand for the average of its utterances' normalised
    embeddings (:mod:`qmargin_spk.scoring.enrollment`), with the speaker of those utterances.
    With the bootstrap on, every trial label must agree with the speakers of its items (checked
    before anything is embedded); the speaker of each item goes to ``<list>.speakers`` (``item speaker`` lines),
    which the bootstrap here and ``compare`` resample by.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}, expected one of {BACKENDS}")
    if subtract_mean is None:
        subtract_mean = cohort_paths is not None
    if cohort_paths is None and (backend == "asnorm" or subtract_mean):
        raise ValueError(f"backend {backend!r} with subtract_mean={subtract_mean} needs cohort_paths")
    out_dir = Path(out_dir)
    test_root = Path(test_root)
    test_set = test_set or TestUtterances(test_root)

    trial_lists = read_trial_lists(trial_files)
    enrollment = _enrollment(enroll_map)
    models = _models_used(trial_lists, enrollment)
    if test_set.is_tree:
        check_trial_files(trial_lists, test_set.root, max_missing_listed, models=models)
    else:
        check_trial_items(trial_lists, test_set.present, test_set.where(), max_missing_listed, models=models)
    check_trial_labels(trial_lists)
    model_utterances = _check_model_utterances(enrollment, models, test_set)
    speakers = {utt: test_set.speaker(utt) for utt in _utterances(trial_lists, models) | set(model_utterances)}
    if models:
        speakers |= model_speakers(enrollment, models, speakers.__getitem__)
    if bootstrap_resamples:  # the speakers are what the bootstrap resamples: they must agree with the labels
        for trials in trial_lists:
            _check_labels_match_speakers(trials, speakers)
    settings = dict(
        batch_size=batch_size,
        chunk_seconds=chunk_seconds,
        sample_rate=sample_rate,
        max_padding=max_padding,
        max_batch_seconds=max_batch_seconds,
    )
    extraction = dict(settings, frontend=frontend, min_samples=min_samples)
    utterances = sorted(_utterances(trial_lists, models) | set(model_utterances))
    test_paths = {utt: test_set.audio(utt) for utt in utterances}
    test_table = extract_embeddings(test_paths, embed_fn, out_dir / "embeddings" / "test.pt", model_id, **extraction)

    cohort = mean = None
    if cohort_paths is not None:
        cohort_cache = out_dir / "embeddings" / "cohort.pt"
        cohort_table = extract_embeddings(cohort_paths, embed_fn, cohort_cache, model_id, **extraction)
        cohort, mean = cohort_means(cohort_table, cohort_speakers, subtract_mean)

    vectors, row_of = test_table.vectors, dict(zip(test_table.utt_ids, range(len(test_table.utt_ids))))
    if models:
        rows = [[row_of[utt] for utt in enrollment.models[model]] for model in models]
        vectors = torch.cat([vectors.to(torch.float64), model_vectors(vectors, rows, mean)])
        row_of |= {model: len(test_table.utt_ids) + k for k, model in enumerate(models)}

    results = []
    for trials in trial_lists:
        enrol_index = np.array([row_of[item] for item in trials.enrol.tolist()], dtype=np.int64)
        test_index = np.array([row_of[item] for item in trials.test.tolist()], dtype=np.int64)
        if backend == "asnorm":
            scores = asnorm_scores(vectors, enrol_index, test_index, cohort, top_n=top_n, mean=mean)
        else:
            scores = cosine_scores(vectors, enrol_index, test_index, mean=mean)
        speaker_file = _write_speakers(out_dir / f"{trials.name}.speakers", trials, speakers)
        score_file = out_dir / f"{trials.name}.{backend}.scores"
        write_score_file(score_file, trials.enrol, trials.test, scores, trials.labels)
        metrics = compute_metrics(scores, trials.labels, p_targets=p_targets, fars=fars)
        intervals = None
        if bootstrap_resamples:
            intervals = bootstrap_metrics(
                scores,
                trials.labels,
                trials.enrol,
                trials.test,
                speakers=speakers,
                n_resamples=bootstrap_resamples,
                p_targets=p_targets,
                fars=fars,
            ).to_dict()
        det_file = None
        if det_available():
            det_file = out_dir / f"{trials.name}.{backend}.det.png"
            plot_det(scores, trials.labels, det_file, title=f"{trials.name} ({backend}, {model_id})")
        results.append(
            {
                "list": trials.name,
                "trial_file": str(trials.path),
                "backend": backend,
                "n_trials": len(trials),
                "n_utterances": int(unique_utterances([trials]).size),
                "metrics": metrics.to_dict(),
                "intervals": intervals,
                "score_file": str(score_file),
                "speaker_file": str(speaker_file),
                "det_plot": None if det_file is None else str(det_file),
            }
        )

    run = {
        "experiment": None if experiment is None else dict(experiment),
        "model_id": model_id,
        "backend": backend,
        "test_root": str(test_root),
        "settings": {
            **settings,
            "subtract_mean": subtract_mean,
            "top_n": top_n if backend == "asnorm" else None,
            "n_cohort_speakers": None if cohort is None else int(cohort.shape[0]),
            **({} if enrollment is None else {"enroll_map": str(enrollment.path)}),  # older results stay mergeable
        },
        "results": results,
    }
    merged, table = write_results(run, out_dir / f"results.{backend}.json", out_dir / f"results.{backend}.md")
    if print_table:
        print(table, end="")
    return {**merged, "table": table}


def _enrollment(enroll_map: str | os.PathLike | EnrollmentMap | None) -> EnrollmentMap | None:
    if enroll_map is None or isinstance(enroll_map, EnrollmentMap):
        return enroll_map
    return read_enroll_map(enroll_map)


def _models_used(trial_lists: Sequence[TrialList], enrollment: EnrollmentMap | None) -> list[str]:
    """The enrollment models named on the enrolment side of some trial, sorted."""
    if enrollment is None:
        return []
    enrol_items = set(np.concatenate([trials.enrol for trials in trial_lists]).tolist())
    return sorted(enrol_items & set(enrollment.models))


def _utterances(trial_lists: Sequence[TrialList], models: Sequence[str]) -> set[str]:
    """Trial items that are utterances (every item but the enrolment models)."""
    return set(unique_utterances(trial_lists).tolist()) - set(models)


def _check_model_utterances(
    enrollment: EnrollmentMap | None, models: Sequence[str], test_set: TestUtterances
) -> list[str]:
    """Every utterance of the models used, each once; ValueError at ``map:line`` for one the test set lacks."""
    if enrollment is None:
        return []
    for model in models:
        absent = [utt for utt in enrollment.models[model] if not test_set.present(utt)]
        if absent:
            raise ValueError(
                f"{enrollment.path}:{enrollment.line_numbers[model]}: {len(absent)} utterances of model {model!r} "
                f"are {test_set.where()}, e.g. {absent[0]}"
            )
    return sorted({utt for model in models for utt in enrollment.models[model]})


def _check_labels_match_speakers(trials: TrialList, speakers: Mapping[str, str]) -> None:
    """A target trial pairs one speaker with itself, a non-target one two speakers: ValueError at ``list:line``."""
    for i, (enrol, test, label) in enumerate(zip(trials.enrol.tolist(), trials.test.tolist(), trials.labels)):
        if (speakers[enrol] == speakers[test]) != bool(label):
            raise ValueError(
                f"{trials.path}:{trials.line_numbers[i]}: label {int(label)} disagrees with the speakers of "
                f"{enrol} ({speakers[enrol]}) and {test} ({speakers[test]})"
            )


def _write_speakers(path: Path, trials: TrialList, speakers: Mapping[str, str]) -> Path:
    """``item speaker`` for every item of the list, sorted: what the bootstrap of this list resamples by."""
    items = unique_utterances([trials]).tolist()
    atomic_write_text(path, "".join(f"{item} {speakers[item]}\n" for item in items))
    return path
