"""Shared fixtures: a tiny random-weight model composed like the demo experiment, packaged once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

DEMO_HPARAMS = Path(__file__).resolve().parents[1] / "hparams" / "demo_cpu_qmargin.yaml"
TINY = {"channels": 32, "embedding_dim": 16}
SR = 16000


def recipe_hparams(overrides: dict = TINY) -> dict:
    """The demo experiment's hparams, composed and loaded exactly as the training stage does it."""
    from qmargin_spk.stages.experiment import composed_hparams

    return composed_hparams(DEMO_HPARAMS, overrides=overrides)


def recipe_embedder(overrides: dict = TINY):
    """``embedder`` and ``embedding_model`` exactly as the composed demo experiment builds them."""
    hparams = recipe_hparams(overrides)
    return hparams["embedder"].eval(), hparams["embedding_model"]


def package_recipe_model(out_dir, overrides: dict = TINY, meta: dict | None = None):
    """``(model folder, embedder)``: a random-weight model of the composed demo experiment, packaged."""
    from qmargin_spk.inference import package_model

    hparams = recipe_hparams(overrides)
    embedder = hparams["embedder"].eval()
    folder = package_model(
        out_dir,
        hparams["frontend_description"],
        hparams["backbone_description"],
        hparams["embedding_model"].state_dict(),
        meta or {},
    )
    return folder, embedder


def write_wav(path, seconds, rate=SR, seed=0, channels=1):
    """A voiced-like test signal (harmonics plus noise) written as 16-bit PCM."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f0 = 100 + 50 * rng.random()
    wav = sum(np.sin(2 * np.pi * k * f0 * t + rng.random() * 6) / k for k in range(1, 6)) * 0.2
    wav = wav + 0.01 * rng.normal(size=t.size)
    data = wav if channels == 1 else np.stack([wav] * channels, axis=1)
    soundfile.write(path, data, rate, subtype="PCM_16")
    return Path(path)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """``(model folder, recipe embedder with the same weights)`` for a random-weight ECAPA (C=32, D=16)."""
    torch.manual_seed(0)
    meta = {
        "loss": "qmargin",
        "loss_settings": {"alpha": 1.5, "scale": 10.0, "margin": 0.2},
        "n_training_speakers": 3,
        "code_version": "test",
    }
    return package_recipe_model(tmp_path_factory.mktemp("models") / "tiny", TINY, meta)


@pytest.fixture(scope="session")
def audio_dir(tmp_path_factory):
    """Seven mono 16 kHz files of 0.5 to 20 s (two of equal length) under ``spk/``."""
    root = tmp_path_factory.mktemp("audio")
    (root / "a").mkdir()
    (root / "b").mkdir()
    lengths = {
        "a/1.wav": 0.5,
        "a/2.wav": 3.0,
        "a/3.wav": 3.0,
        "b/1.wav": 1.3,
        "b/2.wav": 20.0,
        "b/3.wav": 7.1,
        "a/4.wav": 2.2,
    }
    for seed, (name, seconds) in enumerate(lengths.items()):
        write_wav(root / name, seconds, seed=seed + (0 if name.startswith("a") else 100))
    return root


def fill_the_disk(monkeypatch, part: str = "") -> None:
    """Every atomic write of a file whose name holds ``part`` fails as on a full disk (ENOSPC at its fsync)."""
    import errno
    import os

    from qmargin_spk.utils import atomic

    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        name = os.readlink(f"/proc/self/fd/{fd}")
        if name.endswith(".tmp") and part in Path(name).name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", fsync)


def write_leftovers(folder) -> list[Path]:
    """Temporary files and staging or retired folders that a failed write could leave under ``folder``."""
    return [path for path in Path(folder).rglob(".*") if path.name.endswith((".tmp", ".old"))]
