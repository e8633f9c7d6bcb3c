"""A run's folder across restarts: the fingerprint of its training data, the epochs it holds, starting afresh.

Stage 2 notes the SHA-256 of the training manifest in ``EXP/train_data.json`` when training starts
(beside the record, ``EXP/hyperparams.yaml``); a resume compares the manifest's hash with it, so
training data changed in place (stage 1 run again over other audio) is refused like a changed
key. ``--start_afresh`` moves the run's outputs (:data:`RUN_OUTPUTS`) into ``EXP/previous-<UTC
time>/`` instead of deleting them.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from pathlib import Path

from speechbrain.utils.checkpoints import Checkpointer

from qmargin_spk.utils.atomic import atomic_write_text
from qmargin_spk.utils.hashing import file_sha256

logger = logging.getLogger(__name__)

TRAIN_DATA_FILE = "train_data.json"
# What a training run writes in its folder (the manifests in data/ are stage 1's, and stay).
RUN_OUTPUTS = (
    "save",
    "hyperparams.yaml",
    TRAIN_DATA_FILE,
    "train_log.txt",
    "valid_curve.csv",  # this and the next: the learning curve (training/learning_curves.py)
    "valid_curve.png",
    "finetune.json",
    "init_model.json",  # this and the next: a run started from a model folder (stages/init_model.py)
    "init_class_means.pt",
    "scores",
    "model",
)
PREVIOUS_PREFIX = "previous-"


def record_training_data(folder: str | os.PathLike, manifest: str | os.PathLike) -> None:
    """Write ``EXP/train_data.json``: the training manifest and its SHA-256 (atomically)."""
    text = json.dumps({"train_manifest": str(manifest), "sha256": file_sha256(manifest)}, indent=1) + "\n"
    atomic_write_text(Path(folder) / TRAIN_DATA_FILE, text)


def training_data_change(folder: str | os.PathLike, manifest: str | os.PathLike) -> str | None:
    """How the training manifest differs from the one noted when the run started, or None.

    None as well when nothing was noted (a run older than the note) or the manifest is missing
    (the training stage then names it).
    """
    noted_path = Path(folder) / TRAIN_DATA_FILE
    if not noted_path.is_file() or not Path(manifest).is_file():
        return None
    try:
        noted = json.loads(noted_path.read_text(encoding="utf-8"))["sha256"]
    except (ValueError, KeyError, TypeError):
        return f"{noted_path}: unreadable, cannot tell whether the training data changed"
    current = file_sha256(manifest)
    if current == noted:
        return None
    return f"training data: {manifest} had SHA-256 {noted[:12]}... when training started, {current[:12]}... now"


def epochs_trained(checkpointer: Checkpointer) -> int:
    """The epoch of the newest end-of-epoch checkpoint (0 without one)."""
    checkpoints = checkpointer.find_checkpoints(
        ckpt_predicate=lambda ckpt: ckpt.meta.get("end-of-epoch", True), max_num_checkpoints=None
    )
    return max((int(ckpt.meta.get("epoch", 0)) for ckpt in checkpoints), default=0)


def set_aside(folder: str | os.PathLike) -> Path | None:
    """Move the run's outputs in ``folder`` into a new ``previous-<UTC time>/`` there; None when there were none."""
    folder = Path(folder)
    present = [name for name in RUN_OUTPUTS if (folder / name).exists()]
    if not present:
        return None
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    for attempt in range(1, 1000):
        aside = folder / f"{PREVIOUS_PREFIX}{stamp}{'' if attempt == 1 else f'-{attempt}'}"
        try:
            aside.mkdir()
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"{folder}: cannot name a folder for the previous run")
    for name in present:
        os.replace(folder / name, aside / name)
    logger.warning("starting afresh: moved the previous run's %s to %s", ", ".join(present), aside)
    return aside
