"""Shared fixtures: a tiny random-weight model built from the demo hparams' model section, packaged once."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from hyperpyyaml import load_hyperpyyaml

DEMO_HPARAMS = Path(__file__).resolve().parents[1] / "hparams" / "demo_cpu_qmargin.yaml"
TINY = {"channels": 32, "embedding_dim": 16}
SR = 16000


def recipe_embedder(overrides: dict = TINY):
    """``embedder`` and ``embedding_model`` exactly as the recipe's demo hparams build them (model section only)."""
    text = DEMO_HPARAMS.read_text()
    section = text[text.index("# ---- model ----") : text.index("# ---- optimisation")]
    hparams = load_hyperpyyaml("sample_rate: 16000\n" + section, overrides)
    return hparams["embedder"].eval(), hparams["embedding_model"]


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
    from qmargin_spk.inference import ecapa_settings, package_model

    torch.manual_seed(0)
    embedder, embedding_model = recipe_embedder()
    meta = {"loss": "qmargin", "loss_hparams": {"alpha": 1.5, "scale": 10.0, "margin": 0.2},
            "n_training_speakers": 3, "code_version": "test"}
    folder = package_model(tmp_path_factory.mktemp("models") / "tiny", ecapa_settings(embedding_model, SR),
                           embedding_model.state_dict(), meta)
    return folder, embedder


@pytest.fixture(scope="session")
def audio_dir(tmp_path_factory):
    """Seven mono 16 kHz files of 0.5 to 20 s (two of equal length) under ``spk/``."""
    root = tmp_path_factory.mktemp("audio")
    (root / "a").mkdir()
    (root / "b").mkdir()
    lengths = {"a/1.wav": 0.5, "a/2.wav": 3.0, "a/3.wav": 3.0, "b/1.wav": 1.3, "b/2.wav": 20.0, "b/3.wav": 7.1,
               "a/4.wav": 2.2}
    for seed, (name, seconds) in enumerate(lengths.items()):
        write_wav(root / name, seconds, seed=seed + (0 if name.startswith("a") else 100))
    return root
