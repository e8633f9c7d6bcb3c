"""Checkpoints that are never half-written, RNG state that survives a restart, one owner per save folder.

SpeechBrain's ``Checkpointer`` writes the checkpoint's meta file first and the parameter files
after it, so a run killed mid-save leaves a checkpoint that looks complete. Here every checkpoint
is written into a hidden temporary folder and renamed into place once all files are on disk.
Leftover temporary folders of a killed run are removed only by the training process that owns
the folder (:meth:`AtomicCheckpointer.claim`, an exclusive lock), never by a reader such as the
scoring stage. Everything is stored as plain tensors and loaded with ``weights_only=True``: a
crafted checkpoint file cannot run code.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import random
import shutil
from collections.abc import Mapping

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
_GENERATOR_PREFIX = "generator_"
_LOCK_NAME = ".owner.lock"
logger = logging.getLogger(__name__)


class SaveFolderBusyError(RuntimeError):
    """Another training run holds the checkpoint folder."""


class AtomicCheckpointer(Checkpointer):
    """A ``Checkpointer`` whose checkpoints appear only when complete."""

    _lock_handle = None

    def claim(self) -> None:
        """Become the folder's only writer (main process): lock it, then remove a killed run's partial saves.

        Raises :class:`SaveFolderBusyError` when another live process holds the lock. The lock is
        released by :meth:`release`, or when this process exits.
        """
        if not if_main_process() or self._lock_handle is not None:
            return
        self.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        handle = open(self.checkpoints_dir / _LOCK_NAME, "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            handle.close()
            raise SaveFolderBusyError(f"{self.checkpoints_dir} is in use by another training run") from err
        self._lock_handle = handle
        for leftover in self.checkpoints_dir.glob(_TMP_PREFIX + "*"):
            shutil.rmtree(leftover, ignore_errors=True)

    def release(self) -> None:
        """Give up the folder (the end of a training run)."""
        if self._lock_handle is not None:
            self._lock_handle.close()
            self._lock_handle = None

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
        try:
            saved = super().save_checkpoint(
                meta=meta, end_of_epoch=end_of_epoch, name=temporary_name, verbosity=logging.DEBUG
            )
        except RuntimeError as err:  # torch.save reports a full disk as "basic_ios::clear" / "failed writing"
            raise _storage_error(self.checkpoints_dir, err) from err
        ddp_barrier()
        if not if_main_process():
            return None
        os.replace(saved.path, final_dir)
        logger.log(
            verbosity, "Saved %s checkpoint %s", "an end-of-epoch" if end_of_epoch else "an intra-epoch", final_dir
        )
        paramfiles = {key: final_dir / path.name for key, path in saved.paramfiles.items()}
        return Checkpoint(final_dir, saved.meta, paramfiles)


def _storage_error(folder, err: RuntimeError) -> Exception:
    """The OS-level reason behind a failed ``torch.save`` (a full disk is the usual one)."""
    free = shutil.disk_usage(folder).free
    if free < 64 * 2**20:
        return OSError(
            errno.ENOSPC,
            f"No space left on device while saving a checkpoint in {folder} "
            f"({free} bytes free); the previous checkpoints are intact",
        )
    return OSError(errno.EIO, f"Saving a checkpoint in {folder} failed ({err}); the previous checkpoints are intact")


@register_checkpoint_hooks
class RNGState:
    """Saves and restores the Python, NumPy and torch random generators with the checkpoint, as plain tensors.

    ``generator_owners`` maps a name to an object whose ``generator`` attribute is a private
    ``torch.Generator`` (or None), e.g. the augmenter (``qmargin_spk/utils/seeds.py``): its state is
    saved too, so a resumed run draws what the uninterrupted one would. A checkpoint written
    before an owner was added has no state for it: the generator is left as it was seeded.
    """

    def __init__(self, generator_owners: Mapping[str, object] | None = None) -> None:
        self.generator_owners = dict(generator_owners or {})

    def _generators(self) -> dict[str, torch.Generator]:
        owned = {name: getattr(owner, "generator", None) for name, owner in self.generator_owners.items()}
        return {name: generator for name, generator in owned.items() if generator is not None}

    @mark_as_saver
    def save(self, path) -> None:
        version, internal, gauss = random.getstate()
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        if kind != "MT19937":
            raise ValueError(f"unsupported NumPy bit generator {kind}")
        torch.save(
            {
                "python_version": torch.tensor(version),
                "python_internal": torch.tensor(internal, dtype=torch.int64),
                "python_gauss": torch.tensor([] if gauss is None else [gauss], dtype=torch.float64),
                "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
                "numpy_pos": torch.tensor(pos),
                "numpy_gauss": torch.tensor([has_gauss, cached], dtype=torch.float64),
                "torch": torch.get_rng_state(),
                **{_GENERATOR_PREFIX + name: g.get_state() for name, g in self._generators().items()},
            },
            path,
        )

    @mark_as_loader
    def load(self, path, end_of_epoch=False) -> None:
        state = torch.load(path, weights_only=True)
        gauss = state["python_gauss"].tolist()
        random.setstate(
            (int(state["python_version"]), tuple(state["python_internal"].tolist()), gauss[0] if gauss else None)
        )
        has_gauss, cached = state["numpy_gauss"].tolist()
        np.random.set_state(
            (
                "MT19937",
                state["numpy_keys"].numpy().astype(np.uint32),
                int(state["numpy_pos"]),
                int(has_gauss),
                float(cached),
            )
        )
        torch.set_rng_state(state["torch"])
        for name, generator in self._generators().items():
            if _GENERATOR_PREFIX + name in state:
                generator.set_state(state[_GENERATOR_PREFIX + name])
            else:
                logger.warning("%s holds no state for the %s generator: it continues from its seed", path, name)
