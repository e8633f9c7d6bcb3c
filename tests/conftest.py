"""Shared fixtures: a tiny random-weight model composed like the demo experiment, packaged once."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

REPO = Path(__file__).resolve().parents[1]
DEMO_HPARAMS = REPO / "hparams" / "demo_cpu_qmargin.yaml"
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


def speech_like(batch: int, seconds: float, seed: int) -> np.ndarray:
    """Harmonic signals with random pitch plus noise, one row per utterance (float32, ``[batch, samples]``)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    rows = [
        sum(np.sin(2 * np.pi * k * (90 + 150 * rng.random()) * t) / k for k in range(1, 6)) * 0.2
        + 0.02 * rng.normal(size=t.size)
        for _ in range(batch)
    ]
    return np.stack(rows).astype(np.float32)


def assert_demo_experiment_takes_a_training_step(
    experiment_file, loss: str, description: dict, model_class: type, parameters: int
) -> None:
    """The composed experiment builds ``model_class`` with ``parameters`` from ``description`` and a head
    computing ``loss``; one training step has finite gradients on every backbone parameter."""
    from qmargin_spk.models import count_parameters
    from qmargin_spk.stages.experiment import composed_hparams

    hparams = composed_hparams(experiment_file)
    assert hparams["backbone_description"] == description
    embedder, model = hparams["embedder"].train(), hparams["embedding_model"]
    assert isinstance(model, model_class) and count_parameters(model) == parameters
    head = hparams["classifier"](num_classes=5, embedding_dim=hparams["embedding_dim"])
    assert head.loss_settings()["loss"] == loss
    torch.manual_seed(0)
    value = head(embedder(torch.randn(4, 8000), torch.tensor([1.0, 1.0, 0.8, 0.6])), torch.tensor([0, 1, 2, 4]))
    value.backward()
    assert value.ndim == 0 and torch.isfinite(value)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


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


@pytest.fixture(scope="module")
def wespeaker_models() -> Iterator[types.SimpleNamespace]:
    """``wespeaker.models.resnet`` and ``.campplus`` without the package's CLI dependencies (bare namespace parents).

    Skips when the reference is not installed (``make install`` adds it with ``--no-deps``).
    """
    spec = importlib.util.find_spec("wespeaker")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("reference absent: pip install --no-deps wespeaker-unofficial==0.0.2")
    root = list(spec.submodule_search_locations)[0]
    saved = {name: module for name, module in sys.modules.items() if name.split(".")[0] == "wespeaker"}
    for name, folder in (("wespeaker", root), ("wespeaker.frontend", f"{root}/frontend")):
        namespace = types.ModuleType(name)
        namespace.__path__ = [folder]
        sys.modules[name] = namespace
    try:
        yield types.SimpleNamespace(
            resnet=importlib.import_module("wespeaker.models.resnet"),
            campplus=importlib.import_module("wespeaker.models.campplus"),
        )
    finally:
        for name in [name for name in sys.modules if name.split(".")[0] == "wespeaker"]:
            del sys.modules[name]
        sys.modules.update(saved)


def randomise_batchnorm(model: torch.nn.Module, seed: int, frames: int = 120, feat_dim: int = 80) -> None:
    """Random affine parameters, then running statistics from one gradient-free train-mode pass; eval mode.

    With random initialisation every BatchNorm is the identity in eval mode, so a wrong key mapping
    would go unseen by a parity test; this makes every BatchNorm count.
    """
    generator = torch.Generator().manual_seed(seed)
    norms = [module for module in model.modules() if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for norm in norms:
            if norm.affine:
                norm.weight.copy_(0.5 + torch.rand(norm.weight.shape, generator=generator))
                norm.bias.copy_(0.2 * torch.randn(norm.bias.shape, generator=generator))
            norm.momentum = 1.0
        model.train()
        model(2.0 * torch.randn(2, frames, feat_dim, generator=generator) + 0.5)
        for norm in norms:
            norm.momentum = 0.1
    model.eval()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """The tiny synthetic corpus, generated once; tests read it and prepare their own copies of its lists."""
    from qmargin_spk.data.synthetic import PRESETS, generate_corpus

    return generate_corpus(tmp_path_factory.mktemp("corpus"), seed=3, num_workers=1, **PRESETS["tiny"])


@pytest.fixture()
def prepared(corpus, tmp_path):
    """An experiment folder whose ``data/`` holds the tiny corpus prepared (stage 1)."""
    from qmargin_spk.data.prepare import prepare

    prepare([corpus.train_root], corpus.test_root, [corpus.trials], tmp_path / "data", num_workers=1)
    return tmp_path


@pytest.fixture(scope="session")
def trained(corpus, tmp_path_factory) -> Path:
    """A finished one-epoch run of the demo experiment (tiny sizes) with its manifests in EXP/data, as run.sh lays
    it out; trained once per session: copy it before changing anything in it."""
    from qmargin_spk.data.prepare import prepare
    from qmargin_spk.stages.train import train_stage

    exp = tmp_path_factory.mktemp("trained") / "exp"
    prepare([corpus.train_root], corpus.test_root, [corpus.trials], exp / "data", num_workers=1)
    tiny = {"batch_size": 8, "channels": 16, "embedding_dim": 16, "num_workers": 0, "warmup_epochs": 1}
    train_stage(exp, DEMO_HPARAMS, {"device": "cpu", "noprogressbar": True}, None, {**tiny, "number_of_epochs": 1})
    return exp


def stage_script(name: str):
    """The ``main(argv)`` of a recipe stage script, run in this process (what run.sh runs as a command)."""
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", REPO / "recipes" / "voxceleb" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main
