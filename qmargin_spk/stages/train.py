"""Stage 2 (train) and stage 5 (large-margin fine-tuning): a composed experiment in, checkpoints out."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import speechbrain as sb
import torch
from speechbrain.utils.distributed import ddp_init_group, if_main_process, run_on_main

from qmargin_spk.data.dataset import SpeakerLabelEncoder
from qmargin_spk.data.manifest import read_manifest
from qmargin_spk.losses.registry import HeadSettingsError
from qmargin_spk.models import count_parameters
from qmargin_spk.stages.experiment import RECORD_FILE, Experiment, StageError
from qmargin_spk.stages.init_model import (
    INIT_MODEL_FILE,
    InitModel,
    initialise_from_model,
    prepare_init_model,
    record_init_model,
)
from qmargin_spk.stages.numeric_hparams import check_numeric_hparams
from qmargin_spk.stages.resume import set_aside
from qmargin_spk.stages.runner import world_size
from qmargin_spk.training.brain import SpeakerBrain
from qmargin_spk.training.validation import EpochValidation
from qmargin_spk.utils.seeds import component_seed, seeded_global_rng

logger = logging.getLogger(__name__)

# An epoch with fewer optimiser steps than this gets a warning.
FEW_STEPS = 10


def steps_per_epoch(num_utterances: int, batch_size: int, processes: int, steps: int | None = None) -> int:
    """Optimiser steps in one epoch (incomplete batches are dropped); :class:`StageError` when there are none.

    ``steps``, when the data set knows its own count (shards split per rank and worker), replaces the estimate.
    """
    steps = num_utterances // (batch_size * processes) if steps is None else steps
    if steps == 0:
        raise StageError(
            f"batch_size {batch_size} x {processes} processes exceeds the {num_utterances} training "
            "utterances: an epoch would have no step (lower batch_size or use fewer processes)"
        )
    if steps < FEW_STEPS:
        logger.warning(
            "an epoch has only %d optimiser steps (%d utterances, global batch %d)",
            steps,
            num_utterances,
            batch_size * processes,
        )
    return steps


def choose_threads(requested: int | None, num_workers: int) -> int:
    """Intra-op threads per process: ``requested``, or this process's share of the cores less its loader workers.

    PyTorch's default (every core) oversubscribes the CPU once data-loader workers or other training
    processes share it, and each small operation then waits for its slowest thread.
    """
    if requested is not None:
        return max(1, int(requested))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, cores // local_processes - num_workers)


def train_stage(
    folder: str | Path,
    hparams_file: str | Path,
    run_opts: dict,
    choices: Mapping[str, str] | None = None,
    overrides: Mapping | None = None,
    start_afresh: bool = False,
    init_model: str | Path | None = None,
) -> SpeakerBrain:
    """Train (or resume) the experiment composed from ``hparams_file`` in ``folder``; returns the fitted Brain.

    ``init_model``, a model folder, starts the backbone from its weights and the head as hparams
    ``init_head`` says (:mod:`qmargin_spk.stages.init_model`).

    The composed experiment is written to ``EXP/hyperparams.yaml`` (the run's record) when training
    starts; resuming with settings it may not change (docs/training.md) is refused before anything
    is written. ``start_afresh`` moves a previous run in ``folder`` aside (``EXP/previous-<time>/``) first.
    """
    ddp_init_group(run_opts)
    experiment = Experiment.for_training(folder, hparams_file, choices, overrides, start_afresh=start_afresh)
    has_checkpoints = not start_afresh and any((Path(folder) / "save").glob("CKPT+*"))
    device = str(run_opts.get("device") or "cpu")
    initial = prepare_init_model(folder, init_model, experiment.hparams, device, has_checkpoints)
    return _run(experiment, run_opts, start_afresh=start_afresh, init_model=initial)


def finetune_stage(
    init_folder: str | Path,
    folder: str | Path,
    run_opts: dict,
    hparams_file: str | Path | None = None,
    choices: Mapping[str, str] | None = None,
    overrides: Mapping | None = None,
) -> SpeakerBrain:
    """Large-margin fine-tuning: a new run in ``folder`` from the trained experiment ``init_folder``.

    The initial experiment's record with its ``lm_overrides`` (longer crops, ``lm_margin``, small LR,
    no warm-up, no speed classes) applied over this stage's overrides is the new run's experiment;
    its training manifest is the initial experiment's. A run already under way resumes.
    """
    ddp_init_group(run_opts)
    init_folder = Path(init_folder).resolve()
    initial = Experiment.from_record(init_folder, hparams_file, choices, overrides)
    lm = {**_plain_values(initial.hparams["lm_overrides"]), "data_folder": str(init_folder / "data")}
    experiment = Experiment.for_training(folder, init_folder / RECORD_FILE, None, {**(overrides or {}), **lm})
    if if_main_process():
        experiment.record_finetune(init_folder, lm)
    return _run(experiment, run_opts, init_from=initial)


def _run(
    experiment: Experiment,
    run_opts: dict,
    init_from: Experiment | None = None,
    start_afresh: bool = False,
    init_model: InitModel | None = None,
) -> SpeakerBrain:
    """Check the settings, claim the save folder and train (the record is written once training can start)."""
    hparams = experiment.hparams
    check_numeric_hparams(hparams)
    threads = choose_threads(hparams.get("num_threads"), hparams["num_workers"])
    torch.set_num_threads(threads)
    hparams["checkpointer"].claim()
    try:
        if start_afresh:
            run_on_main(_start_afresh, args=[experiment])
        return _train(experiment, run_opts, threads, init_from, init_model)
    finally:
        hparams["checkpointer"].release()


def _start_afresh(experiment: Experiment) -> None:
    """Move the previous run aside (its save folder still locked by this run), then claim a new, empty one."""
    set_aside(experiment.folder)
    experiment.hparams["checkpointer"].release()
    experiment.hparams["checkpointer"].claim()


def _initialise_from(experiment: Experiment, head: torch.nn.Module, initial: Experiment) -> None:
    """Load ``initial``'s averaged embedding model, the first ``C`` (``C K``) prototypes and its loss's state.

    Classes ``0 .. num_speakers - 1`` are the unperturbed speakers in every run (speed classes come
    after them), so the rows a run without speed classes keeps are the first ones. Every head's
    checkpoint holds the full ``[C, D]`` prototype matrix (``[C K, D]``, class-major, with K sub-centers);
    a loss with parameters (SphereFace2's bias) keeps them too.
    """
    checkpoints = initial.load_averaged_model()
    experiment.hparams["embedding_model"].load_state_dict(initial.hparams["embedding_model"].state_dict())
    saved = torch.load(checkpoints[-1].paramfiles["classifier"], map_location="cpu", weights_only=True)
    prototypes = saved["classifier.weight"] if "classifier.weight" in saved else saved["weight"]  # dense or fused heads
    rows = head.num_classes * getattr(head, "prototypes_per_class", 1)  # sub-centers: K class-major rows per class
    if prototypes.shape[0] < rows:
        raise StageError(f"{initial.folder} has {prototypes.shape[0]} prototypes, fewer than this run's {rows}")
    head.load_full_weight(prototypes[:rows])
    loss_state = {key.removeprefix("loss."): value for key, value in saved.items() if key.startswith("loss.")}
    if loss_state:
        head.loss.load_state_dict(loss_state)
    logger.info(
        "initialised from %s (embedding model: average of %s)", initial.folder, [c.path.name for c in checkpoints]
    )


def _plain_values(mapping: Mapping) -> dict:
    """A loaded YAML mapping as plain Python values (for the fine-tuning record)."""
    return {key: list(value) if isinstance(value, (list, tuple)) else value for key, value in mapping.items()}


def _train(
    experiment: Experiment,
    run_opts: dict,
    threads: int,
    init_from: Experiment | None,
    init_model: InitModel | None = None,
) -> SpeakerBrain:
    """The stage's work once the save folder is ours."""
    hparams = experiment.hparams
    sb.create_experiment_directory(hparams["output_folder"])  # SpeechBrain's logging to EXP/log.txt and stdout
    rows = read_manifest(hparams["train_manifest"])
    run_on_main(SpeakerLabelEncoder.load_or_create, args=[hparams["label_encoder_file"], rows])
    labels = SpeakerLabelEncoder.load_or_create(hparams["label_encoder_file"], rows)
    if hparams["data_format"] == "shards":
        train_data = hparams["shard_train_data"](labels=labels)
        loader_kwargs = {key: value for key, value in hparams["train_loader_kwargs"].items() if key != "shuffle"}
    elif hparams["data_format"] == "files":
        train_data = hparams["train_data"](manifest=rows, labels=labels)
        loader_kwargs = hparams["train_loader_kwargs"]
    else:
        raise StageError(f"hparams key 'data_format' must be 'files' or 'shards', got {hparams['data_format']!r}")
    try:  # the head draws from its own generator: its size cannot shift what other components draw
        with seeded_global_rng(None if hparams.get("seed") is None else component_seed(hparams["seed"], "head")):
            head = hparams["classifier"](num_classes=train_data.num_classes, embedding_dim=hparams["embedding_dim"])
    except HeadSettingsError as err:
        raise StageError(f"{experiment.record_path}: {err}") from None
    hparams["modules"]["classifier"] = head
    hparams["checkpointer"].add_recoverable("classifier", head)
    fresh_run = not hparams["checkpointer"].find_checkpoints(max_num_checkpoints=1)
    if init_from is not None and fresh_run:
        _initialise_from(experiment, head, init_from)
    if init_model is not None and init_model.model is not None and fresh_run:
        initialise_from_model(experiment.folder, hparams, head, init_model.model, rows, labels)

    global_batch = hparams["batch_size"] * world_size()
    known_steps = None
    num_utterances = len(rows)
    if hasattr(train_data, "num_batches"):  # a stream split by rank: it knows its own step count
        known_steps = train_data.num_batches(hparams["batch_size"], hparams["num_workers"])
    steps = steps_per_epoch(num_utterances, hparams["batch_size"], world_size(), known_steps)
    hparams["lr_scheduler"].configure(global_batch=global_batch, steps_per_epoch=steps)
    if if_main_process():
        logger.info(
            "%s; embedding model: %d parameters; %d classes; %d training utterances; "
            "peak LR %.4g at global batch %d; %d threads per process",
            head.loss_settings(),
            count_parameters(hparams["embedding_model"]),
            train_data.num_classes,
            num_utterances,
            hparams["lr_scheduler"].peak_lr,
            global_batch,
            threads,
        )
    validation = _validation(experiment)
    if if_main_process():  # data, head and schedule are in place: this run is the one the record describes
        experiment.write_record()
        if init_model is not None:
            record_init_model(experiment.folder, init_model.folder, hparams.get("init_head", "class_means"))
        elif fresh_run:  # a run started from scratch: no model folder to name (left by an earlier start)
            (experiment.folder / INIT_MODEL_FILE).unlink(missing_ok=True)
    brain = SpeakerBrain(
        modules=hparams["modules"],
        opt_class=hparams["opt_class"],
        hparams=hparams,
        run_opts=run_opts,
        checkpointer=hparams["checkpointer"],
    )
    brain.validation = validation
    brain.fit(hparams["epoch_counter"], train_data, train_loader_kwargs=loader_kwargs)
    if validation is not None and if_main_process():
        validation.plot()
    return brain


def _validation(experiment: Experiment) -> EpochValidation | None:
    """The validation list stage 1 wrote (scored every ``valid_every`` epochs), or None; a bad one is a StageError."""
    try:
        validation = EpochValidation.from_hparams(experiment.hparams)
    except ValueError as err:
        raise StageError(f"validation list: {err}") from None
    if validation is not None and if_main_process():
        logger.info(
            "validating every %d epochs on %d trials of %s",
            validation.every,
            len(validation.trials),
            validation.trials.path,
        )
    return validation
