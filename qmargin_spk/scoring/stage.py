"""The recipe's scoring stage: load the trained embedder from an experiment, embed, score, report."""
from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import torch

from qmargin_spk.calibration import Calibration, calibrate_run
from qmargin_spk.data.manifest import read_manifest
from qmargin_spk.experiment import Experiment, Overrides
from qmargin_spk.scoring.pipeline import score_trial_lists

logger = logging.getLogger(__name__)


def cohort_utterances(manifest: str | Path, per_speaker: int) -> tuple[dict[str, str], dict[str, str]]:
    """The first ``per_speaker`` training utterances (by id) of every speaker: paths and speakers."""
    by_speaker: dict[str, list] = defaultdict(list)
    for row in sorted(read_manifest(manifest), key=lambda r: r.id):
        if len(by_speaker[row.spk_id]) < per_speaker:
            by_speaker[row.spk_id].append(row)
    rows = [row for group in by_speaker.values() for row in group]
    return {row.id: row.wav for row in rows}, {row.id: row.spk_id for row in rows}


def score_stage(hparams_file: str, overrides: Overrides = "", device: str | None = None) -> dict:
    """Embed every trial utterance with the experiment's model and write scores, metrics and plots.

    Only the AS-norm back-end (or mean subtraction) reads the training manifest, for its cohort.
    """
    experiment = Experiment(hparams_file, overrides)
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
        embed, model_id, Path(hparams["test_root"]) / "wav", hparams["trial_files"],
        experiment.folder / "scores", backend=backend,
        cohort_paths=cohort_paths, cohort_speakers=cohort_speakers, top_n=hparams["asnorm_top_n"],
        subtract_mean=hparams.get("subtract_mean", None) if cohort_paths is not None else False,
        batch_size=hparams["extract_batch_size"], chunk_seconds=hparams["extract_chunk_seconds"],
        sample_rate=hparams["sample_rate"], experiment=experiment.describe(),
        bootstrap_resamples=hparams.get("bootstrap_resamples", 1000),
        max_batch_seconds=hparams.get("extract_max_batch_seconds", 300.0),
    )
    _report_calibrated(experiment.folder, run)
    return run


def _report_calibrated(folder: Path, run: dict) -> None:
    """With a calibration in the packaged model (``EXP/model/calibration.json``), also write calibrated results.

    A calibration fitted with quality measures needs the model's cohort: ``qmargin-spk score`` reports those.
    """
    path = folder / "model" / "calibration.json"
    if not path.is_file():
        return
    calibration = Calibration.load(path)
    if calibration.uses_quality:
        logger.warning("%s uses quality measures: run `qmargin-spk score --model %s` for calibrated results",
                       path, folder / "model")
        return
    print(calibrate_run(calibration, run, folder / "scores"), end="")
