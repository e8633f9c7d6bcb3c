"""The packaged-model folder: write it (:func:`package_model`) and read its parts.

A model folder ``DIR/`` holds

``hyperparams.yaml``
    Inference-only HyperPyYAML: ``compute_features`` (Fbank), ``mean_var_norm``
    (per-sentence mean normalisation), ``embedding_model`` (ECAPA-TDNN), ``modules`` and a
    SpeechBrain ``pretrainer`` whose only loadable is ``embedding_model``. The pretrainer
    names no path: SpeechBrain then looks for ``<source>/embedding_model.ckpt``, so
    ``EncoderClassifier.from_hparams(source=DIR, savedir=...)`` loads the folder wherever it
    is moved, from disk only.
``embedding_model.ckpt``
    The embedding network's state dict (tensors only: loadable with ``weights_only=True``).
``model.json``
    :data:`MODEL_FORMAT`, sample rate, embedding size, the model settings, the SHA-256 of
    the checkpoint, and the caller's metadata (training loss and hyperparameters, number of
    training speakers, scored lists with their metrics, code version).
``README.md``
    A model card generated from ``model.json``.
``calibration.json`` (optional)
    Written by ``qmargin-spk calibrate`` (:mod:`qmargin_spk.calibration`); a quality-measure
    calibration also needs its cohort embeddings, ``calibration_cohort.npy``.
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
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import Mapping

import torch

from qmargin_spk.calibration import Calibration
from qmargin_spk.scoring.report import results_table
from qmargin_spk.utils.atomic import _umask

MODEL_FORMAT = 1
HPARAMS_FILE = "hyperparams.yaml"
CHECKPOINT_FILE = "embedding_model.ckpt"
MODEL_JSON = "model.json"
CARD_FILE = "README.md"
CALIBRATION_FILE = "calibration.json"
COHORT_FILE = "calibration_cohort.npy"
MODEL_SETTINGS = ("sample_rate", "n_mels", "channels", "attention_channels", "embedding_dim")
RESERVED_META = ("format", "sample_rate", "embedding_dim", "model", "checkpoint_sha256")

HPARAMS_TEMPLATE = """\
# Inference-only speaker-embedding model packaged by qmargin_spk (model folder format {format}).
# Load it with qmargin_spk.inference.SpeakerModel.from_folder(DIR) or with SpeechBrain:
#   EncoderClassifier.from_hparams(source=DIR, savedir=...).encode_batch(wavs, wav_lens)
# Input: mono waveforms at {sample_rate} Hz. The pretrainer names no path, so SpeechBrain
# reads embedding_model.ckpt from the folder given as source.

sample_rate: {sample_rate}
n_mels: {n_mels}
channels: {channels}
attention_channels: {attention_channels}
embedding_dim: {embedding_dim}

compute_features: !new:speechbrain.lobes.features.Fbank
    n_mels: !ref <n_mels>
    sample_rate: !ref <sample_rate>
mean_var_norm: !new:speechbrain.processing.features.InputNormalization
    norm_type: sentence
    std_norm: False
embedding_model: !new:speechbrain.lobes.models.ECAPA_TDNN.ECAPA_TDNN
    input_size: !ref <n_mels>
    channels: [!ref <channels>, !ref <channels>, !ref <channels>, !ref <channels>, !ref <channels> * 3]
    kernel_sizes: [5, 3, 3, 3, 1]
    dilations: [1, 2, 3, 4, 1]
    attention_channels: !ref <attention_channels>
    lin_neurons: !ref <embedding_dim>

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


def ecapa_settings(embedding_model: torch.nn.Module, sample_rate: int) -> dict:
    """The :data:`MODEL_SETTINGS` of a SpeechBrain ``ECAPA_TDNN`` built like the recipe's (read off its layers).

    The recipe's hparams files have ``n_mels``, ``channels`` and ``embedding_dim`` as keys
    but write ``attention_channels`` inside the model block; this reads all of them from
    the module itself.
    """
    return {
        "sample_rate": int(sample_rate),
        "n_mels": int(embedding_model.blocks[0].conv.conv.in_channels),
        "channels": int(embedding_model.channels[0]),
        "attention_channels": int(embedding_model.asp.conv.conv.in_channels),
        "embedding_dim": int(embedding_model.fc.conv.out_channels),
    }


def hparams_text(model_settings: Mapping[str, int]) -> str:
    """The folder's ``hyperparams.yaml`` for these settings."""
    return HPARAMS_TEMPLATE.format(format=MODEL_FORMAT, **{key: int(model_settings[key]) for key in MODEL_SETTINGS})


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
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        if described:
            return f"{version}+git.{described}"
    return version


def package_model(
    out_dir: str | os.PathLike,
    model_settings: Mapping[str, int],
    state_dict: Mapping[str, torch.Tensor],
    meta: Mapping,
    calibration: Calibration | None = None,
) -> Path:
    """Write a model folder at ``out_dir`` (replacing one there) and return its path.

    ``model_settings``: :data:`MODEL_SETTINGS` (see :func:`ecapa_settings`);
    ``state_dict``: the embedding model's weights, checked by loading them strictly into
    the model the settings describe; ``meta``: JSON-ready metadata stored in
    ``model.json``, read by the model card and by :class:`SpeakerModel` when present:
    ``loss`` (name), ``loss_hparams`` (dict), ``n_training_speakers``, ``results`` (the
    entries of the scoring stage's ``results.<backend>.json``), ``code_version``
    (:func:`code_version`), ``experiment``. A ``calibration`` is written too; without one,
    a ``calibration.json`` of the folder being replaced is kept if it was fitted for the
    same weights.

    The folder is assembled in a temporary sibling and renamed into place, so a reader
    sees the old complete folder or the new one (the old one is moved aside and deleted
    just after the rename).
    """
    settings = _validated_settings(model_settings)
    meta = dict(meta)
    clash = sorted(set(meta) & set(RESERVED_META))
    if clash:
        raise ModelFolderError(f"meta must not set {clash}: package_model writes them")
    weights = _checked_state_dict(settings, state_dict)
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir / MODEL_JSON).is_file() and any(out_dir.iterdir()):
        raise ModelFolderError(f"{out_dir} exists and is not a model folder: not replacing it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)

    buffer = io.BytesIO()
    torch.save(weights, buffer)
    checkpoint = buffer.getvalue()
    info = {
        "format": MODEL_FORMAT,
        "sample_rate": settings["sample_rate"],
        "embedding_dim": settings["embedding_dim"],
        "model": {"architecture": "ECAPA_TDNN", **settings},
        "checkpoint_sha256": hashlib.sha256(checkpoint).hexdigest(),
        **meta,
    }
    info_text = json.dumps(info, indent=2, allow_nan=False) + "\n"  # fails here on meta that is not JSON

    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        (staging / HPARAMS_FILE).write_text(hparams_text(settings), encoding="utf-8")
        (staging / CHECKPOINT_FILE).write_bytes(checkpoint)
        (staging / MODEL_JSON).write_text(info_text, encoding="utf-8")
        (staging / CARD_FILE).write_text(model_card(info), encoding="utf-8")
        if calibration is not None:
            _with_model_hash(calibration, info["checkpoint_sha256"]).save(staging / CALIBRATION_FILE)
        else:
            _keep_matching_calibration(out_dir, staging, info["checkpoint_sha256"])
        os.chmod(staging, 0o777 & ~_umask())
        _swap_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def read_model_info(folder: str | os.PathLike) -> dict:
    """``model.json`` of a model folder, checked for format and required keys."""
    folder = Path(folder)
    path = folder / MODEL_JSON
    if not folder.is_dir():
        raise ModelFolderError(f"{folder}: no such model folder")
    missing = [name for name in (HPARAMS_FILE, CHECKPOINT_FILE, MODEL_JSON) if not (folder / name).is_file()]
    if missing:
        raise ModelFolderError(f"{folder}: not a model folder, missing {missing}")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ModelFolderError(f"{path}: unreadable ({err})") from err
    if not isinstance(info, dict) or info.get("format") != MODEL_FORMAT:
        found = info.get("format") if isinstance(info, dict) else None
        raise ModelFolderError(f"{path}: model folder format {found!r}, this code reads format {MODEL_FORMAT}")
    for key in ("sample_rate", "embedding_dim", "model", "checkpoint_sha256"):
        if key not in info:
            raise ModelFolderError(f"{path}: no {key!r}")
    return info


def model_card(info: Mapping) -> str:
    """The folder's ``README.md``: what the model is, how to load it, how it scored."""
    model = info["model"]
    lines = [
        f"# Speaker-embedding model ({model['architecture']}, {info['embedding_dim']}-dim)",
        "",
        "Packaged by qmargin_spk (model folder format "
        f"{info['format']}{', code ' + str(info['code_version']) if info.get('code_version') else ''}).",
        "",
        "## Model",
        "",
        f"- Input: mono audio at {info['sample_rate']} Hz (other rates are resampled on load);"
        f" {model['n_mels']} log-Mel filterbanks, per-utterance mean normalisation.",
        f"- ECAPA-TDNN: channels {model['channels']}, attention channels {model['attention_channels']},"
        f" embedding size {model['embedding_dim']}; cosine scoring of L2-normalised embeddings.",
    ]
    if info.get("loss"):
        hparams = info.get("loss_hparams") or {}
        settings = ", ".join(f"{key} {value}" for key, value in hparams.items())
        lines.append(f"- Trained with the {info['loss']} loss{f' ({settings})' if settings else ''}.")
    if info.get("n_training_speakers"):
        lines.append(f"- Training speakers: {info['n_training_speakers']}.")
    if info.get("experiment"):
        lines.append(f"- Experiment: `{info['experiment']}`.")
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
        "`EncoderClassifier.from_hparams(source='DIR', savedir='...').encode_batch(wavs)`.",
        "",
    ]
    if info.get("results"):
        lines += ["## Results", "", results_table(info["results"]).rstrip("\n"), ""]
    return "\n".join(lines)


def _validated_settings(model_settings: Mapping[str, int]) -> dict:
    missing = [key for key in MODEL_SETTINGS if key not in model_settings]
    if missing:
        raise ModelFolderError(f"model_settings lacks {missing} (needs {list(MODEL_SETTINGS)})")
    settings = {}
    for key in MODEL_SETTINGS:
        value = model_settings[key]
        if isinstance(value, bool) or int(value) != value or int(value) < 1:
            raise ModelFolderError(f"model_settings[{key!r}] must be a positive integer, got {value!r}")
        settings[key] = int(value)
    return settings


def _checked_state_dict(settings: dict, state_dict: Mapping[str, torch.Tensor]) -> dict:
    """CPU copies of the tensors, after loading them strictly into the model the settings describe."""
    from hyperpyyaml import load_hyperpyyaml

    model = load_hyperpyyaml(hparams_text(settings))["embedding_model"]
    weights = {key: value.detach().to("cpu").clone().contiguous() for key, value in state_dict.items()}
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise ModelFolderError(f"the state dict does not fit the model settings {settings}: {err}") from err
    return weights


def _with_model_hash(calibration: Calibration, checkpoint_sha256: str) -> Calibration:
    """The calibration, recording which weights it was fitted for."""
    return replace(calibration, fit={**calibration.fit, "model_sha256": checkpoint_sha256})


def _keep_matching_calibration(old_dir: Path, staging: Path, checkpoint_sha256: str) -> None:
    """Copy the old folder's calibration (and cohort) into ``staging`` if it was fitted for these weights."""
    old = old_dir / CALIBRATION_FILE
    if not old.is_file():
        return
    with contextlib.suppress(ValueError):
        if Calibration.load(old).fit.get("model_sha256") == checkpoint_sha256:
            shutil.copy2(old, staging / CALIBRATION_FILE)
            if (old_dir / COHORT_FILE).is_file():
                shutil.copy2(old_dir / COHORT_FILE, staging / COHORT_FILE)


def _swap_into_place(staging: Path, out_dir: Path) -> None:
    """Rename ``staging`` to ``out_dir``; an existing ``out_dir`` is moved aside first, then deleted."""
    if not out_dir.exists():
        os.rename(staging, out_dir)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
    os.rename(out_dir, retired / out_dir.name)
    os.rename(staging, out_dir)
    shutil.rmtree(retired, ignore_errors=True)

