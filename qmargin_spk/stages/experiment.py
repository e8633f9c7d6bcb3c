"""An experiment folder and its record: the only code that knows the folder's layout.

``EXP/hyperparams.yaml`` is the run's record: the composed experiment with its overrides, written
by the training stage when training starts (one HyperPyYAML file that loads alone, so
``train.py EXP/hyperparams.yaml --exp EXP`` repeats the run). Every later stage (score, package,
fine-tune) reads the record, so the choices made at training hold for all of them: a fragment
flag, experiment file or override given to a later stage that disagrees with the record on a key
that shapes the trained model is refused, naming both values; other keys (scoring back-end,
cohort, test root and lists, the fine-tuning ``lm_*`` keys) may be set there.

Training again in a folder that holds checkpoints resumes that run: it is refused on the shaping
keys, the per-process ``batch_size``, training data whose manifest changed since the run started
(``EXP/train_data.json``, :mod:`qmargin_spk.stages.resume`) and a ``number_of_epochs`` below the
epochs already trained, unless the run starts afresh.

``EXP/data/`` manifests (stage 1), ``EXP/save/`` checkpoints (stage 2), ``EXP/scores/`` results
(stage 3), ``EXP/model/`` the packaged model (stage 4).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from hyperpyyaml import load_hyperpyyaml
from speechbrain.utils.checkpoints import Checkpoint, Checkpointer, average_checkpoints

from qmargin_spk.models.identity import model_identity
from qmargin_spk.stages.compose import KINDS, RECORD_KEY, Composition, CompositionError, compose, load_tree
from qmargin_spk.stages.resume import epochs_trained, record_training_data, training_data_change
from qmargin_spk.training.validation import best_valid_checkpoints
from qmargin_spk.utils.atomic import atomic_write_text

logger = logging.getLogger(__name__)

RECORD_FILE = "hyperparams.yaml"
FINETUNE_RECORD = "finetune.json"
INIT_MODEL_FILE = "init_model.json"  # the model folder a run started from (qmargin_spk.stages.init_model)
# Keys outside the backbone and loss fragments that also shape the trained model: front-end,
# features and training data. The fine-tuning stage's lm_* keys never do.
SHAPING_KEYS = (
    "sample_rate",
    "n_mels",
    "frontend_description",
    "train_manifest",
    "data_folder",
    "speed_factors",
    "speed_as_new_class",
)
# Keys that do not shape the model but that a resumed run must keep: the per-process batch size.
RESUME_KEYS = ("batch_size",)
AFRESH = "pass --start_afresh to move this run aside (into EXP/previous-<time>/) and train anew"
_ABSENT = object()


class StageError(ValueError):
    """A user mistake that stops a stage before it runs; the message says what to change."""


class Experiment:
    """An experiment folder with its composed hparams (``output_folder`` is the folder)."""

    def __init__(self, folder: str | Path, composition: Composition) -> None:
        self.folder = Path(folder)
        self.composition = composition
        self._hparams: dict | None = None

    # ---------------------------------------------------------------- construction

    @classmethod
    def for_training(
        cls,
        folder: str | Path,
        hparams_file: str | Path,
        choices: Mapping[str, str] | None = None,
        overrides: Mapping | None = None,
        start_afresh: bool = False,
    ) -> Experiment:
        """The experiment as composed for stage 2; refused when it cannot resume the run the folder holds.

        With ``start_afresh`` nothing is compared: the training stage sets the old run aside.
        """
        folder = Path(folder)
        experiment = cls(folder, _compose(hparams_file, choices, {**(overrides or {}), "output_folder": str(folder)}))
        recorded = None if start_afresh else read_record(folder, for_training=True)
        if recorded is not None and any((folder / "save").glob("CKPT+*")):  # a run that trained: resume it only
            experiment.refuse_resume_changes(recorded)
        return experiment

    @classmethod
    def from_record(
        cls,
        folder: str | Path,
        hparams_file: str | Path | None = None,
        choices: Mapping[str, str] | None = None,
        overrides: Mapping | None = None,
    ) -> Experiment:
        """The experiment as trained (its record), with this stage's ``overrides`` on keys that do not shape the model.

        ``hparams_file`` and ``choices``, when given, must compose to the same model as the record.
        """
        folder = Path(folder)
        overrides = {**(overrides or {}), "output_folder": str(folder)}
        recorded = read_record(folder)
        if recorded is None:
            raise StageError(f"{folder / RECORD_FILE}: no record of a training run: run stage 2 first")
        # A fine-tuned experiment's record holds the fine-tuning stage's keys, which win over the stage's overrides.
        overrides = {**overrides, **recorded.finetune_overrides}
        requested = None
        if hparams_file is not None and Path(hparams_file).resolve() != (folder / RECORD_FILE).resolve():
            requested = cls(folder, _compose(hparams_file, choices, overrides))
        elif choices:
            raise StageError(
                "--backbone/--loss/--setting pick fragments for training; this stage reads them from "
                f"{folder / RECORD_FILE}"
            )
        experiment = cls(folder, _compose(folder / RECORD_FILE, None, overrides))
        if requested is not None:
            requested.refuse_shaping_changes(recorded, "this stage")
        experiment.refuse_shaping_changes(recorded, "an override")
        return experiment

    # ---------------------------------------------------------------- the record

    @property
    def record_path(self) -> Path:
        return self.folder / RECORD_FILE

    def write_record(self) -> None:
        """Write (or atomically rewrite) ``EXP/hyperparams.yaml`` with this composition, and note the training data."""
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.record_path, self.composition.text)
        record_training_data(self.folder, self.hparams["train_manifest"])

    def shaping_keys(self) -> list[str]:
        """Keys whose values shape the trained model: the backbone's and loss's keys, features and training data."""
        keys = [key for kind in ("backbone", "loss") for key in self.composition.keys_of(kind)]
        return [key for key in dict.fromkeys([*keys, *SHAPING_KEYS]) if not key.startswith("lm_")]

    def refuse_shaping_changes(
        self,
        recorded: Experiment,
        who: str,
        keys: list[str] | None = None,
        more: Sequence[str] = (),
        afresh: bool = False,
    ) -> None:
        """:class:`StageError` naming every shaping key (or each of ``keys``) on which this differs from ``recorded``.

        ``more`` are differences found otherwise (the training data); ``afresh`` names ``--start_afresh`` as a way out.
        """
        mine, theirs = self.hparams, recorded.hparams
        changed = [
            key
            for key in (recorded.shaping_keys() if keys is None else keys)
            if _plain(mine.get(key, _ABSENT)) != _plain(theirs.get(key, _ABSENT))
        ]
        settings = [key for key in changed if _is_data(theirs.get(key)) and _is_data(mine.get(key))]
        changed = settings or changed  # objects built from the changed settings would only repeat them
        if changed or more:
            differences = "; ".join(
                [
                    *(
                        f"{key}: {_shown(theirs.get(key, _ABSENT))} in the record, "
                        f"{_shown(mine.get(key, _ABSENT))} from {who}"
                        for key in changed
                    ),
                    *more,
                ]
            )
            raise StageError(
                f"{recorded.record_path} was trained with other settings ({differences}): keep the "
                f"record's values, or train a new experiment in another folder{', or ' + AFRESH if afresh else ''}"
            )

    def refuse_resume_changes(self, recorded: Experiment) -> None:
        """:class:`StageError` unless this experiment may resume the run ``recorded`` describes (docs/training.md).

        Refused: the shaping keys, :data:`RESUME_KEYS`, a changed training manifest, and a
        ``number_of_epochs`` below the epochs the save folder holds. Everything else may change.
        """
        data = training_data_change(self.folder, self.hparams["train_manifest"])
        keys = [*recorded.shaping_keys(), *RESUME_KEYS]
        self.refuse_shaping_changes(recorded, "training again", keys, [data] if data else [], afresh=True)
        epochs, trained = self.hparams.get("number_of_epochs"), epochs_trained(self.hparams["checkpointer"])
        if isinstance(epochs, int) and not isinstance(epochs, bool) and epochs < trained:
            raise StageError(
                f"{self.folder / 'save'} holds {trained} trained epochs, more than number_of_epochs={epochs}: "
                f"a resumed run may raise number_of_epochs, not lower it (or {AFRESH})"
            )

    # ---------------------------------------------------------------- contents

    @property
    def hparams(self) -> dict:
        """The loaded HyperPyYAML (objects built once, on first use)."""
        if self._hparams is None:
            try:
                self._hparams = load_hyperpyyaml(self.composition.text)
            except (TypeError, ValueError, AttributeError, ImportError) as err:  # a constructor's error: keep its words
                raise StageError(f"{self.composition_source}: " + " ".join(str(arg) for arg in err.args)) from err
        return self._hparams

    @property
    def composition_source(self) -> str:
        return str(self.composition.choices) if any(self.composition.choices.values()) else str(self.record_path)

    @property
    def data_folder(self) -> Path:
        return Path(self.hparams["data_folder"])

    @property
    def scores_folder(self) -> Path:
        return self.folder / "scores"

    @property
    def model_folder(self) -> Path:
        return self.folder / "model"

    @property
    def finetuned_from(self) -> str | None:
        """The experiment a fine-tuned experiment started from (None for one trained from scratch)."""
        return self._finetune_record().get("init_from")

    @property
    def finetune_overrides(self) -> dict:
        """The keys the fine-tuning stage set on the initial experiment's record (empty when not fine-tuned)."""
        return dict(self._finetune_record().get("overrides", {}))

    @property
    def init_model(self) -> dict | None:
        """The model folder the run started from (``--init_model``: folder, model identity), or None."""
        return recorded_init_model(self.folder)

    def record_finetune(self, init_from: str | Path, overrides: Mapping) -> None:
        """Note where a fine-tuned experiment started and the keys that made it one."""
        self.folder.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"init_from": str(init_from), "overrides": dict(overrides)}, indent=1)
        atomic_write_text(self.folder / FINETUNE_RECORD, text)

    def _finetune_record(self) -> dict:
        record = self.folder / FINETUNE_RECORD
        return json.loads(record.read_text(encoding="utf-8")) if record.is_file() else {}

    def loss_settings(self) -> dict:
        """What the head reports of itself (loss, head kind, hyper-parameters) plus the margin schedule."""
        hparams = self.hparams
        head = hparams["classifier"](num_classes=2, embedding_dim=int(hparams["embedding_dim"]))
        settings = head.loss_settings()
        schedule = hparams.get("margin_schedule")
        if schedule is not None and "margin" in settings:
            settings["margin_ramp"] = [schedule.start_epoch, schedule.end_epoch]
        return settings

    def describe(self) -> dict:
        """What identifies the experiment in results, comparisons and model cards (no machine paths)."""
        settings = self.loss_settings()
        loss = settings.pop("loss")
        label = loss if settings.get("head", "dense") == "dense" else f"{loss}_{settings['head']}"
        finetuned_from = self.finetuned_from
        started = self.init_model
        initial = (
            {"name": Path(started["folder"]).name, "model_identity": started.get("model_identity")} if started else None
        )
        return {
            "name": self.folder.name,
            "label": label,
            **{kind: self.composition.choices.get(kind) for kind in KINDS},
            "loss": loss,
            "loss_settings": settings,
            "finetuned_from": None if finetuned_from is None else Path(finetuned_from).name,
            **({"init_model": initial} if initial else {}),  # only a run started from a model folder names one
        }

    # ---------------------------------------------------------------- the trained model

    def last_checkpoints(self, num: int | None = None) -> list[Checkpoint]:
        """The last ``num`` (default ``average_checkpoints``) end-of-epoch checkpoints, oldest first.

        With ``keep_best_valid``, the ``num`` best by validation EER instead (the last ones if none was validated).
        """
        num = num or int(self.hparams.get("average_checkpoints", 1))
        if self.hparams.get("keep_best_valid"):
            best = best_valid_checkpoints(self.hparams["checkpointer"], num)
            if best:
                return best
            logger.warning("keep_best_valid: no checkpoint holds a validation metric; averaging the last ones")
        return last_checkpoints(self.hparams["checkpointer"], num)

    def load_averaged_model(self) -> list[Checkpoint]:
        """Load the average of the last ``average_checkpoints`` checkpoints into ``embedding_model``; returns them."""
        checkpoints = self.last_checkpoints()
        self.hparams["embedding_model"].load_state_dict(average_checkpoints(checkpoints, "embedding_model"))
        return checkpoints

    def averaged_embedder(self, device: str = "cpu") -> tuple[torch.nn.Module, str]:
        """The embedder holding the averaged weights (eval mode) and the model's identity (SHA-256 of its weights)."""
        try:
            checkpoints = self.load_averaged_model()
        except FileNotFoundError as err:
            raise StageError(f"{self.folder}: no trained model ({err}): run stage 2 first") from err
        identity = model_identity(self.hparams["embedding_model"].state_dict())
        logger.info("embedder: average of %s (model %s)", [ckpt.path.name for ckpt in checkpoints], identity[:16])
        return self.hparams["embedder"].to(device).eval(), identity


def composed_hparams(
    hparams_file: str | Path, choices: Mapping[str, str] | None = None, overrides: Mapping | None = None
) -> dict:
    """The loaded hparams of a composed experiment outside any experiment folder (tests, benchmarks).

    Models are built exactly as the training stage builds them; ``output_folder`` defaults to a
    path that is never created (loading creates no files there).
    """
    overrides = {"output_folder": "/nonexistent/qmargin_spk_composed", **(overrides or {})}
    return Experiment(overrides["output_folder"], _compose(hparams_file, choices, overrides)).hparams


def recorded_init_model(folder: str | Path) -> dict | None:
    """The model folder a run started from (``EXP/init_model.json``), or None."""
    path = Path(folder) / INIT_MODEL_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def read_record(folder: str | Path, for_training: bool = False) -> Experiment | None:
    """The experiment recorded in ``folder`` (None without a record).

    A record written before experiments were composed (no ``composed_from``) cannot say which keys
    shaped the model: a later stage asks for it to be rewritten; training replaces it.
    """
    path = Path(folder) / RECORD_FILE
    if not path.is_file():
        return None
    try:
        tree = load_tree(path)
    except CompositionError as err:
        raise StageError(str(err)) from None
    if RECORD_KEY not in tree:
        if for_training:
            logger.warning("%s predates composed experiments: replacing it with this run's record", path)
            return None
        raise StageError(
            f"{path} was written before experiments were composed: rewrite it by running stage 2 again "
            "with the experiment file and overrides it was trained with (e.g. run.sh --stage 2 "
            "--stop_stage 2 ...; a finished run does not train again)"
        )
    return Experiment(folder, _compose(path, None, {"output_folder": str(Path(folder))}))


def last_checkpoints(checkpointer: Checkpointer, num: int) -> list[Checkpoint]:
    """The ``num`` most recent end-of-epoch checkpoints, oldest first (the ones averaged for extraction)."""
    checkpoints = checkpointer.find_checkpoints(
        ckpt_predicate=lambda ckpt: ckpt.meta.get("end-of-epoch", True), max_num_checkpoints=None
    )
    checkpoints = sorted(checkpoints, key=lambda ckpt: ckpt.meta["unixtime"])[-num:]
    if not checkpoints:
        raise FileNotFoundError(f"no end-of-epoch checkpoint in {checkpointer.checkpoints_dir}")
    return checkpoints


def _compose(hparams_file: str | Path, choices: Mapping[str, str] | None, overrides: Mapping) -> Composition:
    try:
        return compose(hparams_file, choices, overrides)
    except CompositionError as err:
        raise StageError(str(err)) from None


def _plain(value: Any) -> Any:
    """A comparable form of an hparams value: data as is, objects by their class, partials by function and keywords."""
    if value is _ABSENT or isinstance(value, (str, int, float, bool, type(None))):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, functools.partial):
        return ("partial", _qualified(value.func), _plain(value.keywords))
    return _qualified(type(value))


def _is_data(value: Any) -> bool:
    """Whether an hparams value is plain data (a setting), not an object built from settings."""
    if isinstance(value, (list, tuple)):
        return all(_is_data(item) for item in value)
    if isinstance(value, Mapping):
        return all(_is_data(item) for item in value.values())
    return isinstance(value, (str, int, float, bool, type(None)))


def _qualified(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', repr(obj))}"


def _shown(value: Any) -> str:
    return "absent" if value is _ABSENT else repr(_plain(value))
