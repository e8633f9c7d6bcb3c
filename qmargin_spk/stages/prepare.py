"""Stage 1 (prepare): decode, scan and check the data; write manifests (and tar shards when asked)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from qmargin_spk.data.manifest import read_manifest
from qmargin_spk.data.prepare import prepare
from qmargin_spk.data.shards import write_shards
from qmargin_spk.data.validation_split import split_validation
from qmargin_spk.models.min_input import shortest_input
from qmargin_spk.stages.experiment import composed_hparams

logger = logging.getLogger(__name__)


def prepare_stage(
    train_roots: Sequence[str | os.PathLike],
    test_root: str | os.PathLike,
    trial_files: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    data_format: str = "files",
    min_duration: float = 0.5,
    allow_overlap: bool = False,
    num_workers: int = 4,
    utts_per_shard: int = 1000,
    seed: int = 0,
    hparams_file: str | os.PathLike | None = None,
    choices: Mapping[str, str] | None = None,
    input_format: str | None = None,
    valid_speakers: int | None = None,
    valid_trials: str | os.PathLike | None = None,
    valid_root: str | os.PathLike | None = None,
    data_seed: int = 0,
    valid_utts_per_speaker: int = 8,
) -> dict:
    """Write ``out/train.csv``, ``out/test.csv`` and the listings (``out/shards/`` too for ``data_format='shards'``).

    Re-running with unchanged inputs does nothing new (:func:`qmargin_spk.data.prepare.prepare`).
    Returns the summary printed by the recipe: counts, skipped files and, with shards, their folder.

    With the experiment (``hparams_file`` and fragment ``choices``), test files shorter than its
    model's shortest input are skipped (``skipped.txt``) and trials naming them are refused: the
    minimum is probed on the composed model with random weights (it depends on the front-end and
    the architecture, not on the weights), at the experiment's sample rate. ``input_format`` forces
    the form of the roots (Kaldi dir, manifest, tree; detected otherwise, :mod:`qmargin_spk.data.sources`).

    ``valid_speakers`` (drawn with ``data_seed``) or ``valid_trials`` (``valid_root`` for utterances
    outside the training data) make a validation list and hold its speakers out of ``train.csv``
    (and the shards): :func:`qmargin_spk.data.validation_split.split_validation`.
    """
    model_input = {}
    if hparams_file is not None:
        hparams = composed_hparams(hparams_file, choices)
        sample_rate = int(hparams["sample_rate"])
        min_samples = shortest_input(hparams["embedder"], sample_rate)
        logger.info("the model embeds inputs of at least %d samples (%g s)", min_samples, min_samples / sample_rate)
        model_input = {"sample_rate": sample_rate, "test_min_samples": min_samples}
    result = prepare(
        train_roots,
        test_root,
        trial_files,
        out,
        min_duration=min_duration,
        allow_overlap=allow_overlap,
        num_workers=num_workers,
        input_format=input_format,
        **model_input,
    )
    summary = result.to_json()
    split = split_validation(
        out,
        num_speakers=valid_speakers,
        trial_file=valid_trials,
        valid_root=valid_root,
        data_seed=data_seed,
        utts_per_speaker=valid_utts_per_speaker,
        test_trial_files=trial_files,
        test_root=test_root,
    )
    if split is not None:
        summary["validation"] = split.to_json()
    if data_format == "shards":
        folder = Path(out) / "shards"
        index = write_shards(
            read_manifest(result.train_manifest),
            folder,
            utts_per_shard=utts_per_shard,
            seed=seed,
            num_workers=num_workers,
        )
        summary["shards"] = {"folder": str(folder), "count": len(index.shards), "utterances": index.num_utterances}
    return summary
