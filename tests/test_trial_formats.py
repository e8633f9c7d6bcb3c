"""Trial lists in VoxCeleb, Kaldi and CN-Celeb form; enrollment models; the real speaker map in scoring and compare."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile
import torch

from qmargin_spk.data.enrollment import read_enroll_map
from qmargin_spk.data.trials import read_trial_list
from qmargin_spk.metrics import SpeakerBootstrap
from qmargin_spk.scoring import compare_experiments, score_trial_lists
from qmargin_spk.scoring.cohort import cohort_means
from qmargin_spk.scoring.embeddings import EmbeddingTable
from qmargin_spk.scoring.test_set import TestUtterances

SR = 16000
DIM = 8
PROJECTION = np.random.default_rng(7).normal(size=(64, DIM))


def write(path, lines):
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


# ---------------------------------------------------------------- forms


def test_three_forms_read_alike(tmp_path):
    trials = [(1, "a/1.wav", "a/2.wav"), (0, "a/1.wav", "b/1.wav"), (0, "b/1.wav", "a/2.wav")]
    vox = write(tmp_path / "vox.txt", [f"{y} {e} {t}" for y, e, t in trials])
    kaldi = write(tmp_path / "kaldi.txt", [f"{e} {t} {'target' if y else 'nontarget'}" for y, e, t in trials])
    cnc = write(tmp_path / "cnc.lst", [f"{e} {t} {y}" for y, e, t in trials])
    parsed = {path.stem: read_trial_list(path) for path in (vox, kaldi, cnc)}
    assert {name: t.form for name, t in parsed.items()} == {"vox": "voxceleb", "kaldi": "kaldi", "cnc": "cnceleb"}
    for t in parsed.values():
        assert t.labels.tolist() == [y for y, _, _ in trials]
        assert t.enrol.tolist() == [e for _, e, _ in trials] and t.test.tolist() == [x for _, _, x in trials]
        assert t.line_numbers.tolist() == [1, 2, 3]


def test_mixed_list_names_the_line_that_breaks_the_form(tmp_path):
    mixed = write(tmp_path / "mixed.txt", ["1 a/1 a/2", "0 a/1 b/1", "a/1 b/2 nontarget", "0 b/1 a/2"])
    with pytest.raises(ValueError, match=rf"^{mixed}:3: a line in kaldi form in a list in voxceleb form \(line 1\)"):
        read_trial_list(mixed)
    kc = write(tmp_path / "k.txt", ["a b target", "a c 0"])
    with pytest.raises(ValueError, match=rf"^{kc}:2: a line in cnceleb form in a list in kaldi form \(line 1\)"):
        read_trial_list(kc)


def test_ambiguous_list_is_refused_naming_file_and_line(tmp_path):
    ambiguous = write(tmp_path / "amb.txt", ["1 x 0", "0 y 1", "1 z 1"])  # each line: VoxCeleb and CN-Celeb form
    with pytest.raises(ValueError, match=rf"^{ambiguous}:1: ambiguous trial list, .*cnceleb and voxceleb"):
        read_trial_list(ambiguous)
    # One line that only one form reads settles the whole list.
    settled = read_trial_list(write(tmp_path / "ok.txt", ["1 x 0", "0 y 1", "1 z w"]))
    assert settled.form == "voxceleb" and settled.test.tolist() == ["0", "1", "w"]


def test_form_specific_label_errors_and_duplicates(tmp_path):
    with pytest.raises(ValueError, match=r"k.txt:2: label \(third field\) must be target or nontarget, got 'maybe'"):
        read_trial_list(write(tmp_path / "k.txt", ["a b target", "a c maybe"]))
    with pytest.raises(ValueError, match=r"c.lst:3: .* also on line 1 with label 1"):
        read_trial_list(write(tmp_path / "c.lst", ["a b 1", "a c 0", "a b 0"]))


# ---------------------------------------------------------------- speakers and models in scoring


def embed(wavs: torch.Tensor, rel_lens: torch.Tensor) -> torch.Tensor:
    """A fixed projection of each utterance's first 64 samples (padding never reaches them)."""
    return torch.from_numpy(wavs[:, :64].double().numpy() @ PROJECTION).float()


def reference_vector(path) -> np.ndarray:
    samples, _ = soundfile.read(path, dtype="float32")
    return samples[:64].astype(np.float64) @ PROJECTION


@pytest.fixture()
def manifest_set(tmp_path):
    """12 utterances of 4 speakers whose ids do not start with the speaker (``clip01`` ... ``clip12``)."""
    speakers = ["ann", "bob", "cy", "dee"]
    audio, spk = {}, {}
    for i in range(12):
        utt = f"clip{i + 1:02d}"
        path = tmp_path / "audio" / f"{utt}.wav"
        path.parent.mkdir(exist_ok=True)
        soundfile.write(path, np.random.default_rng(i).normal(scale=0.3, size=800).astype(np.float32), SR)
        audio[utt], spk[utt] = path, speakers[i % 4]
    return TestUtterances(tmp_path / "audio", audio, spk, source=tmp_path / "test.csv")


def trials_of(test_set, pairs):
    return [f"{e} {t} {int(test_set.speakers[e] == test_set.speakers[t])}" for e, t in pairs]


def test_bootstrap_counts_manifest_speakers_not_id_prefixes(tmp_path, manifest_set):
    utts = sorted(manifest_set.audio_map)
    pairs = [(a, b) for i, a in enumerate(utts) for b in utts[i + 1 :]]
    trials = write(tmp_path / "t.lst", trials_of(manifest_set, pairs))
    for name in ("sys_a", "sys_b"):
        run = score_trial_lists(
            embed, name, manifest_set.root, [trials], tmp_path / name / "scores",
            test_set=manifest_set, bootstrap_resamples=20, print_table=False,
        )  # fmt: skip
        entry = run["results"][0]
        assert entry["intervals"]["bootstrap"]["n_speakers"] == 4  # the first path component would give 12
    recorded = dict(line.split() for line in (tmp_path / "sys_a" / "scores" / "t.speakers").read_text().splitlines())
    assert recorded == manifest_set.speakers
    # The scores are the float64 cosine of the reference vectors.
    scores = [float(line.split()[2]) for line in open(entry["score_file"])]
    ref = {u: reference_vector(p) for u, p in manifest_set.audio_map.items()}
    cos = [ref[a] @ ref[b] / np.linalg.norm(ref[a]) / np.linalg.norm(ref[b]) for a, b in pairs]
    np.testing.assert_allclose(scores, cos, atol=1e-6)
    summary = compare_experiments([tmp_path / "sys_a", tmp_path / "sys_b"], tmp_path / "cmp", n_resamples=10)
    assert summary["lists"][0]["n_speakers"] == 4


def test_label_against_manifest_speakers_names_the_line(tmp_path, manifest_set):
    trials = write(tmp_path / "t.lst", ["clip01 clip05 1", "clip01 clip02 1", "clip01 clip03 0"])  # clip02: bob
    with pytest.raises(ValueError, match=rf"{trials}:2: label 1 disagrees with the speakers of clip01 \(ann\)"):
        score_trial_lists(embed, "m", manifest_set.root, [trials], tmp_path / "out", test_set=manifest_set)
    assert not (tmp_path / "out").exists()


def test_enrollment_models_average_normalised_embeddings(tmp_path, manifest_set):
    # Models: ann from clip01+clip05, bob from clip02+clip06; tested against their other utterances and others'.
    enroll_map = write(tmp_path / "enroll.map", ["ann-enroll clip01 clip05", "bob-enroll clip02 clip06"])
    tests = ["clip09", "clip10", "clip03", "clip07"]
    pairs = [(m, t) for m in ("ann-enroll", "bob-enroll") for t in tests]
    model_speaker = {"ann-enroll": "ann", "bob-enroll": "bob"}
    lines = [f"{m} {t} {'target' if model_speaker[m] == manifest_set.speakers[t] else 'nontarget'}" for m, t in pairs]
    lines += ["clip01 clip09 target", "clip02 clip03 nontarget"]  # utterances and models share one list
    trials = write(tmp_path / "avg.txt", lines)
    run = score_trial_lists(
        embed, "m", manifest_set.root, [trials], tmp_path / "out", test_set=manifest_set,
        enroll_map=enroll_map, bootstrap_resamples=20, print_table=False,
    )  # fmt: skip
    entry = run["results"][0]
    ref = {u: reference_vector(p) for u, p in manifest_set.audio_map.items()}
    unit = {u: v / np.linalg.norm(v) for u, v in ref.items()}
    models = {m: np.mean([unit[u] for u in read_enroll_map(enroll_map).models[m]], axis=0) for m in model_speaker}
    vectors = unit | models
    expected = [
        vectors[e] @ vectors[t] / np.linalg.norm(vectors[e]) / np.linalg.norm(vectors[t])
        for e, t in [*pairs, ("clip01", "clip09"), ("clip02", "clip03")]
    ]
    scores = [float(line.split()[2]) for line in open(entry["score_file"])]
    np.testing.assert_allclose(scores, expected, atol=1e-6)
    speakers = dict(line.split() for line in (tmp_path / "out" / "avg.speakers").read_text().splitlines())
    assert speakers["ann-enroll"] == "ann" and speakers["bob-enroll"] == "bob"
    assert entry["intervals"]["bootstrap"]["n_speakers"] == 3  # ann, bob, cy: the models are ann and bob, not 2 more
    assert run["settings"]["enroll_map"] == str(enroll_map)


def test_enrollment_map_mistakes_name_file_and_line(tmp_path, manifest_set):
    trials = write(tmp_path / "avg.txt", ["m1 clip09 target", "m1 clip02 nontarget"])
    mixed = write(tmp_path / "mixed.map", ["m0 clip01", "m1 clip01 clip02"])
    with pytest.raises(ValueError, match=rf"{mixed}:2: model 'm1' has utterances of 2 speakers \(ann, bob\)"):
        score_trial_lists(
            embed, "m", manifest_set.root, [trials], tmp_path / "o", test_set=manifest_set, enroll_map=mixed
        )
    absent = write(tmp_path / "absent.map", ["m1 clip01 nope"])
    with pytest.raises(ValueError, match=rf"{absent}:1: 1 utterances of model 'm1' are not in the test manifest"):
        score_trial_lists(
            embed, "m", manifest_set.root, [trials], tmp_path / "o", test_set=manifest_set, enroll_map=absent
        )
    for lines, message in [(["m1"], "no utterances"), (["m1 a", "m1 b"], "also on line 1"), (["m1 a a"], "more than")]:
        with pytest.raises(ValueError, match=rf"bad.map:{len(lines)}: .*{message}"):
            read_enroll_map(write(tmp_path / "bad.map", lines))


def test_missing_trial_item_names_the_manifest(tmp_path, manifest_set):
    trials = write(tmp_path / "t.lst", ["clip01 clip05 1", "clip01 ghost 0"])
    with pytest.raises(
        FileNotFoundError, match=rf"not in the test manifest {tmp_path / 'test.csv'}:\n  {trials}:2: ghost"
    ):
        score_trial_lists(embed, "m", manifest_set.root, [trials], tmp_path / "out", test_set=manifest_set)


def test_cohort_means_follow_the_speaker_map():
    ids = ["x1", "x2", "x3", "x4"]
    vectors = torch.tensor([[1.0, 0], [3.0, 0], [0, 2.0], [0, 4.0]])
    means, mean = cohort_means(EmbeddingTable(ids, vectors), {"x1": "p", "x3": "p", "x2": "q", "x4": "q"}, True)
    torch.testing.assert_close(means, torch.tensor([[0.5, 1.0], [1.5, 2.0]]))  # p: x1+x3, q: x2+x4
    torch.testing.assert_close(mean, vectors.mean(dim=0))
    with pytest.raises(KeyError):
        cohort_means(EmbeddingTable(ids, vectors), {"x1": "p"}, False)


def test_speaker_bootstrap_counts_mapped_speakers():
    """Hand-made: 6 ids, 3 speakers; the ids' first component would make 6."""
    speakers = {"u1": "s1", "u2": "s1", "u3": "s2", "u4": "s2", "u5": "s3", "u6": "s3"}
    enrol, test = ["u1", "u3", "u5", "u1", "u3"], ["u2", "u4", "u6", "u3", "u5"]
    bootstrap = SpeakerBootstrap([1, 1, 1, 0, 0], enrol, test, speakers, n_resamples=5)
    assert bootstrap.n_speakers == 3 and json.dumps(bootstrap.speaker_names.tolist()) == '["s1", "s2", "s3"]'
