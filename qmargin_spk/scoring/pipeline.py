"""Scoring stage: trial lists -> embeddings -> scores -> metrics, plots and reports."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from qmargin_spk.data.trials import (
    TrialFiles,
    check_trial_files,
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
from qmargin_spk.scoring.backends import asnorm_scores, cosine_scores, speaker_means
from qmargin_spk.scoring.embeddings import EmbeddingTable, EmbedFn, extract_embeddings
from qmargin_spk.scoring.report import write_results, write_score_file

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
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}, expected one of {BACKENDS}")
    if subtract_mean is None:
        subtract_mean = cohort_paths is not None
    if cohort_paths is None and (backend == "asnorm" or subtract_mean):
        raise ValueError(f"backend {backend!r} with subtract_mean={subtract_mean} needs cohort_paths")
    out_dir = Path(out_dir)
    test_root = Path(test_root)

    trial_lists = read_trial_lists(trial_files)
    check_trial_files(trial_lists, test_root, max_missing_listed)
    check_trial_labels(trial_lists)
    settings = dict(
        batch_size=batch_size,
        chunk_seconds=chunk_seconds,
        sample_rate=sample_rate,
        max_padding=max_padding,
        max_batch_seconds=max_batch_seconds,
    )
    extraction = dict(settings, frontend=frontend, min_samples=min_samples)
    test_paths = {utt: test_root / utt for utt in unique_utterances(trial_lists).tolist()}
    test_table = extract_embeddings(test_paths, embed_fn, out_dir / "embeddings" / "test.pt", model_id, **extraction)

    cohort = mean = None
    if cohort_paths is not None:
        cohort_cache = out_dir / "embeddings" / "cohort.pt"
        cohort_table = extract_embeddings(cohort_paths, embed_fn, cohort_cache, model_id, **extraction)
        cohort, mean = _cohort(cohort_table, cohort_speakers, subtract_mean)

    results = []
    for trials in trial_lists:
        enrol_index = test_table.indices(trials.enrol)
        test_index = test_table.indices(trials.test)
        if backend == "asnorm":
            scores = asnorm_scores(test_table.vectors, enrol_index, test_index, cohort, top_n=top_n, mean=mean)
        else:
            scores = cosine_scores(test_table.vectors, enrol_index, test_index, mean=mean)
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
        },
        "results": results,
    }
    merged, table = write_results(run, out_dir / f"results.{backend}.json", out_dir / f"results.{backend}.md")
    if print_table:
        print(table, end="")
    return {**merged, "table": table}


def _cohort(
    table: EmbeddingTable, speakers: Mapping[str, str] | None, subtract_mean: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-speaker mean embeddings of the cohort and, if asked, the mean cohort embedding."""
    if speakers is None:
        labels = [utt.split("/")[0] for utt in table.utt_ids]
    else:
        absent = [utt for utt in table.utt_ids if utt not in speakers]
        if absent:
            raise KeyError(f"{len(absent)} cohort utterances have no speaker in cohort_speakers, e.g. {absent[:5]}")
        labels = [speakers[utt] for utt in table.utt_ids]
    means, _ = speaker_means(table.vectors, labels)
    return means, table.vectors.mean(dim=0) if subtract_mean else None
