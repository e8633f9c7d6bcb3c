"""Scoring runs on one experiment add to ``results.<backend>.json`` list by list."""

from __future__ import annotations

import json
import logging
import multiprocessing

import numpy as np
import pytest
import soundfile
import torch

from qmargin_spk.metrics import compute_metrics
from qmargin_spk.scoring import score_trial_lists, write_results

SR = 16000


def tone_embedder(wavs, rel_lens):
    """Energy in 8 frequency bands of each unpadded row."""
    lengths = torch.round(rel_lens * wavs.shape[1]).long()
    return torch.stack(
        [(torch.fft.rfft(w[:n], n=2048).abs() ** 2)[:512].reshape(8, -1).sum(1).log1p() for w, n in zip(wavs, lengths)]
    )


@pytest.fixture()
def lists(tmp_path):
    root = tmp_path / "wav"
    utts = []
    for s, frequency in enumerate((300.0, 900.0)):
        for n in range(3):
            utt = f"id{s}/v{n}/00001.wav"
            t = np.arange(int(0.3 * SR)) / SR
            noise = np.random.default_rng(10 * s + n).normal(scale=0.05, size=t.size)
            (root / utt).parent.mkdir(parents=True, exist_ok=True)
            soundfile.write(root / utt, (0.5 * np.sin(2 * np.pi * frequency * t) + noise).astype(np.float32), SR)
            utts.append(utt)
    lines = [f"{int(a[:3] == b[:3])} {a} {b}" for a in utts for b in utts if a < b]
    paths = {}
    for name, chosen in (("O", lines[::2]), ("E", lines[1::2]), ("H", lines)):
        paths[name] = tmp_path / f"{name}.txt"
        paths[name].write_text("\n".join(chosen) + "\n")
    return root, paths


def saved_lists(out):
    return [entry["list"] for entry in json.loads((out / "results.cosine.json").read_text())["results"]]


def test_runs_on_different_lists_keep_each_others_results(tmp_path, lists):
    root, paths = lists
    out = tmp_path / "scores"
    score_trial_lists(tone_embedder, "m1", root, {"O": paths["O"]}, out, print_table=False)
    second = score_trial_lists(tone_embedder, "m1", root, {"E": paths["E"], "H": paths["H"]}, out, print_table=False)
    assert saved_lists(out) == ["O", "E", "H"]
    assert [entry["list"] for entry in second["results"]] == ["O", "E", "H"]  # the run returns what the file holds
    table = (out / "results.cosine.md").read_text()
    assert all(f"| {name} | cosine |" in table for name in "OEH")

    # Re-scoring a list replaces its entry in place.
    paths["O"].write_text(paths["H"].read_text())
    score_trial_lists(tone_embedder, "m1", root, {"O": paths["O"]}, out, print_table=False)
    results = json.loads((out / "results.cosine.json").read_text())["results"]
    assert [r["list"] for r in results] == ["O", "E", "H"] and results[0]["n_trials"] == results[2]["n_trials"]


def test_results_of_another_model_are_not_mixed_in(tmp_path, lists, caplog):
    root, paths = lists
    out = tmp_path / "scores"
    score_trial_lists(tone_embedder, "m1", root, {"O": paths["O"]}, out, print_table=False)
    with caplog.at_level(logging.WARNING):
        score_trial_lists(tone_embedder, "m2", root, {"E": paths["E"]}, out, print_table=False)
    assert saved_lists(out) == ["E"] and "O" in caplog.text and "another model or other settings" in caplog.text


def _write_one(args):
    json_path, name, barrier = args
    barrier.wait()
    metrics = compute_metrics(np.r_[0.0, 1.0, 2.0, 3.0], np.r_[0, 0, 1, 1]).to_dict()
    run = {
        "model_id": "m",
        "backend": "cosine",
        "results": [{"list": name, "backend": "cosine", "n_trials": 4, "metrics": metrics}],
    }
    for _ in range(5):
        write_results(run, json_path, json_path.with_suffix(".md"))


def test_concurrent_writers_lose_no_list(tmp_path):
    json_path = tmp_path / "results.cosine.json"
    names = ["L0", "L1", "L2", "L3"]
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(len(names))
    workers = [context.Process(target=_write_one, args=((json_path, name, barrier),)) for name in names]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert [worker.exitcode for worker in workers] == [0] * len(names)
    assert sorted(r["list"] for r in json.loads(json_path.read_text())["results"]) == names


def test_run_identity_survives_the_json_round_trip(tmp_path):
    """Tuples in the run (e.g. settings) are lists once stored: still the same run."""
    metrics = compute_metrics(np.r_[0.0, 1.0, 2.0, 3.0], np.r_[0, 0, 1, 1]).to_dict()
    json_path = tmp_path / "results.cosine.json"
    for name in ("A", "B"):
        run = {
            "model_id": "m",
            "settings": {"fars": (0.01, 0.001)},
            "results": [{"list": name, "backend": "cosine", "n_trials": 4, "metrics": metrics}],
        }
        merged, _ = write_results(run, json_path, tmp_path / "results.cosine.md")
    assert [r["list"] for r in merged["results"]] == ["A", "B"]
