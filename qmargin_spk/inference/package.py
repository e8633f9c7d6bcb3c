"""The packaged-model folder: write it (:func:`package_model`) and read its parts.

A model folder ``DIR/`` holds

``model.json``
    The model's one description: :data:`MODEL_FORMAT`, sample rate, embedding size, the
    ``frontend`` and ``backbone`` descriptions of the architecture registry
    (:mod:`qmargin_spk.models.registry`: a name and plain settings), the model's identity
    (SHA-256 of its loaded weights, :func:`~qmargin_spk.models.identity.model_identity`),
    the SHA-256 of the checkpoint file, and the caller's metadata (training loss and its
    settings, number of training speakers, scored lists with their metrics, code version).
    Our loader builds the model from this file alone.
``embedding_model.ckpt``
    The embedding network's state dict (tensors only: loadable with ``weights_only=True``); the
    loader checks its SHA-256 against ``checkpoint_sha256`` and its identity against ``model_identity``.
``hyperparams.yaml``
    Generated from ``model.json`` for SpeechBrain's ``EncoderClassifier.from_hparams(source=DIR,
    savedir=...)``: ``compute_features``, ``mean_var_norm``, ``embedding_model``, ``modules``
    and a ``pretrainer`` whose only loadable is ``embedding_model`` (no path: SpeechBrain reads
    ``<source>/embedding_model.ckpt``, so the folder loads wherever it is moved). qmargin_spk
    never reads it back.
``README.md``
    A model card generated from ``model.json`` and the calibration, with the cosine threshold
    SpeechBrain's ``verify_batch`` needs (:mod:`qmargin_spk.inference.decisions`).
``calibration.json`` (optional)
    Written by ``qmargin-spk calibrate`` (:mod:`qmargin_spk.calibration`), naming the model identity
    it was fitted for; a quality-measure calibration also needs its cohort embeddings,
    ``calibration_cohort.npy``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import replace
from importlib import metadata
from pathlib import Path

import torch

from qmargin_spk.calibration import Calibration
from qmargin_spk.inference.decisions import speechbrain_card
from qmargin_spk.models.identity import model_identity
from qmargin_spk.models.registry import (
    DescriptionError,
    build_backbone,
    check_compatible,
    embedding_dim,
    speechbrain_hparams,
    validate_backbone,
    validate_frontend,
)
from qmargin_spk.scoring.report import results_table
from qmargin_spk.utils.atomic import _umask, swap_folder_into_place, write_error

MODEL_FORMAT = 2
READABLE_FORMATS = (1, 2)  # format 1: ECAPA-TDNN settings under "model" (before the registry)
HPARAMS_FILE = "hyperparams.yaml"
CHECKPOINT_FILE = "embedding_model.ckpt"
MODEL_JSON = "model.json"
CARD_FILE = "README.md"
CALIBRATION_FILE = "calibration.json"
COHORT_FILE = "calibration_cohort.npy"
RESERVED_META = (
    "format",
    "sample_rate",
    "embedding_dim",
    "frontend",
    "backbone",
    "model_identity",
    "checkpoint_sha256",
)

SPEECHBRAIN_HEADER = """\
# Generated from model.json by qmargin_spk (model folder format {format}) for SpeechBrain:
#   EncoderClassifier.from_hparams(source=DIR, savedir=...).encode_batch(wavs, wav_lens)
# qmargin_spk never reads this file: it builds the model from model.json. Input: mono waveforms
# at {sample_rate} Hz. The pretrainer names no path, so SpeechBrain reads embedding_model.ckpt
# from the folder given as source.

"""
SPEECHBRAIN_FOOTER = """
modules:
    compute_features: !ref <compute_features>
    mean_var_norm: !ref <mean_var_norm>
    embedding_model: !ref <embedding_model>

pretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer
    loadables:
        embedding_model: !ref <embedding_model>
"""


class ModelFolderError(ValueError):
    """A model folder (or what is given to build one) is missing something or is inconsistent."""


def model_description(info: Mapping, path: str | os.PathLike = MODEL_JSON) -> tuple[dict, dict]:
    """``(frontend, backbone)`` registry descriptions of a ``model.json`` (format 1 converted), validated.

    An unknown architecture, front-end or setting is one :class:`ModelFolderError` naming ``path``.
    """
    if info.get("format") == 1:
        model = info["model"]
        channels = int(model["channels"])
        frontend = {
            "name": "fbank",
            "sample_rate": int(model["sample_rate"]),
            "n_mels": int(model["n_mels"]),
            "normalisation": "sentence_mean",
        }
        backbone = {
            "architecture": "ecapa_tdnn",
            "input_size": int(model["n_mels"]),
            "channels": [channels] * 4 + [3 * channels],
            "kernel_sizes": [5, 3, 3, 3, 1],
            "dilations": [1, 2, 3, 4, 1],
            "attention_channels": int(model["attention_channels"]),
            "lin_neurons": int(model["embedding_dim"]),
        }
    else:
        frontend, backbone = info["frontend"], info["backbone"]
    try:
        check_compatible(frontend, backbone)
        return validate_frontend(frontend), validate_backbone(backbone)
    except DescriptionError as err:
        raise ModelFolderError(f"{path}: {err}") from None


def hparams_text(frontend: Mapping, backbone: Mapping) -> str:
    """The folder's SpeechBrain ``hyperparams.yaml``, generated through the architecture registry."""
    sample_rate = validate_frontend(frontend)["sample_rate"]
    return (
        SPEECHBRAIN_HEADER.format(format=MODEL_FORMAT, sample_rate=sample_rate)
        + speechbrain_hparams(frontend, backbone)
        + SPEECHBRAIN_FOOTER
    )


def code_version() -> str:
    """``qmargin_spk`` version plus the git commit of the source tree when it is a checkout (``-dirty`` if edited)."""
    try:
        version = metadata.version("qmargin_spk")
    except metadata.PackageNotFoundError:
        version = "unknown"
    source = Path(__file__).resolve().parents[2]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        described = subprocess.run(
            ["git", "-C", str(source), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        if described:
            return f"{version}+git.{described}"
    return version


def package_model(
    out_dir: str | os.PathLike,
    frontend: Mapping,
    backbone: Mapping,
    state_dict: Mapping[str, torch.Tensor],
    meta: Mapping,
    calibration: Calibration | None = None,
) -> Path:
    """Write a model folder at ``out_dir`` (replacing one there) and return its path.

    ``frontend`` and ``backbone``: registry descriptions (a run's resolved ``frontend_description``
    and ``backbone_description``); ``state_dict``: the embedding model's weights, checked by
    loading them strictly into the model the descriptions build; ``meta``: JSON-ready metadata
    stored in ``model.json``, read by the model card and by :class:`SpeakerModel` when present:
    ``loss`` (name), ``loss_settings`` (dict), ``n_training_speakers``, ``results`` (the entries
    of the scoring stage's ``results.<backend>.json``), ``code_version`` (:func:`code_version`),
    ``experiment``. A ``calibration`` is written too, recording the model's identity (one that names
    another model is refused); without one, a ``calibration.json`` of the folder being replaced is
    kept if it was fitted for the same model. The card's SpeechBrain thresholds follow the calibration.

    The folder is assembled in a temporary sibling and renamed into place, so a reader
    sees the old complete folder or the new one (the old one is moved aside and deleted
    just after the rename).
    """
    try:
        check_compatible(frontend, backbone)
        frontend, backbone = validate_frontend(frontend), validate_backbone(backbone)
    except DescriptionError as err:
        raise ModelFolderError(str(err)) from None
    meta = dict(meta)
    clash = sorted(set(meta) & set(RESERVED_META))
    if clash:
        raise ModelFolderError(f"meta must not set {clash}: package_model writes them")
    weights = _checked_state_dict(backbone, state_dict)
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir / MODEL_JSON).is_file() and any(out_dir.iterdir()):
        raise ModelFolderError(f"{out_dir} exists and is not a model folder: not replacing it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)

    buffer = io.BytesIO()
    torch.save(weights, buffer)
    checkpoint = buffer.getvalue()
    info = {
        "format": MODEL_FORMAT,
        "sample_rate": frontend["sample_rate"],
        "embedding_dim": embedding_dim(backbone),
        "frontend": frontend,
        "backbone": backbone,
        "model_identity": model_identity(weights),
        "checkpoint_sha256": hashlib.sha256(checkpoint).hexdigest(),
        **meta,
    }
    info_text = json.dumps(info, indent=2, allow_nan=False) + "\n"  # fails here on meta that is not JSON

    if calibration is not None:
        calibration = _for_this_model(calibration, info["model_identity"], info["checkpoint_sha256"])

    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        (staging / HPARAMS_FILE).write_text(hparams_text(frontend, backbone), encoding="utf-8")
        (staging / CHECKPOINT_FILE).write_bytes(checkpoint)
        (staging / MODEL_JSON).write_text(info_text, encoding="utf-8")
        if calibration is not None:
            calibration.save(staging / CALIBRATION_FILE)
        else:
            calibration = _keep_matching_calibration(out_dir, staging, info)
        (staging / CARD_FILE).write_text(model_card(info, calibration), encoding="utf-8")
        os.chmod(staging, 0o777 & ~_umask())
        swap_folder_into_place(staging, out_dir)
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        failed = write_error(err, out_dir, staging)  # a full disk: one line naming the folder not written
        if failed is not None:
            raise failed from err
        raise
    return out_dir


def read_model_info(folder: str | os.PathLike) -> dict:
    """``model.json`` of a model folder, checked for format and required keys."""
    folder = Path(folder)
    path = folder / MODEL_JSON
    if not folder.is_dir():
        raise ModelFolderError(f"{folder}: no such model folder")
    missing = [name for name in (CHECKPOINT_FILE, MODEL_JSON) if not (folder / name).is_file()]
    if missing:
        raise ModelFolderError(f"{folder}: not a model folder, missing {missing}")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ModelFolderError(f"{path}: unreadable ({err})") from err
    if not isinstance(info, dict) or info.get("format") not in READABLE_FORMATS:
        found = info.get("format") if isinstance(info, dict) else None
        raise ModelFolderError(f"{path}: model folder format {found!r}, this code reads formats {READABLE_FORMATS}")
    required = ("model",) if info["format"] == 1 else ("frontend", "backbone")
    for key in ("sample_rate", "embedding_dim", "checkpoint_sha256", *required):
        if key not in info:
            raise ModelFolderError(f"{path}: no {key!r}")
    return info


def model_card(info: Mapping, calibration: Calibration | None = None) -> str:
    """The folder's ``README.md``: what the model is, how to load it, how it scored, SpeechBrain's thresholds.

    ``calibration``: the folder's (its cosine thresholds replace the stored minDCF thresholds).
    """
    frontend, backbone = model_description(info)
    architecture = backbone.pop("architecture")
    features = ", ".join(f"{key} {value}" for key, value in frontend.items() if key not in ("name", "normalisation"))
    lines = [
        f"# Speaker-embedding model ({architecture}, {info['embedding_dim']}-dim)",
        "",
        "Packaged by qmargin_spk (model folder format "
        f"{info['format']}{', code ' + str(info['code_version']) if info.get('code_version') else ''}).",
        "",
        "## Model",
        "",
        f"- Input: mono audio at {info['sample_rate']} Hz (other rates are resampled on load);"
        f" front-end {frontend['name']} ({features}), normalisation {frontend['normalisation']}.",
        f"- Backbone {architecture}: "
        + ", ".join(f"{key} {value}" for key, value in backbone.items())
        + "; cosine scoring of L2-normalised embeddings.",
    ]
    if info.get("model_identity"):
        lines.append(f"- Model identity (SHA-256 of the weights): `{info['model_identity']}`.")
    if info.get("loss"):
        settings = info.get("loss_settings") or info.get("loss_hparams") or {}
        shown = ", ".join(f"{key} {value}" for key, value in settings.items())
        lines.append(f"- Trained with the {info['loss']} loss{f' ({shown})' if shown else ''}.")
    if info.get("n_training_speakers"):
        lines.append(f"- Training speakers: {info['n_training_speakers']}.")
    experiment = info.get("experiment")
    if isinstance(experiment, Mapping):
        parts = [f"`{experiment.get('name')}`"] + [
            f"{key} {experiment[key]}" for key in ("backbone", "loss", "setting") if experiment.get(key)
        ]
        if experiment.get("finetuned_from"):
            parts.append(f"fine-tuned from `{experiment['finetuned_from']}`")
        initial = experiment.get("init_model")
        if isinstance(initial, Mapping):  # stage 2 started from a model folder (train.py --init_model)
            parts.append(
                f"started from the model folder `{initial.get('name')}` (model `{initial.get('model_identity')}`)"
            )
        lines.append("- Experiment: " + ", ".join(parts) + ".")
    if info.get("source_format"):  # qmargin-spk import (qmargin_spk.inference.importers)
        lines.append(
            f"- Imported from the {info['source_format']} folder `{info.get('source')}` (weights SHA-256"
            f" `{info.get('source_sha256')}`){'; licence: ' + str(info['license']) if info.get('license') else ''}."
        )
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from qmargin_spk.inference import SpeakerModel",
        "model = SpeakerModel.from_folder('DIR')",
        "print(model.verify('a.wav', 'b.wav', p_target=0.01))",
        "```",
        "",
        "or `qmargin-spk verify --model DIR a.wav b.wav`, or with SpeechBrain alone:",
        "`EncoderClassifier.from_hparams(source='DIR', savedir='...').encode_batch(wavs)`",
        "(SpeechBrain evaluates the folder's `hyperparams.yaml`: load folders only from sources you trust).",
        "",
    ]
    if info.get("results"):
        lines += ["## Results", "", results_table(info["results"]).rstrip("\n"), ""]
    lines += speechbrain_card(info, calibration)
    return "\n".join(lines)


def _checked_state_dict(backbone: Mapping, state_dict: Mapping[str, torch.Tensor]) -> dict:
    """CPU copies of the tensors, after loading them strictly into the model the description builds."""
    model = build_backbone(backbone)
    weights = {key: value.detach().to("cpu").clone().contiguous() for key, value in state_dict.items()}
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise ModelFolderError(f"the state dict does not fit the backbone {dict(backbone)}: {err}") from err
    return weights


def _for_this_model(calibration: Calibration, identity: str, checkpoint_sha256: str) -> Calibration:
    """The calibration, recording the model it was fitted for (ModelFolderError when it names another one)."""
    fitted = calibration.fit.get("model_identity")
    if fitted is not None and fitted != identity:
        raise ModelFolderError(f"the calibration was fitted for model {fitted}, not the packaged one ({identity})")
    return replace(calibration, fit={**calibration.fit, "model_identity": identity, "model_sha256": checkpoint_sha256})


def _keep_matching_calibration(old_dir: Path, staging: Path, info: Mapping) -> Calibration | None:
    """Copy the old folder's calibration (and cohort) into ``staging`` if it was fitted for ``info``'s model."""
    old = old_dir / CALIBRATION_FILE
    if not old.is_file():
        return None
    with contextlib.suppress(ValueError):
        calibration = Calibration.load(old)
        if calibration.fitted_for(info["model_identity"], info["checkpoint_sha256"]):
            shutil.copy2(old, staging / CALIBRATION_FILE)
            if (old_dir / COHORT_FILE).is_file():
                shutil.copy2(old_dir / COHORT_FILE, staging / COHORT_FILE)
            return calibration
    return None
