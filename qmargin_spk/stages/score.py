"""Stage 3 (and 6): the experiment's averaged model embeds the trial lists; scores, metrics, plots, reports."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch

from qmargin_spk.calibration import Calibration, calibrate_run
from qmargin_spk.scoring.cohort import cohort_utterances
from qmargin_spk.scoring.pipeline import score_trial_lists
from qmargin_spk.stages.experiment import Experiment

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
    subtraction) reads the training manifest, for its cohort.
    """
    experiment = Experiment.from_record(folder, hparams_file, choices, overrides)
    hparams = experiment.hparams
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    embedder, model_id = experiment.averaged_embedder(device)

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
    )
    _report_calibrated(experiment, run)
    return run


def _report_calibrated(experiment: Experiment, run: dict) -> None:
    """With a calibration in the packaged model (``EXP/model/calibration.json``), also write calibrated results.

    A calibration fitted with quality measures needs the model's cohort: ``qmargin-spk score`` reports those.
    """
    path = experiment.model_folder / "calibration.json"
    if not path.is_file():
        return
    calibration = Calibration.load(path)
    if calibration.uses_quality:
        logger.warning(
            "%s uses quality measures: run `qmargin-spk score --model %s` for calibrated results",
            path,
            experiment.model_folder,
        )
        return
    print(calibrate_run(calibration, run, experiment.scores_folder), end="")
