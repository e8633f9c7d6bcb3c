"""Stage 4 (and 7): an experiment's averaged embedding model -> a model folder (``EXP/model``)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

from qmargin_spk.inference.package import code_version, package_model
from qmargin_spk.stages.experiment import Experiment

logger = logging.getLogger(__name__)


def package_stage(
    folder: str | Path,
    hparams_file: str | Path | None = None,
    choices: Mapping[str, str] | None = None,
    overrides: Mapping | None = None,
) -> Path:
    """Write ``EXP/model`` (``model.json``, averaged weights, SpeechBrain hparams, model card); returns it.

    ``model.json`` describes the model with the run's resolved ``frontend_description`` and
    ``backbone_description`` (the record's, so the folder rebuilds exactly the trained model) and
    names the training loss and its settings, the number of training speakers and the results of
    every scored list found in ``EXP/scores`` (cosine back-end first).
    """
    experiment = Experiment.from_record(folder, hparams_file, choices, overrides)
    hparams = experiment.hparams
    embedder, identity = experiment.averaged_embedder("cpu")
    label_file = Path(hparams["label_encoder_file"])
    speakers = json.loads(label_file.read_text(encoding="utf-8"))["speakers"] if label_file.is_file() else None
    description = experiment.describe()
    meta = {
        "loss": description["loss"],
        "loss_settings": description["loss_settings"],
        "n_training_speakers": None if speakers is None else len(speakers),
        "results": _scored_lists(experiment.scores_folder),
        "code_version": code_version(),
        "experiment": description,
    }
    out = package_model(
        experiment.model_folder,
        hparams["frontend_description"],
        hparams["backbone_description"],
        embedder.embedding_model.state_dict(),
        meta,
    )
    logger.info("packaged %s (model %s) into %s", experiment.folder, identity[:16], out)
    return out


def _scored_lists(scores: Path) -> list[dict]:
    """The result entries of the scoring stage's ``results.<backend>.json`` files, cosine first."""
    files = sorted(scores.glob("results.*.json"), key=lambda path: (path.name != "results.cosine.json", path.name))
    entries = []
    for path in files:
        if path.name.endswith(".calibrated.json"):
            continue
        entries += json.loads(path.read_text(encoding="utf-8"))["results"]
    return entries
