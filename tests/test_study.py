"""Studies: the spec's checks, a study killed and resumed on the tiny corpus, its report, grids and the demo's spec."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from qmargin_spk.cli import main as cli_main
from qmargin_spk.data.synthetic import PRESETS
from qmargin_spk.metrics import det_available
from qmargin_spk.scoring import write_score_file
from qmargin_spk.studies import load_spec, plan_runs, run_and_report
from qmargin_spk.training.learning_curves import write_curve_row

# The fastest settings that still train and score: 1 epoch of 6 steps, a 16-channel ECAPA, no stage-3 bootstrap.
FAST = {
    "number_of_epochs": 1,
    "warmup_epochs": 1,
    "batch_size": 8,
    "channels": 16,
    "embedding_dim": 16,
    "num_workers": 0,
    "bootstrap_resamples": 0,
}
POOLED_FIELDS = {"mean", "seed_std", "low", "high", "half_width", "n_seeds", "p_value"}
METRICS = {"eer", "min_dcf@0.01", "min_dcf@0.05", "tar_at_far@0.01", "tar_at_far@0.001", "tar_at_far@0.0001"}


def write_spec(path: Path, corpus, systems: dict, seeds: list[int], **more) -> Path:
    spec = {
        "train_root": str(corpus.train_root),
        "test_root": str(corpus.test_root),
        "trials": {"O": str(corpus.trials)},
        "seeds": seeds,
        "overrides": FAST,
        "systems": systems,
        **more,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(spec, indent=1))  # JSON is YAML
    return path


def one_error_line(capsys, argv: list[str]) -> str:
    assert cli_main(argv) == 1
    captured = capsys.readouterr()
    (line,) = captured.err.strip().splitlines()
    return line


def test_spec_mistakes_are_one_line_naming_the_file_system_and_key(corpus, tmp_path, capsys):
    out = ["--out", str(tmp_path / "out")]
    qmargin = {"hparams": str(REPO / "hparams" / "demo_cpu_qmargin.yaml")}
    # A grid key that the system's composed experiment does not have (alpha is Q-Margin's, not AAM's).
    aam = {**qmargin, "loss": "aam", "grid": {"alpha": [1, 2]}}
    spec = write_spec(tmp_path / "grid.yaml", corpus, {"q": qmargin, "aam": aam}, [1])
    line = one_error_line(capsys, ["study", str(spec), *out])
    assert str(spec) in line and "system 'aam'" in line and "grid key 'alpha'" in line
    # An unknown field of a system names the closest one.
    spec = write_spec(tmp_path / "field.yaml", corpus, {"q": {**qmargin, "gird": {"alpha": [1, 2]}}}, [1])
    line = one_error_line(capsys, ["study", str(spec), *out])
    assert str(spec) in line and "system 'q'" in line and "'gird'" in line and "did you mean 'grid'" in line
    # An override of no key, a missing experiment file, a baseline that is no system, repeated seeds.
    spec = write_spec(tmp_path / "over.yaml", corpus, {"q": {**qmargin, "overrides": {"chanels": 8}}}, [1])
    assert "system 'q'" in one_error_line(capsys, ["study", str(spec), *out])
    spec = write_spec(tmp_path / "file.yaml", corpus, {"q": {"hparams": "nope.yaml"}}, [1])
    assert "nope.yaml" in one_error_line(capsys, ["study", str(spec), *out])
    spec = write_spec(tmp_path / "base.yaml", corpus, {"q": qmargin}, [1], baseline="aam")
    assert "baseline 'aam'" in one_error_line(capsys, ["study", str(spec), *out])
    spec = write_spec(tmp_path / "seeds.yaml", corpus, {"q": qmargin}, [1, 1])
    assert "'seeds'" in one_error_line(capsys, ["study", str(spec), *out])
    spec = write_spec(tmp_path / "seed.yaml", corpus, {"q": {**qmargin, "grid": {"seed": [1, 2]}}}, [1])
    assert "'seed' is set by 'seeds'" in one_error_line(capsys, ["study", str(spec), *out])
    assert not (tmp_path / "out").exists()  # nothing ran


def fake_run(folder: Path, list_name: str, enrol, test, scores, labels, loss_settings: dict, speakers: dict) -> None:
    """A finished run's stage-3 output as stage 3 writes it: score file, speaker file, results naming the experiment."""
    (folder / "scores").mkdir(parents=True)
    write_score_file(folder / "scores" / f"{list_name}.cosine.scores", enrol, test, scores, labels)
    lines = "".join(f"{item} {speaker}\n" for item, speaker in sorted(speakers.items()))
    (folder / "scores" / f"{list_name}.speakers").write_text(lines)
    results = {
        "experiment": {"name": folder.name, "label": "qmargin", "loss": "qmargin", "loss_settings": loss_settings},
        "results": [{"list": list_name, "n_trials": len(labels)}],
    }
    (folder / "scores" / "results.cosine.json").write_text(json.dumps(results))


def test_a_grid_study_writes_its_ablation_table_and_plot(corpus, tmp_path):
    qmargin = {"hparams": str(REPO / "hparams" / "demo_cpu_qmargin.yaml"), "grid": {"alpha": [1.5, 2.0]}}
    aam = {"backbone": "ecapa_tdnn", "loss": "aam", "setting": "demo_cpu"}
    spec_file = write_spec(tmp_path / "spec.yaml", corpus, {"aam": aam, "qmargin": qmargin}, [1, 2])
    spec, out = load_spec(spec_file), tmp_path / "study"
    # Hand-made finished runs on 12 speakers: alpha 1.5 separates targets perfectly (EER 0), alpha 2 inverts
    # every score (EER 1), AAM is chance-like; the runner must start none of them. The items are clip ids
    # whose speaker only the recorded speaker file knows: the pooling resamples those 12 speakers.
    rng = np.random.default_rng(0)
    ids = [[f"clip{3 * s + u:03d}.wav" for u in range(3)] for s in range(12)]
    speakers = {item: f"speaker{s}" for s, items in enumerate(ids) for item in items}
    pairs = [(a, b, 1) for spk in ids for i, a in enumerate(spk) for b in spk[i + 1 :]]
    pairs += [(ids[s][0], ids[t][1], 0) for s in range(12) for t in range(12) if s != t]
    enrol, test, labels = zip(*pairs)
    labels = np.array(labels)
    runs = plan_runs(spec, out)
    assert [run.name for run in runs] == [
        "aam_seed1",
        "aam_seed2",
        "qmargin_alpha-1.5_seed1",
        "qmargin_alpha-1.5_seed2",
        "qmargin_alpha-2_seed1",
        "qmargin_alpha-2_seed2",
    ]
    for run in runs:
        alpha = run.point.values.get("alpha")
        noise = 0.01 * rng.random(labels.size)
        scores = {None: rng.random(labels.size), 1.5: labels + noise, 2.0: -labels - noise}[alpha]
        fake_run(run.folder, "trials", enrol, test, scores, labels, {"alpha": alpha or 1.0}, speakers)
        for epoch in (1, 2):  # runs that validated during training leave a learning curve
            write_curve_row(run.folder / "valid_curve.csv", epoch, 5.0 / epoch, {"eer": 0.3 / epoch})
    report = run_and_report(spec_file, out, n_resamples=50, log=lambda line: None)
    assert not (out / "prepare.log").exists()  # every run was finished: nothing prepared, nothing trained
    (entry,) = report["lists"]
    assert entry["n_speakers"] == 12
    assert entry["systems"]["qmargin_alpha-1.5"]["eer"]["mean"] == 0.0
    assert entry["systems"]["qmargin_alpha-2"]["eer"]["mean"] == 1.0
    differences = entry["differences"]
    assert differences["qmargin_alpha-1.5"]["eer"]["mean"] < 0 < differences["qmargin_alpha-2"]["eer"]["mean"]
    (ablation,) = report["ablations"]
    assert ablation["system"] == "qmargin" and ablation["keys"] == ["alpha"]
    assert ablation["header"][:2] == ["alpha", "O EER %"]
    assert [row[0] for row in ablation["rows"]] == ["1.5", "2.0"]
    assert ablation["rows"][0][1].startswith("0.00 ± 0.00") and ablation["rows"][1][1].startswith("100.00 ± 0.00")
    markdown = (out / "report.md").read_text()
    assert "## Ablation of qmargin over alpha" in markdown and "| 1.5 | 0.00 ± 0.00" in markdown
    if det_available():
        (plot,) = ablation["plots"]
        assert Path(plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Path(plot).name in markdown
        curves = Path(report["learning_curves"])  # the six runs' curves overlaid
        assert curves == out / "plots" / "learning_curves.png" and curves.read_bytes()[:4] == b"\x89PNG"
        assert "learning_curves.png" in markdown


def test_the_study_preset_has_the_speakers_and_non_targets_the_seeded_demo_needs():
    preset = PRESETS["study"]
    speakers, utts = preset["num_test_speakers"], preset["utts_per_test_speaker"]
    assert preset["num_trials"] is None  # every pair: the non-targets are all cross-speaker pairs
    non_targets = ((speakers * utts) ** 2 - speakers * utts**2) // 2
    assert speakers >= 200 and non_targets >= 10_000  # TAR@FAR=1e-3 needs 1000 non-targets; 10x that
    assert preset["num_train_speakers"] * preset["utts_per_train_speaker"] <= 60 * 30  # no bigger than the demo's


def demo_module():
    spec = importlib.util.spec_from_file_location("recipe_demo", REPO / "recipes" / "voxceleb" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_seeded_demo_writes_a_study_of_its_losses(corpus, tmp_path):
    demo = demo_module()
    spec = demo.study_spec(corpus, ["qmargin_sparse", "aam"], [1, 2], {"setting": "demo_cpu"}, ["--channels=16"])
    spec_file = tmp_path / "study.yaml"
    spec_file.write_text(json.dumps(spec))
    study = load_spec(spec_file)
    assert study.baseline == "aam" and study.seeds == [1, 2]
    assert study.systems["qmargin_sparse"].overrides == {"channels": 16, "head": "sparse"}
    assert study.systems["aam"].choices == {"setting": "demo_cpu", "loss": "aam"}
    entry = {"mean": -0.02, "low": -0.05, "high": 0.01, "p_value": 0.2, "n_seeds": 2}
    report = {"warnings": [], "baseline": "aam", "lists": [{"label": "test", "differences": {"q": {"eer": entry}}}]}
    assert demo.pooled_verdict(report) == (
        "test: q - aam EER -2.00 points [-5.00, +1.00] over 2 seeds, p = 0.200: "
        "no significant difference at the 5 % level (the interval covers zero).\n"
    )


@pytest.mark.e2e
def test_a_study_killed_mid_way_resumes_without_redoing_finished_runs(corpus, tmp_path, capsys):
    systems = {
        "aam": {"backbone": "ecapa_tdnn", "loss": "aam", "setting": "demo_cpu"},
        "qmargin": {"hparams": str(REPO / "hparams" / "demo_cpu_qmargin.yaml")},
    }
    spec = write_spec(tmp_path / "spec.yaml", corpus, systems, [1, 2, 3])
    out = tmp_path / "study"
    command = [sys.executable, "-m", "qmargin_spk.cli", "study", str(spec), "--out", str(out), "--jobs", "2"]
    runs = plan_runs(load_spec(spec), out)
    results = {run.name: run.folder / "scores" / "results.cosine.json" for run in runs}
    study = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while sum(path.is_file() for path in results.values()) < 2 and study.poll() is None and time.time() < deadline:
            time.sleep(0.1)
    finally:
        os.killpg(study.pid, signal.SIGKILL)  # the study and every run in flight
        study.wait()
    finished = {name: path.stat().st_mtime_ns for name, path in results.items() if path.is_file()}
    assert 2 <= len(finished) < len(runs)
    checkpoints = {name: sorted((out / "runs" / name / "save").glob("CKPT+*")) for name in finished}

    assert cli_main(["study", str(spec), "--out", str(out), "--jobs", "2", "--n_resamples", "50"]) == 0
    log = capsys.readouterr().out
    assert f"{len(runs)} runs, {len(finished)} finished, {len(runs) - len(finished)} to run" in log
    for name, mtime in finished.items():  # finished runs were not redone
        assert results[name].stat().st_mtime_ns == mtime
        assert sorted((out / "runs" / name / "save").glob("CKPT+*")) == checkpoints[name]
    threads = max(1, len(os.sched_getaffinity(0)) // 2)  # 2 jobs share the cores
    for run in runs:  # every run an ordinary experiment folder, trained with its seed and its share of the cores
        record = (run.folder / "hyperparams.yaml").read_text()
        assert f"\nseed: {run.seed}\n" in record and f"\nnum_threads: {threads}\n" in record

    report = json.loads((out / "report.json").read_text())
    assert report["seeds"] == [1, 2, 3] and report["baseline"] == "aam"
    assert report["warnings"] and "3 seed" in report["warnings"][0]  # below 5 seeds
    (entry,) = report["lists"]
    assert entry["label"] == "O" and entry["list"] == "trials"
    for label in ("aam", "qmargin"):
        assert set(entry["systems"][label]) == METRICS
        assert all(set(value) == POOLED_FIELDS for value in entry["systems"][label].values())
        # The pooled EER is the mean of the runs' own stage-3 EERs.
        eers = [
            json.loads(results[f"{label}_seed{seed}"].read_text())["results"][0]["metrics"]["eer"] for seed in (1, 2, 3)
        ]
        assert entry["systems"][label]["eer"]["mean"] == pytest.approx(np.mean(eers), abs=1e-12)
        assert entry["systems"][label]["eer"]["seed_std"] == pytest.approx(np.std(eers, ddof=1), abs=1e-12)
    (difference,) = entry["differences"].values()
    assert set(entry["differences"]) == {"qmargin"} and set(difference) == METRICS
    eer = difference["eer"]
    assert eer["low"] <= eer["mean"] <= eer["high"] and 0 <= eer["p_value"] <= 1
    assert entry["resolution"]["eer"]["qmargin"] == pytest.approx((eer["high"] - eer["low"]) / 2)
    markdown = (out / "report.md").read_text()
    for part in ("Paired differences to aam", "Smallest difference", "## Published layout", "O EER %", "Warning"):
        assert part in markdown
    assert report["learning_curves"] is None  # no run validated
    if det_available():  # each metric per system with its interval
        assert [Path(png).name for png in report["plots"]] == ["systems_trials.png"]
