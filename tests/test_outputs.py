"""Outputs for other tools and other test sets: embeddings as Kaldi ark/scp, .npz or .npy files (one writer for
``qmargin-spk embed`` and stage 3), and stage 3 on several test roots of one experiment."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import kaldiio
import numpy as np
import pytest
import torch

from conftest import stage_script, write_leftovers
from qmargin_spk.cli import main as cli_main
from qmargin_spk.scoring.compare import compare_experiments
from qmargin_spk.scoring.embedding_files import EmbeddingFileError, read_embeddings, write_embeddings
from qmargin_spk.scoring.scored_roots import (
    ROOTS_FILE,
    ScoredRoot,
    TestRootError,
    claim_root,
    record_root,
    scored_roots,
)
from qmargin_spk.stages.package import package_stage

REPO = Path(__file__).resolve().parents[1]


def embed(capsys, *argv) -> tuple[int, str]:
    status = cli_main([str(arg) for arg in argv])
    return status, capsys.readouterr().err


# --- qmargin-spk embed --out: ark/scp, npz, npy --------------------------------------------------


def test_embed_writes_ark_scp_npz_and_npy_folder_with_the_same_float32_bits(tiny_model, audio_dir, tmp_path, capsys):
    folder, _ = tiny_model
    scp = tmp_path / "wav.scp"
    scp.write_text(f"utt-b {audio_dir / 'b/1.wav'}\nspk_a/utt-1 {audio_dir / 'a/2.wav'}\n")
    out = tmp_path / "out"
    for target in (out / "e.npz", out / "e.ark", f"{out / 'npy'}/"):
        assert embed(capsys, "embed", "--model", folder, "--list", scp, "--out", target)[0] == 0
    stored = np.load(out / "e.npz")
    ids, reference = stored["ids"].tolist(), stored["embeddings"]
    assert ids == ["utt-b", "spk_a/utt-1"] and reference.dtype == np.float32
    # The scp names the final ark by its absolute path; kaldiio reads the same bits through either file.
    lines = (out / "e.scp").read_text().splitlines()
    assert [line.split(" ", 1)[0] for line in lines] == ids
    assert all(line.split(" ", 1)[1].rsplit(":", 1)[0] == str((out / "e.ark").resolve()) for line in lines)
    by_scp = kaldiio.load_scp(str(out / "e.scp"))
    by_ark = dict(kaldiio.load_ark(str(out / "e.ark")))
    for row, utt in enumerate(ids):
        for vector in (by_scp[utt], by_ark[utt]):
            assert vector.dtype == np.float32 and vector.tobytes() == reference[row].tobytes()
    # One .npy per utterance, named by the percent-encoded id.
    assert sorted(p.name for p in (out / "npy").iterdir()) == ["spk_a%2Futt-1.npy", "utt-b.npy"]
    assert np.load(out / "npy" / "spk_a%2Futt-1.npy").tobytes() == reference[1].tobytes()
    assert read_embeddings(out / "npy")[0] == ["spk_a/utt-1", "utt-b"]
    assert not write_leftovers(out)


@pytest.mark.parametrize(
    "name, message",
    [
        ("e.npy", "unknown embedding output '.npy'"),
        ("e.scp", "unknown embedding output '.scp'"),
        ("e.pt", "unknown embedding output '.pt'"),
        ("with space.ark", "holds whitespace, which a Kaldi key cannot"),  # ids are the file paths here
    ],
)
def test_an_output_it_cannot_write_is_one_line_before_any_embedding(audio_dir, tmp_path, capsys, name, message):
    spaced = tmp_path / "with space.wav"
    shutil.copy(audio_dir / "a/1.wav", spaced)
    status, err = embed(capsys, "embed", "--model", tmp_path / "not_a_model", spaced, "--out", tmp_path / name)
    (line,) = err.strip().splitlines()  # refused before the (missing) model is even loaded
    assert status == 1 and line.startswith("qmargin-spk: error: ") and message in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["with space.wav"]


def test_an_npy_folder_replaces_an_earlier_output_but_never_a_folder_holding_other_files(tmp_path):
    vectors = np.arange(6, dtype=np.float32).reshape(3, 2)
    write_embeddings(tmp_path / "embs", ["a", "b", "c"], vectors)
    write_embeddings(tmp_path / "embs", ["x"], vectors[:1] + 1)  # an earlier output is replaced whole
    ids, read = read_embeddings(tmp_path / "embs")
    assert ids == ["x"] and read.tolist() == [[1.0, 2.0]]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(EmbeddingFileError, match="holds files other than .npy"):
        write_embeddings(tmp_path / "mine", ["a"], vectors[:1])
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    with pytest.raises(EmbeddingFileError, match="ids must be unique"):
        write_embeddings(tmp_path / "d.npz", ["a", "a"], vectors[:2])


# --- stage 3 on several test roots --------------------------------------------------------------


def test_test_roots_are_placed_by_the_results_then_the_list_and_names_are_checked(tmp_path):
    scores = tmp_path / "scores"
    scores.mkdir()
    for root in ("A", "B c", "D"):
        (tmp_path / root).mkdir()
    # Scored before the list existed: the results name the first root (as its wav/ folder).
    (scores / "results.cosine.json").write_text(json.dumps({"test_root": str(tmp_path / "A" / "wav"), "results": []}))
    assert claim_root(scores, tmp_path / "A") == ScoredRoot(None, str(tmp_path / "A"), scores)
    other = claim_root(scores, tmp_path / "B c")
    assert other == ScoredRoot("B_c", str(tmp_path / "B c"), scores / "B_c") and other.list_label("x") == "x@B_c"
    assert not (scores / ROOTS_FILE).exists()  # recorded only once scored
    record_root(scores, other)
    assert [(r.name, Path(r.root).name) for r in scored_roots(scores)] == [(None, "A"), ("B_c", "B c")]
    with pytest.raises(TestRootError, match="'B_c' is taken by"):
        claim_root(scores, tmp_path / "D", "B_c")
    for bad in ("embeddings", "../up", ".hidden", "a b"):
        with pytest.raises(TestRootError, match="not a usable test name"):
            claim_root(scores, tmp_path / "D", bad)
    # Without results or list, the first root scored is the first.
    assert claim_root(tmp_path / "empty", tmp_path / "D").name is None


def few_trials(corpus, path: Path) -> Path:
    """One target and one non-target trial of the corpus's list: little to embed."""
    lines = Path(corpus.trials).read_text().splitlines()
    path.write_text("\n".join(next(line for line in lines if line[0] == label) for label in "10") + "\n")
    return path


@pytest.mark.e2e
def test_stage_3_scores_a_second_root_beside_the_first_and_compare_and_package_read_both(
    trained, corpus, tmp_path, capsys
):
    exp = Path(shutil.copytree(trained, tmp_path / "exp"))
    trials = few_trials(corpus, tmp_path / "few.txt")
    other = Path(shutil.copytree(corpus.test_root, tmp_path / "vox b"))  # same audio, another root
    score = stage_script("score")
    fast = ["--device=cpu", "--bootstrap_resamples=0"]

    def run(root, *extra) -> int:
        return score(["--exp", str(exp), "--test_root", str(root), "--trials", str(trials), *fast, *extra])

    assert run(corpus.test_root, "--embedding_format", "ark") == 0
    first = exp / "scores"
    results = (first / "results.cosine.json").read_bytes()
    cache = first / "embeddings" / "test.pt"
    stored = torch.load(cache, weights_only=True)
    # Stage 3's embeddings as ark/scp: the cache's float32 vectors, bit for bit, keyed by the trial items.
    exported = kaldiio.load_scp(str(first / "embeddings" / "test.scp"))
    assert list(exported) == stored["utt_ids"]
    assert all(exported[u].tobytes() == v.numpy().tobytes() for u, v in zip(stored["utt_ids"], stored["vectors"]))

    assert run(other, "--embedding_format", "npz") == 0  # its name: the folder's, made a plain name
    second = first / "vox_b"
    assert (first / "results.cosine.json").read_bytes() == results  # the first root's results are kept
    assert json.loads((second / "results.cosine.json").read_text())["test_root"].startswith(str(other))
    assert (second / "embeddings" / "test.pt").is_file() and (second / "embeddings" / "test.npz").is_file()
    assert (exp / "data" / "vox_b" / "test.csv").is_file()  # its test side prepared as stage 1 would
    ours = json.loads((second / "results.cosine.json").read_text())["results"][0]
    assert ours["metrics"] == json.loads(results)["results"][0]["metrics"]  # same audio, same scores
    # Scoring the first root again embeds nothing: its cache stays as it was (the second root's is its own).
    stamp = cache.stat().st_mtime_ns
    assert run(corpus.test_root) == 0 and cache.stat().st_mtime_ns == stamp
    # A name another root holds is refused with one line; so is another name for a root already scored.
    third = Path(shutil.copytree(corpus.test_root, tmp_path / "third"))
    capsys.readouterr()
    for root, name, words in ((third, "vox_b", "'vox_b' is taken by"), (other, "renamed", "was scored as")):
        assert run(root, "--test_name", name) == 1
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith("score.py: error: ") and words in line
    assert not (first / "renamed").exists() and not (first / "third").exists()

    summary = compare_experiments([exp], tmp_path / "compare", n_resamples=20)
    assert [entry["list"] for entry in summary["lists"]] == ["few", "few@vox_b"]
    package_stage(exp)
    info = json.loads((exp / "model" / "model.json").read_text())
    assert [(entry["list"], entry.get("test_name")) for entry in info["results"]] == [
        ("few", None),
        ("few@vox_b", "vox_b"),
    ]
