"""Stage 4 (and 7): an experiment's averaged embedding model -> a model folder (``EXP/model``)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

from qmargin_spk.inference.package import code_version, package_model
from qmargin_spk.models.min_input import shortest_input
from qmargin_spk.scoring.scored_roots import ScoredRoot, scored_roots
from qmargin_spk.stages.experiment import Experiment, StageError

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
    names the training loss and its settings, the number of training speakers, the results of
    every scored list of every test root (``EXP/scores``, cosine back-end first, then each
    ``EXP/scores/<test_name>/``), and ``min_samples``, the shortest input the model embeds (probed;
    every way of embedding with the folder checks it).
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
        "results": _scored_lists(experiment.scores_folder, identity),
        "code_version": code_version(),
        "experiment": description,
        "min_samples": shortest_input(embedder, hparams["sample_rate"]),
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


def _scored_lists(scores: Path, identity: str) -> list[dict]:
    """The result entries of the scoring stage's ``results.<backend>.json`` files, each naming the model: the first
    test root's first (cosine first), then every other root's, whose lists are labelled ``<list>@<test_name>``.

    Every file must hold results of the model being packaged (its ``model_id`` is ``identity``): the
    thresholds ``verify`` and the model card take from them are only valid for those weights.
    """
    entries = []
    for scored in scored_roots(scores) or [ScoredRoot(None, "", scores)]:
        files = sorted(
            scored.folder.glob("results.*.json"), key=lambda path: (path.name != "results.cosine.json", path.name)
        )
        for path in files:
            if path.name.endswith(".calibrated.json"):
                continue
            run = json.loads(path.read_text(encoding="utf-8"))
            if run.get("model_id") != identity:
                raise StageError(
                    f"{path} holds results of model {run.get('model_id')}, not of the averaged model {identity}: "
                    "re-run stage 3 (score) before packaging"
                )
            named = {} if scored.name is None else {"test_name": scored.name}
            entries += [
                {**entry, "list": scored.list_label(entry["list"]), **named, "model_id": identity}
                for entry in run["results"]
            ]
    return entries
