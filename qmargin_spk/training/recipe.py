"""The training stage as a function: hparams YAML in, trained checkpoints out."""
from __future__ import annotations

import logging

import speechbrain as sb
from hyperpyyaml import load_hyperpyyaml
from speechbrain.utils.distributed import ddp_init_group, get_rank

from qmargin_spk.models import count_parameters
from qmargin_spk.training.brain import SpeakerBrain

logger = logging.getLogger(__name__)


def world_size() -> int:
    """Number of training processes (1 without torch.distributed)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def load_hparams(hparams_file: str, overrides: str | dict = "") -> dict:
    """Load a HyperPyYAML file with overrides (a YAML string or a dict)."""
    with open(hparams_file, encoding="utf-8") as handle:
        return load_hyperpyyaml(handle, overrides)


def train(hparams_file: str, run_opts: dict, overrides: str = "") -> SpeakerBrain:
    """Train (or resume) the experiment described by ``hparams_file``; returns the fitted Brain."""
    ddp_init_group(run_opts)
    hparams = load_hparams(hparams_file, overrides)
    sb.create_experiment_directory(hparams["output_folder"], hyperparams_to_save=hparams_file, overrides=overrides)
    train_data = hparams["train_data"]
    global_batch = hparams["batch_size"] * world_size()
    hparams["lr_scheduler"].configure(global_batch=global_batch, steps_per_epoch=len(train_data) // global_batch)
    if get_rank() in (None, 0):
        logger.info("embedding model: %d parameters; classifier: %d classes; %d training utterances; "
                    "peak LR %.4g at global batch %d",
                    count_parameters(hparams["embedding_model"]), hparams["num_classes"], len(train_data),
                    hparams["lr_scheduler"].peak_lr, global_batch)
    brain = SpeakerBrain(modules=hparams["modules"], opt_class=hparams["opt_class"], hparams=hparams,
                         run_opts=run_opts, checkpointer=hparams["checkpointer"])
    brain.fit(hparams["epoch_counter"], train_data, train_loader_kwargs=hparams["train_loader_kwargs"])
    return brain
