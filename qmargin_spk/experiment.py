"""One experiment: its hparams file, overrides and folder, seen the same way by every stage.

The training, scoring and packaging stages all start here: the hparams are loaded once (with the
command-line overrides), the loss settings are read from the loss block's top-level keys, and the
checkpoints to evaluate are chosen and averaged in one place. Nothing here trains.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from pathlib import Path
from typing import Callable

import ruamel.yaml
import speechbrain as sb
import torch
from hyperpyyaml import load_hyperpyyaml
from speechbrain.utils.checkpoints import Checkpoint, Checkpointer, average_checkpoints

from qmargin_spk.utils.atomic import atomic_write_text

logger = logging.getLogger(__name__)

Overrides = str | dict


class StageError(ValueError):
    """A user mistake that stops a stage before it runs; the message says what to change."""


def load_hparams(hparams_file: str | Path, overrides: Overrides = "") -> dict:
    """Load a HyperPyYAML file with overrides (a YAML string or a dict)."""
    with open(hparams_file, encoding="utf-8") as handle:
        return load_hyperpyyaml(handle, overrides)


def stage_options(hparams_file: str, rest: list[str], values: dict) -> tuple[dict, dict]:
    """SpeechBrain run options and hparams overrides from ``rest``, with ``values`` set on top as data.

    ``rest`` holds SpeechBrain's own flags (``--device``, ``--ckpt_interval_steps`` ...) and the
    user's ``--key=value`` overrides, which are YAML by design. Paths never go through YAML text:
    they arrive in ``values`` (parsed by the stage's own argument parser), so spaces, ``=``, ``#``,
    ``:``, ``,``, quotes or tags in a path stay exactly what they are.
    """
    _, run_opts, yaml_text = sb.parse_arguments([hparams_file, *rest])
    overrides = dict(ruamel.yaml.YAML().load(yaml_text) or {}) if yaml_text else {}
    overrides.update(values)
    return run_opts, overrides


def stage_parser(doc: str) -> argparse.ArgumentParser:
    """The argument parser every recipe stage script starts from: the hparams file and ``--exp``."""
    parser = argparse.ArgumentParser(description=doc.strip().splitlines()[0], allow_abbrev=False)
    parser.add_argument("hparams", help="hparams YAML file of the experiment")
    parser.add_argument("--exp", required=True, help="experiment folder (the hparams' output_folder)")
    return parser


def stage_main(script: str, stage: Callable[[], object], user_errors: tuple[type[BaseException], ...]) -> int:
    """Run ``stage``; a user mistake (one of ``user_errors``) ends with one line on stderr and exit status 1."""
    try:
        stage()
    except user_errors as err:
        print(f"{script}: error: {err}", file=sys.stderr)
        return 1
    return 0


def world_size() -> int:
    """Number of training processes (1 without torch.distributed)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def last_checkpoints(checkpointer: Checkpointer, num: int) -> list[Checkpoint]:
    """The ``num`` most recent end-of-epoch checkpoints, oldest first (the ones averaged for extraction)."""
    checkpoints = checkpointer.find_checkpoints(
        ckpt_predicate=lambda ckpt: ckpt.meta.get("end-of-epoch", True), max_num_checkpoints=None
    )
    checkpoints = sorted(checkpoints, key=lambda ckpt: ckpt.meta["unixtime"])[-num:]
    if not checkpoints:
        raise FileNotFoundError(f"no end-of-epoch checkpoint in {checkpointer.checkpoints_dir}")
    return checkpoints


FINETUNE_RECORD = "finetune.json"


def record_finetune(folder: str | Path, init_from: str | Path, overrides: dict) -> None:
    """Note in a fine-tuned experiment's folder where it started and the overrides that made it one."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / FINETUNE_RECORD, json.dumps({"init_from": str(init_from), "overrides": overrides}, indent=1))


def load_averaged_embedding_model(hparams: dict, checkpointer: Checkpointer) -> list[Checkpoint]:
    """Load the average of ``checkpointer``'s last ``average_checkpoints`` checkpoints into ``hparams["embedding_model"]``.

    Returns the averaged checkpoints, oldest first. Evaluation and fine-tuning both start from this.
    """
    checkpoints = last_checkpoints(checkpointer, int(hparams.get("average_checkpoints", 1)))
    hparams["embedding_model"].load_state_dict(average_checkpoints(checkpoints, "embedding_model"))
    return checkpoints


class Experiment:
    """An experiment folder with its hparams (``output_folder`` is the folder).

    A fine-tuned experiment (``finetune.json`` in its folder) gets its fine-tuning overrides back
    whichever stage loads it, so scoring and packaging see the settings it was trained with.
    """

    def __init__(self, hparams_file: str | Path, overrides: Overrides = "") -> None:
        self.hparams_file = Path(hparams_file)
        self.finetuned_from = None
        if isinstance(overrides, dict) and "output_folder" in overrides:
            record = Path(overrides["output_folder"]) / FINETUNE_RECORD
            if record.is_file():
                saved = json.loads(record.read_text(encoding="utf-8"))
                self.finetuned_from = saved["init_from"]
                overrides = {**overrides, **saved["overrides"]}
        self.overrides = overrides
        try:
            self.hparams = load_hparams(hparams_file, overrides)
        except (TypeError, ValueError) as err:  # HyperPyYAML wraps a constructor's error: keep its words
            raise StageError(f"{hparams_file}: " + " ".join(str(arg) for arg in err.args)) from err
        self.folder = Path(self.hparams["output_folder"])

    def loss_settings(self) -> dict:
        """The loss block's settings: name, alpha (None where the loss has none), scale, margin and ramp."""
        get = self.hparams.get
        return {"loss": get("loss_name"), "alpha": get("alpha"), "scale": get("scale"), "margin": get("margin"),
                "margin_ramp": [get("margin_ramp_start"), get("margin_ramp_end")]}

    def describe(self) -> dict:
        """What identifies the experiment in results and model cards."""
        return {"name": self.folder.name, "folder": str(self.folder), "hparams_file": str(self.hparams_file),
                **self.loss_settings(), "finetuned_from": self.finetuned_from}

    def averaged_embedder(self, device: str = "cpu") -> tuple[torch.nn.Module, str]:
        """The embedder holding the average of the last ``average_checkpoints`` checkpoints, in eval mode, and its model id.

        The model id names the averaged checkpoints, so cached embeddings are reused only for the same weights.
        """
        checkpoints = load_averaged_embedding_model(self.hparams, self.hparams["checkpointer"])
        used = [ckpt.path.name for ckpt in checkpoints]
        folder = str(self.hparams["checkpointer"].checkpoints_dir)
        model_id = hashlib.sha1("|".join([folder, *used]).encode()).hexdigest()[:16]
        logger.info("embedder: average of %s (model id %s)", used, model_id)
        return self.hparams["embedder"].to(device).eval(), model_id
