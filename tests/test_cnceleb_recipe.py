"""The CN-Celeb recipe on a tiny fabricated corpus in CN-Celeb's released layout (FLAC files, lists as released)."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

from qmargin_spk.data.cnceleb import CnCelebError, prepare_cnceleb
from qmargin_spk.data.enrollment import read_enroll_map
from qmargin_spk.data.trials import read_trial_list

REPO = Path(__file__).resolve().parents[1]
SR = 16000
DEV, EVAL, CNC2 = ["id00000", "id00001", "id00002"], ["id00800", "id00801", "id00802"], ["id10000", "id10001"]


def voice(path: Path, speaker: int, seed: int, seconds: float = 1.0) -> np.ndarray:
    """A harmonic signal whose pitch is the speaker's, written as 16-bit FLAC."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    f0 = 90 + 17 * speaker
    wav = sum(np.sin(2 * np.pi * k * f0 * t + rng.random() * 6) / k for k in range(1, 6)) * 0.2
    wav = wav + 0.01 * rng.normal(size=t.size)
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, wav, SR, format="FLAC", subtype="PCM_16")
    return wav


def write(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))


@pytest.fixture(scope="module")
def cnceleb(tmp_path_factory):
    """CN-Celeb1 (3 dev + 3 eval speakers) and CN-Celeb2 (2 speakers) as released: lists name .wav, files are FLAC."""
    base = tmp_path_factory.mktemp("cnceleb")
    one, two = base / "CN-Celeb_flac", base / "CN-Celeb2_flac"
    seed = 0
    for i, spk in enumerate(DEV):
        for n in range(3):
            voice(one / "data" / spk / f"speech-01-00{n + 1}.flac", i, seed := seed + 1)
    for i, spk in enumerate(CNC2):
        for n in range(3):
            voice(two / "data" / spk / f"interview-0{n + 1}-001.flac", 10 + i, seed := seed + 1)
    write(one / "dev" / "dev.lst", DEV)
    write(two / "spk.lst", CNC2)
    enroll_lst, enroll_map, tests = [], [], []
    for i, spk in enumerate(EVAL):
        own = [voice(one / "data" / spk / f"singing-01-00{n + 1}.flac", 5 + i, seed := seed + 1) for n in range(4)]
        (one / "eval" / "enroll").mkdir(parents=True, exist_ok=True)
        (one / "eval" / "test").mkdir(parents=True, exist_ok=True)
        soundfile.write(one / "eval" / "enroll" / f"{spk}-enroll.flac", np.concatenate(own[:2]), SR, format="FLAC")
        for n in (3, 4):  # the test files are the speaker's 3rd and 4th utterances, as eval/test copies them
            soundfile.write(one / "eval" / "test" / f"{spk}-singing-01-00{n}.flac", own[n - 1], SR, format="FLAC")
            tests.append(f"test/{spk}-singing-01-00{n}.wav")
        enroll_lst.append(f"{spk}-enroll enroll/{spk}-enroll.wav")
        enroll_map.append(f"{spk}-enroll {spk}/singing-01-001.wav {spk}/singing-01-002.wav")
    lists = one / "eval" / "lists"
    write(lists / "enroll.lst", enroll_lst)
    write(lists / "test.lst", tests)
    write(lists / "enroll.map", enroll_map)
    trials = [f"{spk}-enroll {t} {int(t.startswith(f'test/{spk}-'))}" for spk in EVAL for t in tests]
    write(lists / "trials.lst", trials)
    return one, two


def rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_prepare_reads_the_released_layout(cnceleb, tmp_path):
    one, two = cnceleb
    written = prepare_cnceleb(one, two, tmp_path / "lists")
    train = rows(written.train_manifest)
    assert {r["spk"] for r in train} == {*DEV, *CNC2} and len(train) == 3 * 3 + 2 * 3
    assert all(Path(r["path"]).suffix == ".flac" and Path(r["path"]).is_file() for r in train)
    assert all(r["id"].startswith(r["spk"] + "/") for r in train)
    test = {r["id"]: r for r in rows(written.test_manifest)}
    assert {r["spk"] for r in test.values()} == set(EVAL)
    assert test["eval/test/id00801-singing-01-003"]["spk"] == "id00801"
    assert test["eval/enroll/id00802-enroll"]["path"].endswith("eval/enroll/id00802-enroll.flac")
    assert test["data/id00800/singing-01-002"]["spk"] == "id00800"
    # Both protocols: the same trials, with the concatenated file or the model id on the enrolment side.
    concat, average = read_trial_list(written.concat_trials), read_trial_list(written.average_trials)
    assert concat.form == average.form == "cnceleb" and len(concat) == len(average) == 3 * 6
    assert concat.labels.tolist() == average.labels.tolist() and concat.labels.sum() == 6
    assert concat.enrol[0] == "eval/enroll/id00800-enroll" and average.enrol[0] == "id00800-enroll"
    assert set(concat.test) <= set(test) and set(concat.enrol) <= set(test)
    models = read_enroll_map(written.enroll_map).models
    assert models["id00801-enroll"] == ("data/id00801/singing-01-001", "data/id00801/singing-01-002")
    assert set(read_enroll_map(written.enroll_map).utterances()) <= set(test)


def prepare_script():
    spec = importlib.util.spec_from_file_location("cnceleb_prepare", REPO / "recipes" / "cnceleb" / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_prepare_refuses_an_eval_speaker_in_training_and_a_missing_file(cnceleb, tmp_path, capsys):
    one, _ = cnceleb
    bad = tmp_path / "bad"
    bad.mkdir()
    for sub in ("data", "eval"):
        os.symlink(one / sub, bad / sub, target_is_directory=True)
    write(bad / "dev" / "dev.lst", [*DEV, "id00801"])
    with pytest.raises(CnCelebError, match=r"dev.lst: 1 speakers are also CN-Celeb1 evaluation speakers, e.g. id00801"):
        prepare_cnceleb(bad, None, tmp_path / "out")
    assert prepare_script()(["--cnceleb1", str(bad), "--out", str(tmp_path / "out")]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("prepare.py: error: ") and "id00801" in line and not (tmp_path / "out").exists()
    write(bad / "dev" / "dev.lst", DEV)
    (bad / "eval").unlink()
    (bad / "eval" / "lists").mkdir(parents=True)
    for name in ("enroll.lst", "trials.lst"):
        (bad / "eval" / "lists" / name).write_text((one / "eval" / "lists" / name).read_text())
    os.symlink(one / "eval" / "enroll", bad / "eval" / "enroll")
    with pytest.raises(CnCelebError, match=r"trials.lst:1: test/id00800-singing-01-003.wav is not under"):
        prepare_cnceleb(bad, None, tmp_path / "out")


@pytest.mark.e2e
def test_recipe_end_to_end_scores_both_protocols_and_trains_no_eval_speaker(cnceleb, tmp_path):
    one, two = cnceleb
    exp = tmp_path / "exp"
    tiny = ["--number_of_epochs=1", "--batch_size=4", "--channels=16", "--embedding_dim=16", "--bootstrap_resamples=20"]
    command = ["bash", str(REPO / "recipes" / "cnceleb" / "run.sh"), "--cnceleb1", str(one), "--cnceleb2", str(two)]
    command += ["--exp", str(exp), "--hparams", "hparams/demo_cpu_qmargin.yaml", "--stop_stage", "3", *tiny]
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    trained = {r["spk_id"] for r in rows(exp / "data" / "train.csv")}
    assert trained == {*DEV, *CNC2} and not trained & set(EVAL)
    classes = json.loads((exp / "save" / "label_encoder.json").read_text())["speakers"]  # the classes trained on
    assert set(classes) == {*DEV, *CNC2}
    results = json.loads((exp / "scores" / "results.cosine.json").read_text())
    entries = {entry["list"]: entry for entry in results["results"]}
    assert set(entries) == {"CNC-Eval-Concat", "CNC-Eval-Avg"} and results["settings"]["enroll_map"]
    for entry in entries.values():
        assert entry["n_trials"] == 18 and entry["intervals"]["bootstrap"]["n_speakers"] == 3
    table = (exp / "scores" / "results.cosine.md").read_text()
    assert "CNC-Eval-Concat" in table and "CNC-Eval-Avg" in table  # side by side
    speakers = dict(line.split() for line in (exp / "scores" / "CNC-Eval-Avg.speakers").read_text().splitlines())
    assert speakers["id00800-enroll"] == "id00800"
