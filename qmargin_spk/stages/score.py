"""Stage 3 (and 6): the experiment's averaged model embeds the trial lists; scores, metrics, plots, reports."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from qmargin_spk.calibration import Calibration, calibrate_run
from qmargin_spk.data.input_fingerprint import input_fingerprint
from qmargin_spk.data.manifest import read_manifest, write_manifest
from qmargin_spk.data.prepare import (
    DONE_MARKER,
    PrepareError,
    check_disjoint_speakers,
    scan_source,
    validate_trial_lists,
)
from qmargin_spk.data.sources.detect import read_input
from qmargin_spk.data.sources.utterances import InputError
from qmargin_spk.inference.model import SpeakerModel
from qmargin_spk.inference.package import CALIBRATION_FILE, ModelFolderError
from qmargin_spk.models.min_input import shortest_input
from qmargin_spk.models.registry import validate_frontend
from qmargin_spk.scoring.cohort import cohort_utterances
from qmargin_spk.scoring.embedding_files import FORMATS as EMBEDDING_FORMATS
from qmargin_spk.scoring.embedding_files import write_embeddings
from qmargin_spk.scoring.embeddings import cached_embeddings
from qmargin_spk.scoring.pipeline import score_trial_lists
from qmargin_spk.scoring.scored_roots import ScoredRoot, TestRootError, claim_root, record_root
from qmargin_spk.scoring.test_set import prepared_test_set
from qmargin_spk.stages.experiment import Experiment, StageError
from qmargin_spk.stages.numeric_hparams import SCORING_RULES, check_numeric_hparams
from qmargin_spk.utils.atomic import atomic_write_text

logger = logging.getLogger(__name__)


def score_stage(
    folder: str | Path,
    hparams_file: str | Path | None = None,
    choices: Mapping[str, str] | None = None,
    overrides: Mapping | None = None,
    device: str | None = None,
    test_name: str | None = None,
    embedding_format: str | None = None,
) -> dict:
    """Embed every trial utterance with the model of the experiment in ``folder`` and write scores, metrics and plots.

    The experiment is its record (``EXP/hyperparams.yaml``); ``overrides`` set the scoring keys
    (``test_root``, ``trial_files``, ``score_backend`` ...). Only the AS-norm back-end (or mean
    subtraction) reads the training manifest, for its cohort. The scoring keys are checked before
    the model is loaded, and audio shorter than the model's shortest input (probed on the averaged
    model) stops the stage before it embeds anything, naming the files.

    The first test root scored writes to ``EXP/scores/``; another root (named ``test_name``, or after
    its folder) to ``EXP/scores/<test_name>/``, with its test side prepared into
    ``EXP/data/<test_name>/`` (:mod:`qmargin_spk.scoring.scored_roots`). ``embedding_format``
    (``ark``, ``npz`` or ``npy``) also writes the root's test embeddings, as cached, to
    ``embeddings/test.ark`` (+ ``.scp``), ``test.npz`` or ``test/`` in its results folder.
    """
    if embedding_format not in (None, *EMBEDDING_FORMATS):
        raise StageError(f"--embedding_format must be one of {', '.join(EMBEDDING_FORMATS)}, got {embedding_format!r}")
    experiment = Experiment.from_record(folder, hparams_file, choices, overrides)
    hparams = experiment.hparams
    check_numeric_hparams(hparams, SCORING_RULES)
    test_root = hparams.get("test_root")
    try:  # where this root's results go, refused before the model is loaded
        scored = None if not test_root else claim_root(experiment.scores_folder, test_root, test_name)
    except TestRootError as err:
        raise StageError(str(err)) from None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    embedder, model_id = experiment.averaged_embedder(device)
    if scored is None:
        raise StageError("stage 3 needs a test root (--test_root)")
    min_samples = shortest_input(embedder, hparams["sample_rate"])
    data_folder = Path(hparams["data_folder"])  # the first root's test side, prepared by stage 1
    if scored.name is not None:
        data_folder = data_folder / scored.name
        _prepare_test_side(scored, hparams, data_folder, min_samples)

    def embed(wavs: torch.Tensor, rel_lens: torch.Tensor) -> torch.Tensor:
        return embedder(wavs.to(device), rel_lens.to(device)).float().cpu()

    backend = hparams["score_backend"]
    cohort_paths = cohort_speakers = None
    if backend == "asnorm" or hparams.get("subtract_mean", False):
        cohort_paths, cohort_speakers = cohort_utterances(hparams["train_manifest"], hparams["cohort_utts_per_speaker"])
    run = score_trial_lists(
        embed,
        model_id,
        Path(hparams["test_root"]) / "wav",
        hparams["trial_files"],
        scored.folder,
        test_set=prepared_test_set(hparams["test_root"], data_folder / "test.csv"),
        enroll_map=hparams.get("enroll_map"),
        backend=backend,
        cohort_paths=cohort_paths,
        cohort_speakers=cohort_speakers,
        top_n=hparams["asnorm_top_n"],
        subtract_mean=hparams.get("subtract_mean", None) if cohort_paths is not None else False,
        batch_size=hparams["extract_batch_size"],
        chunk_seconds=hparams["extract_chunk_seconds"],
        sample_rate=hparams["sample_rate"],
        experiment=experiment.describe(),
        bootstrap_resamples=hparams.get("bootstrap_resamples", 1000),
        max_batch_seconds=hparams.get("extract_max_batch_seconds", 300.0),
        frontend=_frontend(hparams),
        min_samples=min_samples,
    )
    try:
        record_root(experiment.scores_folder, scored)
    except TestRootError as err:
        raise StageError(str(err)) from None
    if embedding_format is not None:
        _write_test_embeddings(scored.folder, embedding_format)
    _report_calibrated(experiment, run, scored.folder)
    return run


def _prepare_test_side(scored: ScoredRoot, hparams: Mapping, out: Path, min_samples: int) -> None:
    """Stage 1's test-side work for a root other than the first: read and scan it, check the lists, write
    ``out/test.csv`` and ``out/skipped.txt``; a finished preparation of unchanged inputs is not repeated.

    Usable utterances and trial lines naming unusable ones are found as stage 1 finds them for the
    first root (:mod:`qmargin_spk.data.prepare`); speakers shared with the training data are warned
    about (stage 1 refuses them); m4a files are not decoded here (stage 1 does that).
    """
    root, trial_files = Path(scored.root), [Path(os.path.abspath(path)) for path in hparams["trial_files"]]
    sample_rate = int(hparams["sample_rate"])
    try:
        source = read_input(root)
        settings = {"sample_rate": sample_rate, "test_min_samples": min_samples}
        fingerprint = input_fingerprint({root: source}, trial_files, settings)
        marker = out / DONE_MARKER
        if marker.is_file() and json.loads(marker.read_text(encoding="utf-8")).get("fingerprint") == fingerprint:
            return
        scan = scan_source(source, sample_rate, 0.0, num_workers=4, min_samples=min_samples)
        validate_trial_lists(trial_files, source, scan)
        if Path(hparams["train_manifest"]).is_file():  # shared speakers are warned about (stage 1 refuses them)
            train_speakers = {row.spk_id for row in read_manifest(hparams["train_manifest"])}
            check_disjoint_speakers(train_speakers, {row.spk_id for row in scan.rows}, allow_overlap=True)
    except (PrepareError, InputError) as err:
        raise StageError(f"test root {scored.name!r}: {err}") from None
    write_manifest(out / "test.csv", scan.rows)
    atomic_write_text(out / "skipped.txt", "".join(f"{name}\t{why}\n" for name, why in scan.skipped))
    atomic_write_text(marker, json.dumps({"fingerprint": fingerprint, "test_root": scored.root}, indent=1) + "\n")
    logger.info("test root %s prepared into %s: %d usable utterances", scored.root, out, len(scan.rows))


def _write_test_embeddings(folder: Path, form: str) -> None:
    """The root's cached test embeddings (raw, as scored) in ``form`` under ``folder/embeddings``, keyed by item."""
    table = cached_embeddings(folder / "embeddings" / "test.pt")
    name = {"ark": "test.ark", "npz": "test.npz", "npy": "test"}[form]
    written = write_embeddings(folder / "embeddings" / name, table.utt_ids, table.vectors.numpy(), form)
    logger.info("%d test embeddings written as %s to %s", len(table.utt_ids), form, written[0])


def _frontend(hparams: Mapping) -> dict | None:
    """The front-end settings as ``model.json`` stores them, so stage 3 and ``qmargin-spk score`` share cache keys."""
    description = hparams.get("frontend_description")
    return None if description is None else validate_frontend(description)


def _report_calibrated(experiment: Experiment, run: dict, folder: Path) -> None:
    """With a calibration in the packaged model (``EXP/model/calibration.json``), also write calibrated results
    (into ``folder``, the scored root's results folder).

    The calibration must have been fitted for the model just scored (:func:`_packaged_calibration`). A
    calibration fitted with quality measures needs the model's cohort: ``qmargin-spk score`` reports those.
    """
    calibration = _packaged_calibration(experiment, run["model_id"])
    if calibration is None:
        return
    if calibration.uses_quality:
        logger.warning(
            "%s uses quality measures: run `qmargin-spk score --model %s` for calibrated results",
            experiment.model_folder / CALIBRATION_FILE,
            experiment.model_folder,
        )
        return
    print(calibrate_run(calibration, run, folder), end="")


def _packaged_calibration(experiment: Experiment, model_id: str) -> Calibration | None:
    """``EXP/model/calibration.json`` when fitted for the model of ``model_id``; StageError when for another.

    A calibration that names no model (written before calibrations did) counts when the packaged folder,
    loaded and verified, holds this model and the calibration names its weights file's SHA-256.
    """
    folder = experiment.model_folder
    path = folder / CALIBRATION_FILE
    if not path.is_file():
        return None
    calibration = Calibration.load(path)
    checkpoint_sha256 = None
    if "model_identity" not in calibration.fit:
        with contextlib.suppress(ModelFolderError):
            packaged = SpeakerModel.from_folder(folder)
            if packaged.identity == model_id:
                checkpoint_sha256 = packaged.info["checkpoint_sha256"]
    if not calibration.fitted_for(model_id, checkpoint_sha256):
        raise StageError(
            f"{path} was fitted for model {calibration.fit.get('model_identity', 'none recorded')}, not this "
            f"experiment's averaged model {model_id} (raw results are written): re-run stage 4 to package this "
            f"model, then `qmargin-spk calibrate --model {folder} --scores ...`"
        )
    return calibration
