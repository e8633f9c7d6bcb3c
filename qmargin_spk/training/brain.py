"""The SpeechBrain ``Brain`` that trains a speaker embedder with a cosine classifier and any of our losses.

The hparams choose the loss: either ``classifier`` with cosine outputs + ``compute_cost`` (any loss
module of :mod:`qmargin_spk.losses`), or a fused ``classifier`` (e.g. ``SparseQMarginHead``) that maps
embeddings and labels straight to the loss, with ``compute_cost: null``. Everything else,
checkpoints included, is identical across losses.
"""
from __future__ import annotations

import logging

import speechbrain as sb
import torch
from torch.nn.parallel import DistributedDataParallel

logger = logging.getLogger(__name__)

_STAT_KEYS = ("support_mean", "support_max", "p_target_mean", "p_target_zero_frac")


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP / DataParallel wrapper."""
    return getattr(module, "module", module)


class SpeakerBrain(sb.Brain):
    """Speaker-embedding training: augment -> embedder -> classifier + loss (or fused head)."""

    def _wrap_distributed(self):
        """SpeechBrain always converts BatchNorm to SyncBatchNorm, which runs only on GPUs: on the CPU (gloo) wrap without it."""
        if not (self.distributed_launch and str(self.device).startswith("cpu")):
            return super()._wrap_distributed()
        for name, module in self.modules.items():
            if any(p.requires_grad for p in module.parameters()):
                self.modules[name] = DistributedDataParallel(module, find_unused_parameters=self.find_unused_parameters)
        return None

    def compute_forward(self, batch, stage):
        _, wavs, rel_lens, _ = batch
        wavs, rel_lens = wavs.to(self.device), rel_lens.to(self.device)
        if stage == sb.Stage.TRAIN and getattr(self.hparams, "augment", None) is not None:
            wavs = self.hparams.augment(wavs)
        return self.modules.embedder(wavs, rel_lens)

    def compute_objectives(self, embeddings, batch, stage):
        labels = batch[3].to(self.device)
        if self._fused_head():
            loss = self.modules.classifier(embeddings, labels)
            stats = _unwrap(self.modules.classifier).stats
            correct = None
        else:
            cosines = self.modules.classifier(embeddings.unsqueeze(1))
            loss = self.hparams.compute_cost(cosines, labels.unsqueeze(1))
            stats = self.hparams.compute_cost.stats
            correct = float((cosines.squeeze(1).argmax(dim=-1) == labels).float().sum())
        self._accumulate(stats, correct, labels.shape[0])
        return loss

    def on_fit_batch_start(self, batch, should_step):
        if should_step:  # the LR of the step about to be taken
            self.hparams.lr_scheduler.step(self.optimizer)

    def on_stage_start(self, stage, epoch=None):
        self._totals = {key: 0.0 for key in _STAT_KEYS}
        self._totals.update(batches=0, correct=0.0, samples=0, support_max=0.0)
        if stage == sb.Stage.TRAIN and epoch is not None:
            self.hparams.train_data.set_epoch(epoch)
            self._margin_loss().margin = self.hparams.margin_schedule(epoch)

    def on_stage_end(self, stage, stage_loss, epoch=None):
        if stage != sb.Stage.TRAIN:
            return
        stats = self.epoch_statistics(stage_loss)
        self.hparams.train_logger.log_stats(stats_meta={"epoch": epoch}, train_stats=stats)
        tensorboard = self._tensorboard_logger()
        if tensorboard is not None:
            tensorboard.log_stats(stats_meta={"epoch": epoch}, train_stats=stats)
        self.checkpointer.save_and_keep_only(
            meta={"epoch": epoch, "loss": stage_loss}, end_of_epoch=True,
            num_to_keep=self.hparams.keep_checkpoints,
            ckpt_predicate=lambda ckpt: ckpt.meta.get("end-of-epoch", False),
        )

    def epoch_statistics(self, stage_loss: float) -> dict[str, float]:
        """Loss, accuracy, LR, margin and posterior statistics of the epoch so far."""
        totals = self._totals
        batches = max(totals["batches"], 1)
        stats = {"loss": float(stage_loss), "lr": self.optimizer.param_groups[0]["lr"],
                 "margin": self._margin_loss().margin}
        if totals["samples"] and not self._fused_head():
            stats["accuracy"] = totals["correct"] / totals["samples"]
        stats.update({key: totals[key] / batches for key in _STAT_KEYS if key != "support_max"})
        stats["support_max"] = totals["support_max"]
        return stats

    def _accumulate(self, stats: dict, correct: float | None, batch_size: int) -> None:
        totals = self._totals
        totals["batches"] += 1
        totals["samples"] += batch_size
        totals["correct"] += correct or 0.0
        for key in _STAT_KEYS:
            if key == "support_max":
                totals[key] = max(totals[key], stats.get(key, 0.0))
            else:
                totals[key] += stats.get(key, 0.0)

    def _tensorboard_logger(self):
        """SpeechBrain's TensorBoard logger when ``tensorboard_dir`` is set (main process only)."""
        folder = getattr(self.hparams, "tensorboard_dir", None)
        if folder is None or not sb.utils.distributed.if_main_process():
            return None
        if getattr(self, "_tensorboard", None) is None:
            from speechbrain.utils.train_logger import TensorboardLogger

            self._tensorboard = TensorboardLogger(folder)
        return self._tensorboard

    def _fused_head(self) -> bool:
        """True when the classifier computes the loss itself (``compute_cost: null``)."""
        return self.hparams.compute_cost is None

    def _margin_loss(self):
        """The object whose ``margin`` the schedule drives: the fused head or the loss module."""
        return _unwrap(self.modules.classifier) if self._fused_head() else self.hparams.compute_cost
