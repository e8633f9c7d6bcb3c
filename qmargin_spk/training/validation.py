"""Validation during training: the validation list scored with the model being trained, every ``valid_every`` epochs.

The list is the one stage 1 wrote to the data folder (``valid.csv`` and ``valid_trials.txt``,
:mod:`qmargin_spk.data.validation_split`): held-out training speakers or a given list, never a
test list; nothing here reads the test data. Each validation embeds every validation utterance
whole with the embedder in eval mode (the extraction of the scoring stage, without its cache),
scores the trials by cosine similarity and measures EER and minDCF with the metrics of the
results files. The random generators are left as they were, so validating does not change the
training run. The metrics go to the epoch log, TensorBoard, the checkpoint's meta (so that
``keep_best_valid`` can keep and average the best checkpoints) and the learning curve
(``valid_curve.csv`` every epoch; its plot ``valid_curve.png`` when training ends;
:mod:`qmargin_spk.training.learning_curves`).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from speechbrain.utils.checkpoints import Checkpoint, Checkpointer

from qmargin_spk.data.manifest import read_manifest, utterance_id
from qmargin_spk.data.trials import check_trial_labels, read_trial_list
from qmargin_spk.metrics import DEFAULT_P_TARGETS, VerificationMetrics, compute_metrics
from qmargin_spk.scoring.backends import cosine_scores
from qmargin_spk.scoring.embeddings import extract_embeddings
from qmargin_spk.training.learning_curves import plot_learning_curves, write_curve_row

logger = logging.getLogger(__name__)

# The checkpoint meta key that keep_best_valid ranks by (lower is better).
RANK_KEY = "valid_eer"


@dataclass(frozen=True)
class ValidationScores:
    """One validation: the trials' cosine scores, their labels and the metrics."""

    scores: np.ndarray
    labels: np.ndarray
    metrics: VerificationMetrics

    def stats(self) -> dict[str, float]:
        """``eer`` and ``min_dcf_<p_target>`` (normalised), as the log, TensorBoard and the curve show them."""
        min_dcf = {f"min_dcf_{entry.p_target:g}": entry.value for entry in self.metrics.min_dcf}
        return {"eer": self.metrics.eer, **min_dcf}


class EpochValidation:
    """Scores the validation list (``manifest`` + ``trials``) every ``every`` epochs; writes the learning curve.

    Build it with :meth:`from_hparams`, which returns None when validation is off (``valid_every``
    0 or null, or no validation list in the data folder).
    """

    def __init__(
        self,
        manifest: str | Path,
        trials: str | Path,
        every: int,
        curve: str | Path | None = None,
        sample_rate: int = 16000,
        batch_size: int = 16,
        max_batch_seconds: float = 300.0,
        p_targets: Sequence[float] = DEFAULT_P_TARGETS,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"valid_every must be a positive integer (0 or null: no validation), got {every!r}")
        self.every = every
        self.curve = None if curve is None else Path(curve)
        self.sample_rate = sample_rate
        self.batch_size = batch_size
        self.max_batch_seconds = max_batch_seconds
        self.p_targets = tuple(p_targets)
        rows = {row.id: row.wav for row in read_manifest(manifest)}
        self.trials = read_trial_list(trials)
        check_trial_labels([self.trials])
        self.enrol = np.array([utterance_id(entry) for entry in self.trials.enrol.tolist()], dtype=str)
        self.test = np.array([utterance_id(entry) for entry in self.trials.test.tolist()], dtype=str)
        used = set(self.enrol.tolist()) | set(self.test.tolist())
        absent = sorted(used - set(rows))
        if absent:
            raise ValueError(f"{trials}: {len(absent)} utterances are not in {manifest}, e.g. {absent[0]}")
        self.paths = {utt: wav for utt, wav in rows.items() if utt in used}

    @classmethod
    def from_hparams(cls, hparams: Mapping) -> EpochValidation | None:
        """The validation the hparams ask for, or None (``valid_every`` off, or no list in the data folder)."""
        every = hparams.get("valid_every")
        manifest, trials = hparams.get("valid_manifest"), hparams.get("valid_trials")
        if not every or manifest is None or trials is None:
            return None
        if not Path(manifest).is_file() or not Path(trials).is_file():
            logger.info("no validation list in the data folder (%s): training without validation", manifest)
            return None
        return cls(
            manifest,
            trials,
            every,
            curve=hparams.get("valid_curve"),
            sample_rate=int(hparams.get("sample_rate", 16000)),
            batch_size=int(hparams.get("extract_batch_size", 16)),
            max_batch_seconds=float(hparams.get("extract_max_batch_seconds", 300.0)),
        )

    def due(self, epoch: int) -> bool:
        """Whether ``epoch`` (1-based) is validated: every ``every``-th one."""
        return epoch % self.every == 0

    def score(self, embedder: torch.nn.Module, device: str | torch.device = "cpu") -> ValidationScores:
        """Embed the validation utterances with ``embedder`` (eval mode, then back) and score the list.

        The global random generators (Python, NumPy, torch) are restored afterwards.
        """
        was_training = embedder.training
        python_state, numpy_state = random.getstate(), np.random.get_state()
        embedder.eval()
        try:
            with torch.random.fork_rng(devices=[]), torch.no_grad():

                def embed(wavs: torch.Tensor, rel_lens: torch.Tensor) -> torch.Tensor:
                    return embedder(wavs.to(device), rel_lens.to(device)).float().cpu()

                table = extract_embeddings(
                    self.paths,
                    embed,
                    None,
                    "training",
                    batch_size=self.batch_size,
                    sample_rate=self.sample_rate,
                    max_batch_seconds=self.max_batch_seconds,
                )
        finally:
            embedder.train(was_training)
            random.setstate(python_state)
            np.random.set_state(numpy_state)
        scores = cosine_scores(table.vectors, table.indices(self.enrol), table.indices(self.test))
        labels = self.trials.labels
        return ValidationScores(scores, labels, compute_metrics(scores, labels, p_targets=self.p_targets))

    def record(self, epoch: int, train_loss: float, stats: Mapping[str, float]) -> None:
        """Write the epoch's row of the learning curve (empty validation cells when ``stats`` is)."""
        if self.curve is not None:
            write_curve_row(self.curve, epoch, train_loss, stats)

    def plot(self) -> None:
        """Draw the learning curve (``.png`` beside the CSV; the training stage calls it when training ends)."""
        if self.curve is None or not self.curve.is_file():
            return
        if not plot_learning_curves({"": self.curve}, self.curve.with_suffix(".png"), title=self.curve.parent.name):
            logger.info("no learning-curve plot: matplotlib is not installed (pip install matplotlib)")


def checkpoint_meta(stats: Mapping[str, float]) -> dict[str, float]:
    """The validation metrics as checkpoint meta keys (``valid_eer``, ``valid_min_dcf_0.01`` ...)."""
    return {f"valid_{key}": float(value) for key, value in stats.items()}


def retention(keep: int, keep_best_valid: bool) -> dict:
    """``save_and_keep_only`` arguments: the last ``keep`` checkpoints, and with ``keep_best_valid`` the best ``keep``.

    Fresh lists on every call (SpeechBrain appends to the list it is given).
    """
    min_keys = [RANK_KEY] if keep_best_valid else []
    return {"num_to_keep": keep, "keep_recent": True, "importance_keys": [], "min_keys": min_keys}


def best_valid_checkpoints(checkpointer: Checkpointer, num: int) -> list[Checkpoint]:
    """The ``num`` end-of-epoch checkpoints with the lowest validation EER (ties: the later one), oldest first.

    Empty when no checkpoint holds a validation metric.
    """
    validated = checkpointer.find_checkpoints(
        ckpt_predicate=lambda ckpt: ckpt.meta.get("end-of-epoch", True) and RANK_KEY in ckpt.meta,
        max_num_checkpoints=None,
    )
    best = sorted(validated, key=lambda ckpt: (ckpt.meta[RANK_KEY], -ckpt.meta["unixtime"]))[:num]
    return sorted(best, key=lambda ckpt: ckpt.meta["unixtime"])
