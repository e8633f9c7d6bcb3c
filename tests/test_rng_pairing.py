"""Runs of different losses with one seed are paired: same backbone, same data, same augmentation (docs/training.md).

Backbone, head and augmentation draw from generators of their own, derived from the run's seed
(``qmargin_spk/utils/seeds.py``); the augmenter's is saved in checkpoints by ``RNGState``.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from conftest import REPO
from qmargin_spk.data.augment import WaveformAugmenter
from qmargin_spk.training.brain import SpeakerBrain
from qmargin_spk.training.checkpointing import RNGState
from qmargin_spk.utils.seeds import component_seed, seeded_global_rng


def test_component_seeds_follow_the_documented_derivation():
    expected = int.from_bytes(hashlib.sha256(b"qmargin-spk/augment/1986").digest()[:8], "big") >> 1
    assert component_seed(1986, "augment") == expected
    seeds = {component_seed(seed, name) for seed in (1, 2, 1986) for name in ("head", "augment")}
    assert len(seeds) == 6 and all(0 <= s < 2**63 for s in seeds)
    with pytest.raises(ValueError, match="unknown component 'optimiser'"):
        component_seed(1, "optimiser")


def test_a_seeded_block_leaves_the_global_generator_where_it_was():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    with seeded_global_rng(7):
        inside = torch.rand(1000)
    assert torch.equal(torch.rand(3), expected)
    assert torch.equal(inside, torch.rand(1000, generator=torch.Generator().manual_seed(7)))


def test_rng_state_saves_and_restores_the_augmenter_generator(tmp_path):
    augmenter = WaveformAugmenter(seed=component_seed(3, "augment"))
    torch.rand(5, generator=augmenter.generator)
    RNGState({"augment": augmenter}).save(tmp_path / "rng.ckpt")
    expected = torch.rand(5, generator=augmenter.generator)
    resumed = WaveformAugmenter(seed=component_seed(3, "augment"))  # a new process builds it afresh
    RNGState({"augment": resumed}).load(tmp_path / "rng.ckpt")
    assert torch.equal(torch.rand(5, generator=resumed.generator), expected)


def test_a_checkpoint_from_before_the_augmenter_generator_leaves_it_seeded(tmp_path, caplog):
    RNGState().save(tmp_path / "old.ckpt")
    augmenter = WaveformAugmenter(seed=11)
    RNGState({"augment": augmenter}).load(tmp_path / "old.ckpt")
    assert torch.equal(
        torch.rand(4, generator=augmenter.generator), torch.rand(4, generator=torch.Generator().manual_seed(11))
    )
    assert "holds no state for the augment generator" in caplog.text


class _FirstBatch(Exception):
    pass


@pytest.mark.e2e
def test_first_augmented_batch_and_backbone_are_paired_across_head_sizes(prepared, monkeypatch):
    """Q-Margin (C prototypes) and sub-center AAM (3 C): one seed, one backbone, one first augmented batch."""
    from qmargin_spk.stages.train import train_stage

    seen, running = {}, []

    def first_batch(self, batch):
        _, wavs, _, labels = batch
        seen[running[-1]] = {
            "labels": labels.clone(),
            "wavs": wavs.clone(),
            "augmented": self.hparams.augment(wavs),  # exactly what compute_forward draws for this batch
            "backbone": {key: value.clone() for key, value in self.modules.embedder.state_dict().items()},
            "head_size": sum(p.numel() for p in self._head().parameters()),
        }
        raise _FirstBatch

    monkeypatch.setattr(SpeakerBrain, "fit_batch", first_batch)
    run_opts = {"device": "cpu", "noprogressbar": True}
    for loss in ("qmargin", "subcenter_aam"):
        overrides = {
            "output_folder": str(prepared / loss),
            "data_folder": str(prepared / "data"),
            "batch_size": 8,
            "channels": 16,
            "embedding_dim": 16,
            "num_workers": 0,
            "number_of_epochs": 1,
        }
        running.append(loss)
        with pytest.raises(_FirstBatch):
            train_stage(prepared / loss, REPO / "hparams" / f"demo_cpu_{loss}.yaml", run_opts, None, overrides)
    qmargin, subcenter = seen["qmargin"], seen["subcenter_aam"]
    assert subcenter["head_size"] > 2 * qmargin["head_size"]  # K = 3 prototypes per class
    assert torch.equal(qmargin["labels"], subcenter["labels"]) and torch.equal(qmargin["wavs"], subcenter["wavs"])
    assert not torch.equal(qmargin["augmented"], qmargin["wavs"])  # augmentation did draw something
    assert torch.equal(qmargin["augmented"], subcenter["augmented"])
    assert qmargin["backbone"].keys() == subcenter["backbone"].keys()
    for key, value in qmargin["backbone"].items():
        assert torch.equal(value, subcenter["backbone"][key]), key
