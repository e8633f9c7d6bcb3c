"""The qmargin-spk command line: outputs against the library and the recipe's scoring stage; clean user errors."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import qmargin_spk
from qmargin_spk.cli import main
from qmargin_spk.inference import SpeakerModel
from qmargin_spk.scoring import read_score_file, score_trial_lists

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def model_dir(tiny_model, tmp_path):
    """A private copy of the tiny model folder (calibrate writes into it)."""
    return Path(shutil.copytree(tiny_model[0], tmp_path / "model"))


@pytest.fixture(scope="module")
def trials(audio_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("lists") / "mini.txt"
    lines = [
        "1 a/1.wav a/2.wav",
        "0 a/1.wav b/1.wav",
        "1 b/1.wav b/2.wav",
        "0 a/3.wav b/3.wav",
        "1 a/3.wav a/4.wav",
        "0 b/2.wav a/4.wav",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_cli(capsys, *argv):
    status = main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_embed_files_and_wav_scp(model_dir, audio_dir, tmp_path, capsys):
    files = [audio_dir / "a/1.wav", audio_dir / "b/2.wav"]
    status, out, _ = run_cli(capsys, "embed", "--model", model_dir, *files, "--out", tmp_path / "e.npz")
    assert status == 0 and "2 embeddings of size 16" in out
    stored = np.load(tmp_path / "e.npz")
    assert stored["ids"].tolist() == [str(f) for f in files]
    np.testing.assert_allclose(stored["embeddings"], SpeakerModel.from_folder(model_dir).embed(files), atol=1e-6)
    scp = tmp_path / "wav.scp"
    scp.write_text(f"x {files[1]}\n\ny {files[0]}\n")
    status, _, _ = run_cli(capsys, "embed", "--model", model_dir, "--list", scp, "--out", tmp_path / "s.npz")
    stored_scp = np.load(tmp_path / "s.npz")
    assert status == 0 and stored_scp["ids"].tolist() == ["x", "y"]
    np.testing.assert_allclose(stored_scp["embeddings"], stored["embeddings"][::-1], atol=1e-6)


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda d, t: ["embed", "--model", d, "--out", t / "o.npz"], "either audio files or --list"),
        (lambda d, t: ["embed", "--model", d, t / "missing.wav", "--out", t / "o.npz"], "missing.wav: no such audio"),
        (lambda d, t: ["embed", "--model", t, "x.wav", "--out", t / "o.npz"], "not a model folder"),
        (lambda d, t: ["embed", "--model", d, "--list", t / "bad.scp", "--out", t / "o.npz"], "bad.scp:2: expected"),
        (lambda d, t: ["calibrate", "--model", d, "--scores", t / "bad.scores"], "bad.scores:1: expected"),
        (lambda d, t: ["calibrate", "--model", d, "--scores", t / "bad.scores", "--quality"], "needs --root"),
        (lambda d, t: ["export", "--model", d, "--format", "torchscript", "--quantize", "int8"], "onnx only"),
        (lambda d, t: ["score", "--model", d, "--trials", t / "none.txt", "--root", t, "--out", t / "o"], "none.txt"),
        (
            lambda d, t: [
                "score",
                "--model",
                d,
                "--trials",
                t / "list.txt",
                "--root",
                t,
                "--out",
                t / "o",
                "--backend",
                "asnorm",
            ],
            "--backend asnorm needs --cohort",
        ),
        (
            lambda d, t: [
                "score",
                "--model",
                d,
                "--trials",
                t / "list.txt",
                "--root",
                t,
                "--out",
                t / "o",
                "--backend",
                "asnorm",
                "--cohort",
                t / "missing.csv",
            ],
            "missing.csv: no such cohort manifest",
        ),
        (
            lambda d, t: [
                "score",
                "--model",
                d,
                "--trials",
                t / "list.txt",
                "--root",
                t,
                "--out",
                t / "o",
                "--cohort",
                t / "bad.csv",
            ],
            "bad.csv:3: expected ID,wav,duration,spk_id",
        ),
    ],
)
def test_user_mistakes_end_with_one_line(model_dir, tmp_path, capsys, make_args, message):
    (tmp_path / "bad.scp").write_text("a x.wav\nb\n")
    (tmp_path / "bad.scores").write_text("a b 0.5\n")
    (tmp_path / "list.txt").write_text("1 a.wav b.wav\n")
    (tmp_path / "bad.csv").write_text("ID,wav,duration,spk_id\nu1,u1.wav,1.0,s1\nu2,u2.wav,long,s2\n")
    status, out, err = run_cli(capsys, *make_args(model_dir, tmp_path))
    assert status == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("qmargin-spk: error: ") and message in err


def test_verify_prints_score_llr_and_decision(model_dir, audio_dir, capsys):
    a, b = audio_dir / "a/1.wav", audio_dir / "a/2.wav"
    status, out, _ = run_cli(capsys, "verify", "--model", model_dir, a, b)
    expected = SpeakerModel.from_folder(model_dir).verify(a, b)
    assert status == 0
    assert f"score: {expected.score:.6f}" in out and "llr: n/a" in out and "decision: none" in out
    (model_dir / "calibration.json").write_text(
        json.dumps(
            {
                "format": 1,
                "kind": "logistic_regression",
                "inputs": ["score"],
                "weights": [10.0],
                "offset": 2.0 - 10.0 * expected.score,
                "prior": 0.5,
                "fit": {"model_identity": SpeakerModel.from_folder(model_dir).identity},  # fitted for this model
            }
        )
    )
    status, out, _ = run_cli(capsys, "verify", "--model", model_dir, a, b, "--p_target", "0.5")
    assert status == 0 and "llr: 2.0000" in out and "decision: same speaker at p_target 0.5" in out
    status, out, _ = run_cli(capsys, "verify", "--model", model_dir, a, b)
    assert "decision: different speakers at p_target 0.01" in out


def test_score_gives_the_scoring_stage_numbers(tiny_model, model_dir, audio_dir, trials, tmp_path, capsys):
    _, recipe_embedder = tiny_model
    reference = score_trial_lists(
        lambda wavs, lengths: recipe_embedder(wavs, lengths),
        "recipe",
        audio_dir,
        [trials],
        tmp_path / "stage",
        print_table=False,
    )
    status, out, _ = run_cli(
        capsys, "score", "--model", model_dir, "--trials", trials, "--root", audio_dir, "--out", tmp_path / "cli"
    )
    assert status == 0 and "| mini | cosine | 6 |" in out
    _, _, expected, labels = read_score_file(reference["results"][0]["score_file"])
    enrol, test, got, got_labels = read_score_file(tmp_path / "cli" / "mini.cosine.scores")
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert got_labels.tolist() == labels.tolist()
    assert not (tmp_path / "cli" / "results.cosine.calibrated.json").exists()


def write_manifest_csv(path, rows):
    """A training manifest as prepare writes it: ``ID,wav,duration,spk_id`` with absolute paths."""
    path.write_text("ID,wav,duration,spk_id\n" + "".join(f"{u},{w},{d:.6f},{s}\n" for u, w, d, s in rows))
    return path


def test_score_with_asnorm_and_a_cohort_gives_the_stage_3_numbers(model_dir, audio_dir, trials, tmp_path, capsys):
    from conftest import write_wav
    from qmargin_spk.scoring.cohort import cohort_utterances

    rows = []
    for speaker in range(4):
        for utt in (2, 0, 1):  # unsorted: the cohort takes the first utterances by id
            seconds, seed = 1.0 + 0.3 * utt + 0.1 * speaker, 200 + 10 * speaker + utt
            wav = write_wav(tmp_path / f"c{speaker}_{utt}.wav", seconds, seed=seed)
            rows.append((f"id{speaker}/v/{utt}", wav, 1.0, f"id{speaker}"))
    manifest = write_manifest_csv(tmp_path / "train.csv", rows)
    model = SpeakerModel.from_folder(model_dir)
    # Stage 3's call (qmargin_spk.stages.score.score_stage) with its hparams' values: asnorm_top_n 300,
    # cohort_utts_per_speaker 2, no subtract_mean key, extraction defaults.
    cohort_paths, cohort_speakers = cohort_utterances(manifest, 2)
    assert sorted(cohort_paths) == [f"id{s}/v/{u}" for s in range(4) for u in (0, 1)]
    reference = score_trial_lists(
        model.embed_batch,
        "stage",
        audio_dir,
        [str(trials)],
        tmp_path / "stage",
        backend="asnorm",
        cohort_paths=cohort_paths,
        cohort_speakers=cohort_speakers,
        top_n=300,
        subtract_mean=None,
        batch_size=16,
        chunk_seconds=None,
        sample_rate=model.sample_rate,
        max_batch_seconds=300.0,
        print_table=False,
    )
    assert reference["settings"]["subtract_mean"] and reference["settings"]["n_cohort_speakers"] == 4
    status, out, err = run_cli(
        capsys,
        "score",
        "--model",
        model_dir,
        "--trials",
        trials,
        "--root",
        audio_dir,
        "--out",
        tmp_path / "cli",
        "--backend",
        "asnorm",
        "--cohort",
        manifest,
        "--cohort_per_speaker",
        2,
    )
    assert status == 0, err
    assert "| mini | asnorm | 6 |" in out
    enrol, test, expected, labels = read_score_file(reference["results"][0]["score_file"])
    got_enrol, got_test, got, got_labels = read_score_file(tmp_path / "cli" / "mini.asnorm.scores")
    assert (got_enrol, got_test, got_labels.tolist()) == (enrol, test, labels.tolist())
    np.testing.assert_allclose(got, expected, atol=1e-6)
    cli_run = json.loads((tmp_path / "cli" / "results.asnorm.json").read_text())
    assert cli_run["settings"] == reference["settings"]
    run_cli(capsys, "score", "--model", model_dir, "--trials", trials, "--root", audio_dir, "--out", tmp_path / "cos")
    _, _, cosine, _ = read_score_file(tmp_path / "cos" / "mini.cosine.scores")
    assert np.abs(got - cosine).max() > 0.1  # AS-norm was applied, not the cosine


def test_calibrate_then_score_reports_calibrated_results(model_dir, audio_dir, trials, tmp_path, capsys):
    rng = np.random.default_rng(0)
    labels = rng.random(400) < 0.3
    scores = rng.normal(np.where(labels, 0.6, 0.1), 0.15)
    score_file = tmp_path / "fit.scores"
    score_file.write_text("".join(f"e{i} t{i} {float(s)!r} {int(y)}\n" for i, (s, y) in enumerate(zip(scores, labels))))
    status, out, _ = run_cli(capsys, "calibrate", "--model", model_dir, "--scores", score_file)
    assert status == 0
    stored = json.loads((model_dir / "calibration.json").read_text())
    before, after = stored["fit"]["cllr_before"], stored["fit"]["cllr_after"]
    assert after < before and f"Cllr before: {before:.4f}  after: {after:.4f}" in out
    assert stored["fit"]["model_sha256"] == json.loads((model_dir / "model.json").read_text())["checkpoint_sha256"]
    assert stored["fit"]["model_identity"] == SpeakerModel.from_folder(model_dir).identity

    status, out, _ = run_cli(
        capsys, "score", "--model", model_dir, "--trials", trials, "--root", audio_dir, "--out", tmp_path / "cli"
    )
    calibrated = json.loads((tmp_path / "cli" / "results.cosine.calibrated.json").read_text())
    metrics = calibrated["results"][0]["metrics"]
    assert status == 0 and {"cllr", "min_cllr", "act_dcf"} <= set(metrics) and "| mini | 6 |" in out
    _, _, raw, _ = read_score_file(tmp_path / "cli" / "mini.cosine.scores")
    _, _, llrs, _ = read_score_file(tmp_path / "cli" / "mini.cosine.llr.scores")
    np.testing.assert_allclose(llrs, stored["weights"][0] * raw + stored["offset"], atol=1e-9)


def test_calibrate_with_quality(model_dir, audio_dir, trials, tmp_path, capsys):
    run_cli(capsys, "score", "--model", model_dir, "--trials", trials, "--root", audio_dir, "--out", tmp_path / "s")
    cohort = tmp_path / "cohort.scp"
    cohort.write_text("".join(f"c{i} {p}\n" for i, p in enumerate(sorted(audio_dir.rglob("*.wav")))))
    status, out, err = run_cli(
        capsys,
        "calibrate",
        "--model",
        model_dir,
        "--scores",
        tmp_path / "s" / "mini.cosine.scores",
        "--quality",
        "--root",
        audio_dir,
        "--cohort",
        cohort,
        "--top_n",
        3,
    )
    assert status == 0, err
    assert "inputs: score, log_duration_enrol, log_duration_test, imposter_mean_enrol, imposter_mean_test" in out
    assert np.load(model_dir / "calibration_cohort.npy").shape == (7, 16)
    result = SpeakerModel.from_folder(model_dir).verify(audio_dir / "a/1.wav", audio_dir / "a/2.wav")
    assert result.llr is not None and np.isfinite(result.llr)


def test_export_onnx_from_the_command_line(model_dir, capsys):
    pytest.importorskip("onnxruntime")
    status, out, _ = run_cli(capsys, "export", "--model", model_dir, "--format", "onnx")
    assert status == 0 and (model_dir / "embedding_model.onnx").is_file()
    assert float(out.rsplit(":", 1)[1]) >= 0.9999


@pytest.mark.parametrize("command", ["embed", "verify", "score", "calibrate", "export", "compare"])
def test_help_of_each_command(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0 and f"usage: qmargin-spk {command}" in capsys.readouterr().out


def test_version_prints_the_installed_package_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out == f"qmargin-spk {importlib.metadata.version('qmargin_spk')}\n"
    assert qmargin_spk.__version__ == importlib.metadata.version("qmargin_spk")
    assert qmargin_spk.installed_version("no-such-distribution-qmargin") == "unknown"


def test_a_user_mistake_in_a_process_has_no_traceback(model_dir, tmp_path):
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "qmargin_spk.cli",
            "verify",
            "--model",
            str(model_dir),
            str(tmp_path / "a.wav"),
            str(tmp_path / "b.wav"),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().endswith("a.wav: no such audio file")


@pytest.mark.parametrize(
    "lines, first",
    [
        (["1 a/1.wav a/2.wav", "0 a/1.wav b/8.wav", "0 a/2.wav b/9.wav"], "list.txt:2: b/8.wav (and 1 more)"),
        (["1 a/1.wav a/2.wav", "0 a/1.wav bad/1.wav", "0 a/2.wav bad/2.wav"], "bad/1.wav: unreadable audio"),
    ],
    ids=["missing trial files", "unreadable audio"],
)
def test_an_error_listing_many_files_is_one_line_naming_the_first_and_counting_the_rest(
    model_dir, audio_dir, tmp_path, capsys, lines, first
):
    root = Path(shutil.copytree(audio_dir, tmp_path / "root"))
    (root / "bad").mkdir()
    (root / "bad" / "1.wav").write_bytes(b"")
    (root / "bad" / "2.wav").write_bytes(b"RIFF")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    argv = ["score", "--model", model_dir, "--trials", tmp_path / "list.txt", "--root", root, "--out", tmp_path / "o"]
    status, out, err = run_cli(capsys, *argv)
    assert status == 1 and err.count("\n") == 1
    assert first in err and err.rstrip().endswith("(and 1 more)")


def test_a_full_disk_while_scoring_is_one_line_naming_the_file_not_written(
    model_dir, audio_dir, tmp_path, capsys, monkeypatch
):
    from conftest import fill_the_disk, write_leftovers

    few = tmp_path / "few.txt"  # two short trials: little to embed
    few.write_text("1 a/2.wav a/4.wav\n0 a/2.wav b/1.wav\n")
    fill_the_disk(monkeypatch, "results")
    out_dir = tmp_path / "out"
    argv = ["score", "--model", model_dir, "--trials", few, "--root", audio_dir, "--out", out_dir]
    status, _, err = run_cli(capsys, *argv)
    assert status == 1 and "Traceback" not in err
    last = err.splitlines()[-1]  # after the progress bar
    assert last == f"qmargin-spk: error: {out_dir}/results.cosine.json: not written (No space left on device)"
    assert not write_leftovers(out_dir) and not (out_dir / "results.cosine.json").exists()


def test_one_line_of_a_long_list_keeps_its_first_file_and_counts_the_rest():
    from qmargin_spk.utils.messages import one_line

    listed = "\n".join(f"  lists/t.txt:{n}: a/{n}.wav" for n in range(1, 11))
    err = FileNotFoundError(f"25 of 40 utterances are missing under /root:\n{listed}\n  ... and 15 more")
    assert one_line(err) == "25 of 40 utterances are missing under /root: lists/t.txt:1: a/1.wav (and 24 more)"
    single = "list.txt:3: label must be 0 or 1, got '2'"
    assert one_line(ValueError(single)) == single
