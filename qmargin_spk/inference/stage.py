"""The recipe's packaging stage: an experiment's averaged embedding model -> a model folder (``EXP/model``)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from qmargin_spk.experiment import Experiment, Overrides, StageError
from qmargin_spk.inference.package import code_version, ecapa_settings, package_model

logger = logging.getLogger(__name__)


def package_stage(hparams_file: str, overrides: Overrides = "") -> Path:
    """Write ``EXP/model`` (inference hparams, averaged weights, ``model.json``, model card); returns it.

    ``model.json`` names the training loss and its settings, the number of training speakers and the
    results of every scored list found in ``EXP/scores`` (cosine back-end first).
    """
    experiment = Experiment(hparams_file, overrides)
    hparams = experiment.hparams
    try:
        embedder, model_id = experiment.averaged_embedder("cpu")
    except FileNotFoundError as err:
        raise StageError(f"{experiment.folder}: nothing to package ({err}); train it first (stage 2)") from err
    label_file = Path(hparams["label_encoder_file"])
    speakers = json.loads(label_file.read_text(encoding="utf-8"))["speakers"] if label_file.is_file() else None
    meta = {
        "loss": hparams["loss_name"],
        "loss_hparams": {key: value for key, value in experiment.loss_settings().items() if key != "loss"},
        "n_training_speakers": None if speakers is None else len(speakers),
        "results": _scored_lists(experiment.folder / "scores"),
        "code_version": code_version(),
        "experiment": {**experiment.describe(), "model_id": model_id},
    }
    out = package_model(experiment.folder / "model", ecapa_settings(embedder.embedding_model, hparams["sample_rate"]),
                        embedder.embedding_model.state_dict(), meta)
    logger.info("packaged %s (%s) into %s", experiment.folder, model_id, out)
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
