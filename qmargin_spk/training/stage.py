"""The training stage as a function: hparams YAML in, trained checkpoints out."""
from __future__ import annotations

import logging

import speechbrain as sb
from speechbrain.utils.distributed import ddp_init_group, if_main_process, run_on_main

from qmargin_spk.data.dataset import SpeakerLabelEncoder
from qmargin_spk.data.manifest import read_manifest
from qmargin_spk.experiment import Experiment, Overrides, world_size
from qmargin_spk.models import count_parameters
from qmargin_spk.training.brain import SpeakerBrain

logger = logging.getLogger(__name__)


def train_stage(hparams_file: str, run_opts: dict, overrides: Overrides = "") -> SpeakerBrain:
    """Train (or resume) the experiment described by ``hparams_file``; returns the fitted Brain.

    The stage builds what only training needs from the experiment's hparams: the training set
    from the manifest, the speaker label file, and the head (``classifier``) for its number of classes.
    """
    ddp_init_group(run_opts)
    experiment = Experiment(hparams_file, overrides)
    hparams = experiment.hparams
    sb.create_experiment_directory(hparams["output_folder"], hyperparams_to_save=hparams_file, overrides=overrides)
    rows = read_manifest(hparams["train_manifest"])
    run_on_main(SpeakerLabelEncoder.load_or_create, args=[hparams["label_encoder_file"], rows])
    train_data = hparams["train_data"](manifest=rows, labels=SpeakerLabelEncoder.load_or_create(hparams["label_encoder_file"], rows))
    head = hparams["classifier"](num_classes=train_data.num_classes, embedding_dim=hparams["embedding_dim"])
    hparams["modules"]["classifier"] = head
    hparams["checkpointer"].add_recoverable("classifier", head)

    global_batch = hparams["batch_size"] * world_size()
    hparams["lr_scheduler"].configure(global_batch=global_batch, steps_per_epoch=len(train_data) // global_batch)
    if if_main_process():
        logger.info("loss %s (%s); embedding model: %d parameters; %d classes; %d training utterances; "
                    "peak LR %.4g at global batch %d", hparams["loss_name"], experiment.loss_settings(),
                    count_parameters(hparams["embedding_model"]), train_data.num_classes, len(train_data),
                    hparams["lr_scheduler"].peak_lr, global_batch)
    brain = SpeakerBrain(modules=hparams["modules"], opt_class=hparams["opt_class"], hparams=hparams,
                         run_opts=run_opts, checkpointer=hparams["checkpointer"])
    brain.fit(hparams["epoch_counter"], train_data, train_loader_kwargs=hparams["train_loader_kwargs"])
    return brain
