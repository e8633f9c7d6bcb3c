"""The recipe's scoring stage: load the trained embedder from an experiment, embed, score, report."""
from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from pathlib import Path

import torch
from speechbrain.utils.checkpoints import average_checkpoints

from qmargin_spk.data.manifest import read_manifest
from qmargin_spk.scoring.pipeline import score_trial_lists
from qmargin_spk.training.checkpointing import last_checkpoints
from qmargin_spk.training.recipe import load_hparams

logger = logging.getLogger(__name__)


def load_trained_embedder(hparams: dict, device: str) -> tuple[torch.nn.Module, str]:
    """The embedder with the average of the last ``average_checkpoints`` checkpoints; returns it and a model id.

    The model id names the averaged checkpoints, so cached embeddings are reused only for the same weights.
    """
    checkpointer = hparams["checkpointer"]
    num = int(hparams.get("average_checkpoints", 1))
    checkpoints = last_checkpoints(checkpointer, num)
    hparams["embedding_model"].load_state_dict(average_checkpoints(checkpoints, "embedding_model"))
    used = [ckpt.path.name for ckpt in checkpoints]
    model_id = hashlib.sha1(("|".join([str(checkpointer.checkpoints_dir), *used])).encode()).hexdigest()[:16]
    logger.info("embedder: average of %s (model id %s)", used, model_id)
    return hparams["embedder"].to(device).eval(), model_id


def cohort_utterances(manifest: str | Path, per_speaker: int) -> tuple[dict[str, str], dict[str, str]]:
    """The first ``per_speaker`` training utterances (by id) of every speaker: paths and speakers."""
    by_speaker: dict[str, list] = defaultdict(list)
    for row in sorted(read_manifest(manifest), key=lambda r: r.id):
        if len(by_speaker[row.spk_id]) < per_speaker:
            by_speaker[row.spk_id].append(row)
    rows = [row for group in by_speaker.values() for row in group]
    return {row.id: row.wav for row in rows}, {row.id: row.spk_id for row in rows}


def score_experiment(hparams_file: str, overrides: str | dict = "", device: str | None = None) -> dict:
    """Embed every trial utterance with the experiment's model and write scores, metrics and plots."""
    hparams = load_hparams(hparams_file, overrides)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    embedder, model_id = load_trained_embedder(hparams, device)

    def embed(wavs: torch.Tensor, rel_lens: torch.Tensor) -> torch.Tensor:
        return embedder(wavs.to(device), rel_lens.to(device)).float().cpu()

    backend = hparams["score_backend"]
    cohort_paths = cohort_speakers = None
    if backend == "asnorm" or hparams.get("subtract_mean", False):
        cohort_paths, cohort_speakers = cohort_utterances(hparams["train_manifest"], hparams["cohort_utts_per_speaker"])
    return score_trial_lists(
        embed, model_id, Path(hparams["test_root"]) / "wav", hparams["trial_files"],
        Path(hparams["output_folder"]) / "scores", backend=backend,
        cohort_paths=cohort_paths, cohort_speakers=cohort_speakers, top_n=hparams["asnorm_top_n"],
        subtract_mean=hparams.get("subtract_mean", None) if cohort_paths is not None else False,
        batch_size=hparams["extract_batch_size"], chunk_seconds=hparams["extract_chunk_seconds"],
        sample_rate=hparams["sample_rate"],
    )
