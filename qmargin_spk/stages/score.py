"""Stage 3 (and 6): the experiment's averaged model embeds the trial lists; scores, metrics, plots, reports."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from pathlib import Path

import torch

from qmargin_spk.calibration import Calibration, calibrate_run
from qmargin_spk.inference.model import SpeakerModel
from qmargin_spk.inference.package import CALIBRATION_FILE, ModelFolderError
from qmargin_spk.models.min_input import shortest_input
from qmargin_spk.models.registry import validate_frontend
from qmargin_spk.scoring.cohort import cohort_utterances
from qmargin_spk.scoring.pipeline import score_trial_lists
from qmargin_spk.stages.experiment import Experiment, StageError
from qmargin_spk.stages.numeric_hparams import SCORING_RULES, check_numeric_hparams

logger = logging.getLogger(__name__)


def score_stage(
    folder: str | Path,
    hparams_file: str | Path | None = None,
    choices: Mapping[str, str] | None = None,
    overrides: Mapping | None = None,
    device: str | None = None,
) -> dict:
    """Embed every trial utterance with the model of the experiment in ``folder`` and write scores, metrics and plots.

    The experiment is its record (``EXP/hyperparams.yaml``); ``overrides`` set the scoring keys
    (``test_root``, ``trial_files``, ``score_backend`` ...). Only the AS-norm back-end (or mean
    subtraction) reads the training manifest, for its cohort. The scoring keys are checked before
    the model is loaded, and audio shorter than the model's shortest input (probed on the averaged
    model) stops the stage before it embeds anything, naming the files.
    """
    experiment = Experiment.from_record(folder, hparams_file, choices, overrides)
    hparams = experiment.hparams
    check_numeric_hparams(hparams, SCORING_RULES)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    embedder, model_id = experiment.averaged_embedder(device)
    min_samples = shortest_input(embedder, hparams["sample_rate"])

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
        experiment.scores_folder,
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
    _report_calibrated(experiment, run)
    return run


def _frontend(hparams: Mapping) -> dict | None:
    """The front-end settings as ``model.json`` stores them, so stage 3 and ``qmargin-spk score`` share cache keys."""
    description = hparams.get("frontend_description")
    return None if description is None else validate_frontend(description)


def _report_calibrated(experiment: Experiment, run: dict) -> None:
    """With a calibration in the packaged model (``EXP/model/calibration.json``), also write calibrated results.

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
    print(calibrate_run(calibration, run, experiment.scores_folder), end="")


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
