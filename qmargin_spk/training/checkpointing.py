"""Checkpoints that are never half-written, RNG state that survives a restart, the last N checkpoints.

SpeechBrain's ``Checkpointer`` writes the checkpoint's meta file first and the parameter files
after it, so a run killed mid-save leaves a checkpoint that looks complete. Here every checkpoint
is written into a hidden temporary folder and renamed into place once all files are on disk.
"""
from __future__ import annotations

import logging
import os
import random
import shutil

import numpy as np
import torch
from speechbrain.utils.checkpoints import (
    Checkpoint,
    Checkpointer,
    mark_as_loader,
    mark_as_saver,
    register_checkpoint_hooks,
)
from speechbrain.utils.distributed import ddp_barrier, ddp_broadcast, if_main_process

_TMP_PREFIX = ".partial-"
logger = logging.getLogger(__name__)


class AtomicCheckpointer(Checkpointer):
    """A ``Checkpointer`` whose checkpoints appear only when complete."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if if_main_process() and self.checkpoints_dir.is_dir():
            for leftover in self.checkpoints_dir.glob(_TMP_PREFIX + "*"):
                shutil.rmtree(leftover, ignore_errors=True)

    def _custom_checkpoint_dirpath(self, name):
        # Temporary folders keep their hidden name: no "CKPT+" prefix, so no reader takes them for a checkpoint.
        if name.startswith(_TMP_PREFIX):
            return self.checkpoints_dir / name
        return super()._custom_checkpoint_dirpath(name)

    def save_checkpoint(self, meta={}, end_of_epoch=True, name=None, verbosity=20):  # noqa: B006 (SpeechBrain's signature)
        final_dir = None
        if if_main_process():
            final_dir = self._new_checkpoint_dirpath() if name is None else self._custom_checkpoint_dirpath(name)
        final_dir = ddp_broadcast(final_dir, src=0)
        temporary_name = _TMP_PREFIX + final_dir.name
        saved = super().save_checkpoint(meta=meta, end_of_epoch=end_of_epoch, name=temporary_name,
                                        verbosity=logging.DEBUG)
        ddp_barrier()
        if not if_main_process():
            return None
        os.replace(saved.path, final_dir)
        logger.log(verbosity, "Saved %s checkpoint %s", "an end-of-epoch" if end_of_epoch else "an intra-epoch", final_dir)
        paramfiles = {key: final_dir / path.name for key, path in saved.paramfiles.items()}
        return Checkpoint(final_dir, saved.meta, paramfiles)


@register_checkpoint_hooks
class RNGState:
    """Saves and restores the Python, NumPy and torch random generators with the checkpoint."""

    @mark_as_saver
    def save(self, path) -> None:
        torch.save({"python": random.getstate(), "numpy": np.random.get_state(),
                    "torch": torch.get_rng_state()}, path)

    @mark_as_loader
    def load(self, path, end_of_epoch=False) -> None:
        state = torch.load(path, weights_only=False)
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
