"""The SpeechBrain ``Brain`` that trains a speaker embedder with a cosine classifier and any of our losses.

The hparams choose the head (``classifier``, any head of :mod:`qmargin_spk.losses.heads`: embeddings
and labels in, loss out, with ``margin``, ``scale`` and ``stats``). Everything else, checkpoints
included, is identical across losses.
"""

from __future__ import annotations

import logging

import speechbrain as sb
import torch
import torch.distributed as dist
from speechbrain.utils.checkpoints import mark_as_loader, register_checkpoint_hooks
from torch.nn.parallel import DistributedDataParallel

from qmargin_spk.training.epoch_stats import EpochStatistics
from qmargin_spk.training.validation import EpochValidation, checkpoint_meta, retention

logger = logging.getLogger(__name__)


def sum_gradients(state, bucket):  # no annotations: DDP checks them, and this module's are strings
    """DDP communication hook: all-reduce SUM of a ``dist.GradBucket`` (DDP's default divides by the world size)."""
    return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda fut: fut.value()[0])


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP / DataParallel wrapper."""
    return getattr(module, "module", module)


@register_checkpoint_hooks
class SpeakerBrain(sb.Brain):
    """Speaker-embedding training: augment -> embedder -> head (classifier and loss).

    Resuming from an intra-epoch checkpoint continues the uninterrupted run exactly: the shuffling
    order of each epoch comes from its own generator seeded by ``(seed, epoch)``, never from the
    global RNG, augmentation draws from its own generator (``utils/seeds.py``; the checkpoint's
    ``rng_state`` restores both), and the epoch statistics are checkpointed with the rest.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.epoch_stats = EpochStatistics()
        self.shuffle_generator = torch.Generator()
        self.validation: EpochValidation | None = None  # the training stage sets it when there is a validation list
        if self.checkpointer is not None:
            self.checkpointer.add_recoverable("epoch_stats", self.epoch_stats)

    @mark_as_loader
    def _recover(self, path, end_of_epoch):
        """SpeechBrain's recovery, except that after an end-of-epoch checkpoint the next epoch starts from zero.

        SpeechBrain saves the end-of-epoch checkpoint in ``on_stage_end``, before it resets ``step`` and
        ``avg_train_loss``, so the checkpoint holds the finished epoch's step count and mean loss. Restored
        as they are, the next epoch would continue that running mean (its logged loss the mean of two
        epochs), keep the finished epoch's statistics (reset only at step 0) and make a stream skip
        ``step`` batches.
        """
        super()._recover(path, end_of_epoch)
        if end_of_epoch:
            self.step = 0
            self.avg_train_loss = 0.0

    def _wrap_distributed(self):
        """DDP for every trainable module except a model-parallel head (docs/speechbrain.md).

        Unlike SpeechBrain's, SyncBatchNorm is used only on GPUs (it has no CPU kernels), and when the
        head is model parallel (its loss is already the mean over the global batch, the same on
        every rank) the other modules' gradients are summed over ranks instead of averaged.
        """
        if not self.distributed_launch:
            return super()._wrap_distributed()
        on_cpu = str(self.device).startswith("cpu")
        model_parallel = any(getattr(module, "model_parallel", False) for module in self.modules.values())
        for name, module in self.modules.items():
            if getattr(module, "model_parallel", False) or not any(p.requires_grad for p in module.parameters()):
                continue
            if not on_cpu:
                module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
            wrapped = DistributedDataParallel(
                module, device_ids=None if on_cpu else [self.device], find_unused_parameters=self.find_unused_parameters
            )
            if model_parallel:
                wrapped.register_comm_hook(None, sum_gradients)
            self.modules[name] = wrapped
        return None

    def compute_forward(self, batch, stage):
        _, wavs, rel_lens, _ = batch
        wavs, rel_lens = wavs.to(self.device), rel_lens.to(self.device)
        if stage == sb.Stage.TRAIN and getattr(self.hparams, "augment", None) is not None:
            wavs = self.hparams.augment(wavs)
        return self.modules.embedder(wavs, rel_lens)

    def compute_objectives(self, embeddings, batch, stage):
        labels = batch[3].to(self.device)
        loss = self.modules.classifier(embeddings, labels)
        self.epoch_stats.add(self._head().stats)
        return loss

    def init_optimizers(self):
        """SpeechBrain's single optimizer, except for a model-parallel head, which gets its own.

        Each rank's optimizer state for such a head covers only its shard of the prototypes, so the
        head's checkpoint hooks store it, gathered like the prototypes, instead of rank 0's optimizer.
        """
        head = self._head()
        if not getattr(head, "model_parallel", False):
            return super().init_optimizers()
        head_parameters = {id(p) for p in head.parameters()}
        self.optimizer = self.opt_class([p for p in self.modules.parameters() if id(p) not in head_parameters])
        head.optimizer = self.opt_class(list(head.parameters()))
        self.optimizers_dict = {"opt_class": self.optimizer, "head": head.optimizer}
        if self.checkpointer is not None:
            self.checkpointer.add_recoverable("optimizer", self.optimizer)
        return None

    def on_fit_batch_start(self, batch, should_step):
        if should_step:  # the LR of the step about to be taken
            self.hparams.lr_scheduler.step(*self.optimizers_dict.values())

    def fit(
        self,
        epoch_counter,
        train_set,
        valid_set=None,
        progressbar=None,
        train_loader_kwargs={},  # noqa: B006
        valid_loader_kwargs=None,
    ):  # noqa: B006 (SpeechBrain's signature)
        """SpeechBrain's ``fit``; keeps the training set (to reseed its crops) and shuffles with our generator."""
        if valid_loader_kwargs is None:
            valid_loader_kwargs = {}
        self.train_set = train_set
        train_loader_kwargs = {**train_loader_kwargs, "generator": self.shuffle_generator}
        return super().fit(epoch_counter, train_set, valid_set, progressbar, train_loader_kwargs, valid_loader_kwargs)

    def on_stage_start(self, stage, epoch=None):
        if stage != sb.Stage.TRAIN or epoch is None:
            return
        if self.step == 0:  # a fresh epoch, not one resumed from an intra-epoch checkpoint
            self.epoch_stats.reset()
        self.train_set.set_epoch(epoch)
        if self.step > 0 and hasattr(self.train_set, "resume_after"):  # a stream: skip what this epoch consumed
            self.train_set.resume_after(self.step, self.hparams.batch_size)
        self.shuffle_generator.manual_seed(int(self.hparams.seed) * 1_000_003 + int(epoch))
        self._head().margin = self.hparams.margin_schedule(epoch)

    def on_stage_end(self, stage, stage_loss, epoch=None):
        if stage != sb.Stage.TRAIN:
            return
        stats = self.epoch_statistics(stage_loss)
        valid = self._validate(epoch, stats["loss"])
        self.hparams.train_logger.log_stats(stats_meta={"epoch": epoch}, train_stats=stats, valid_stats=valid)
        tensorboard = self._tensorboard_logger()
        if tensorboard is not None:
            tensorboard.log_stats(stats_meta={"epoch": epoch}, train_stats=stats, valid_stats=valid)
        self.checkpointer.save_and_keep_only(
            meta={"epoch": epoch, "loss": stage_loss, **checkpoint_meta(valid or {})},
            end_of_epoch=True,
            **retention(self.hparams.keep_checkpoints, bool(getattr(self.hparams, "keep_best_valid", False))),
            ckpt_predicate=lambda ckpt: ckpt.meta.get("end-of-epoch", False),
        )

    def _validate(self, epoch: int, train_loss: float) -> dict[str, float] | None:
        """The validation metrics of ``epoch`` (main process, when due; docs/training.md), and its curve row."""
        if self.validation is None or not sb.utils.distributed.if_main_process():
            return None
        valid = None
        if self.validation.due(epoch):
            valid = self.validation.score(_unwrap(self.modules.embedder), self.device).stats()
        self.validation.record(epoch, train_loss, valid or {})
        return valid

    def epoch_statistics(self, stage_loss: float) -> dict[str, float]:
        """Loss, LR, margin and the head's statistics of the epoch so far."""
        return {
            "loss": float(stage_loss),
            "lr": self.optimizer.param_groups[0]["lr"],
            "margin": self._head().margin,
            **self.epoch_stats.summary(),
        }

    def _tensorboard_logger(self):
        """SpeechBrain's TensorBoard logger when ``tensorboard_dir`` is set (main process only)."""
        folder = getattr(self.hparams, "tensorboard_dir", None)
        if folder is None or not sb.utils.distributed.if_main_process():
            return None
        if getattr(self, "_tensorboard", None) is None:
            from speechbrain.utils.train_logger import TensorboardLogger

            self._tensorboard = TensorboardLogger(folder)
        return self._tensorboard

    def _head(self) -> torch.nn.Module:
        """The head inside its DDP wrapper, if any."""
        return _unwrap(self.modules.classifier)
