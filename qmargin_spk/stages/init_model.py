"""Stage 2 from a model folder (``train.py --init_model DIR``): check it fits the run, load it, start the head.

The folder is loaded by :meth:`SpeakerModel.from_folder` (hashes checked, no YAML evaluated). Its
backbone must be the run's ``backbone_description`` (same architecture and settings, so the state
dicts have the same shapes) and its front-end the run's ``frontend_description``, each compared once
the registry has checked it and its class's defaults fill the settings one side leaves out;
otherwise one :class:`StageError` names each differing setting with both values.

A model folder holds no classifier, so the head starts as hparams ``init_head`` says: ``fresh``
(random prototypes) or ``class_means``: each training speaker's L2-normalised mean of the
normalised embeddings of its utterances, from one pass over the training manifest without
augmentation. Whole utterances are embedded (chunked beyond ``extract_chunk_seconds``, batched
as the scoring stage batches), so a prototype starts where the speaker's test-time embeddings
lie. Speed-perturbed classes start from their speaker's unperturbed mean: the pass reads each
file once, and the margin separates the copies within the first steps. A sub-center head starts
the K prototypes of a class at its mean. The means are saved in ``EXP/init_class_means.pt`` and
the pass runs only while the run has no checkpoint.

``EXP/init_model.json`` records the folder and its model identity, so later stages and the model
card can say where the run started; resuming with another ``--init_model`` is refused.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from speechbrain.utils.distributed import run_on_main

from qmargin_spk.data.dataset import SpeakerLabelEncoder
from qmargin_spk.data.manifest import ManifestRow
from qmargin_spk.inference.model import SpeakerModel
from qmargin_spk.inference.package import ModelFolderError, model_description, read_model_info
from qmargin_spk.models.registry import (
    ARCHITECTURES,
    FEATURES,
    Component,
    DescriptionError,
    validate_backbone,
    validate_frontend,
)
from qmargin_spk.stages.experiment import INIT_MODEL_FILE, StageError, recorded_init_model
from qmargin_spk.utils.atomic import atomic_torch_save, atomic_write_text

logger = logging.getLogger(__name__)

CLASS_MEANS_FILE = "init_class_means.pt"
INIT_HEADS = ("fresh", "class_means")
_BLOCK = 2048  # utterances embedded per block of the class-mean pass


@dataclass(frozen=True)
class InitModel:
    """The ``--init_model`` folder of a run, and the model loaded from it (None when the run resumes)."""

    folder: Path
    model: SpeakerModel | None


def prepare_init_model(
    exp_folder: str | Path, init_model: str | Path | None, hparams: Mapping, device: str, has_checkpoints: bool
) -> InitModel | None:
    """Check ``--init_model`` before anything is written: the run's record, ``init_head``, the folder's fit."""
    if init_model is None:
        return None
    refuse_other_init_model(exp_folder, init_model, has_checkpoints)
    init_head_choice(hparams)
    model = None if has_checkpoints else load_init_model(init_model, hparams, device)
    return InitModel(Path(init_model), model)


def initialise_from_model(
    exp_folder: str | Path,
    hparams: Mapping,
    head: torch.nn.Module,
    model: SpeakerModel,
    rows: Sequence[ManifestRow],
    labels: SpeakerLabelEncoder,
) -> None:
    """Load the folder's weights into ``embedding_model`` and start the head as ``init_head`` says."""
    hparams["embedding_model"].load_state_dict(model.embedder.embedding_model.state_dict())
    choice = init_head_choice(hparams)
    if choice == "class_means":
        run_on_main(saved_class_means, args=[exp_folder, model, rows, labels, hparams])
        means = saved_class_means(exp_folder, model, rows, labels, hparams)  # every rank reads the saved means
        weight = head_weight(means, head.num_classes)
        weight = weight.repeat_interleave(getattr(head, "prototypes_per_class", 1), dim=0)  # sub-centers: K per class
        head.load_full_weight(weight.to(next(head.parameters()).device))
    logger.info("initialised from the model folder %s (model %s; head: %s)", model.folder, model.identity[:16], choice)


def model_folder_identity(folder: str | Path) -> dict:
    """What names a model folder in a run: its resolved path, model identity and checkpoint SHA-256."""
    folder = Path(folder).resolve()
    try:
        info = read_model_info(folder)
    except ModelFolderError as err:
        raise StageError(f"--init_model: {err}") from None
    return {
        "folder": str(folder),
        "model_identity": info.get("model_identity"),
        "checkpoint_sha256": info.get("checkpoint_sha256"),
    }


def refuse_other_init_model(exp_folder: str | Path, init_model: str | Path | None, has_checkpoints: bool) -> None:
    """A run that trained may resume only from the model folder it started from (or with no ``--init_model``)."""
    if init_model is None or not has_checkpoints:
        return
    recorded = recorded_init_model(exp_folder)
    given = model_folder_identity(init_model)
    if recorded is None:
        raise StageError(
            f"{exp_folder} holds a run that did not start from a model folder; --init_model {given['folder']} "
            "cannot change how it started: drop --init_model to resume, or pass --start_afresh"
        )
    if _names_of(recorded) != _names_of(given):
        raise StageError(
            f"{exp_folder} started from {recorded['folder']} (model {_names_of(recorded)}), not --init_model "
            f"{given['folder']} (model {_names_of(given)}): drop --init_model to resume, or pass --start_afresh"
        )


def record_init_model(exp_folder: str | Path, init_model: str | Path, init_head: str) -> None:
    """Write ``EXP/init_model.json`` (atomically)."""
    record = {**model_folder_identity(init_model), "init_head": init_head}
    atomic_write_text(Path(exp_folder) / INIT_MODEL_FILE, json.dumps(record, indent=1) + "\n")


def load_init_model(init_model: str | Path, hparams: Mapping, device: str = "cpu") -> SpeakerModel:
    """The model folder, loaded and checked against the run's front-end and backbone (:class:`StageError` if not)."""
    folder = Path(init_model)
    try:
        model = SpeakerModel.from_folder(folder, device=device, calibrated=False)
        frontend, backbone = model_description(model.info, folder / "model.json")
        run_frontend = validate_frontend(hparams["frontend_description"])
        run_backbone = validate_backbone(hparams["backbone_description"])
    except (ModelFolderError, DescriptionError) as err:
        raise StageError(f"--init_model: {err}") from None
    frontend, run_frontend = (_with_defaults(FEATURES.get(f["name"]), f) for f in (frontend, run_frontend))
    _refuse_difference("front-end", folder, frontend, run_frontend, "frontend_description")
    backbone, run_backbone = (_with_defaults(ARCHITECTURES[b["architecture"]], b) for b in (backbone, run_backbone))
    _refuse_difference("backbone", folder, backbone, run_backbone, "backbone_description")
    return model


def init_head_choice(hparams: Mapping) -> str:
    """hparams ``init_head`` (default ``class_means``), checked."""
    choice = hparams.get("init_head", "class_means")
    if choice not in INIT_HEADS:
        raise StageError(f"hparams key 'init_head' must be one of {list(INIT_HEADS)}, got {choice!r}")
    return choice


def class_means(
    model: SpeakerModel,
    rows: Sequence[ManifestRow],
    labels: SpeakerLabelEncoder,
    batch_size: int = 16,
    chunk_seconds: float | None = None,
    max_batch_seconds: float | None = None,
) -> torch.Tensor:
    """``[S, D]`` float32: per speaker (label order), the L2-normalised mean of its utterances' normalised embeddings.

    Sums accumulate block by block (float64), so memory holds one block's embeddings.
    """
    sums = np.zeros((len(labels), model.embedding_dim), dtype=np.float64)
    for start in range(0, len(rows), _BLOCK):
        block = rows[start : start + _BLOCK]
        embeddings = model.embed(
            [row.wav for row in block],
            batch_size=batch_size,
            chunk_seconds=chunk_seconds,
            max_batch_seconds=max_batch_seconds,
        ).astype(np.float64)
        np.add.at(sums, [labels.encode(row.spk_id) for row in block], embeddings)
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    empty = np.flatnonzero(norms[:, 0] == 0)
    if empty.size:
        raise StageError(f"speaker {labels.decode(int(empty[0]))} has no training utterance to average")
    return torch.from_numpy(sums / norms).float()


def saved_class_means(
    exp_folder: str | Path,
    model: SpeakerModel,
    rows: Sequence[ManifestRow],
    labels: SpeakerLabelEncoder,
    hparams: Mapping,
) -> torch.Tensor:
    """The class means of ``EXP/init_class_means.pt`` when they are this model's, else computed and saved there."""
    path = Path(exp_folder) / CLASS_MEANS_FILE
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("model_identity") == model.identity and saved["means"].shape[0] == len(labels):
            return saved["means"]
    logger.info("class-mean pass: embedding %d training utterances with %s", len(rows), model.folder)
    means = class_means(
        model,
        rows,
        labels,
        batch_size=int(hparams.get("extract_batch_size", 16)),
        chunk_seconds=hparams.get("extract_chunk_seconds"),
        max_batch_seconds=hparams.get("extract_max_batch_seconds"),
    )
    atomic_torch_save({"model_identity": model.identity, "means": means}, path)
    return means


def head_weight(means: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[C, D]`` prototypes: the speakers' means, repeated for each block of speed-perturbed classes after them."""
    speakers = means.shape[0]
    if num_classes % speakers:
        raise StageError(f"{num_classes} classes are not whole blocks of the {speakers} training speakers")
    return means.repeat(num_classes // speakers, 1)


def _names_of(record: Mapping) -> str:
    return str(record.get("model_identity") or record.get("checkpoint_sha256"))


def _with_defaults(component: Component | None, description: Mapping) -> dict:
    """A validated description with its class's constructor defaults for the settings it leaves out."""
    settings = dict(description)
    if component is None:
        return settings
    for name, parameter in inspect.signature(component.cls()).parameters.items():
        if name in component.settings and name not in settings and parameter.default is not inspect.Parameter.empty:
            value = parameter.default
            settings[name] = list(value) if isinstance(value, tuple) else value
    return settings


def _refuse_difference(what: str, folder: Path, theirs: Mapping, mine: Mapping, key: str) -> None:
    """One :class:`StageError` naming each setting on which the folder's description differs from the run's."""
    differing = [name for name in dict.fromkeys([*theirs, *mine]) if theirs.get(name) != mine.get(name)]
    if differing:
        shown = "; ".join(
            f"{name}: {theirs.get(name)!r} in the folder, {mine.get(name)!r} in this run" for name in differing
        )
        raise StageError(
            f"--init_model {folder}: its {what} differs from this run's {key} ({shown}): pick the fragment "
            "and settings the model was trained with"
        )
