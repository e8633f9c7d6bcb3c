"""Trial lists: paths outside the wav root, encodings, BOM, duplicate trials, lists with one class only."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import soundfile

from qmargin_spk.data.trials import check_trial_files, read_trial_list, read_trial_lists
from qmargin_spk.scoring import score_trial_lists

SR = 16000


def write_wav(path, seconds=0.3, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, np.random.default_rng(seed).normal(scale=0.1, size=int(seconds * SR)).astype(np.float32), SR)
    return path


def must_not_run(wavs, rel_lens):
    raise AssertionError("nothing may be embedded before the lists are checked")


@pytest.fixture()
def wav_root(tmp_path):
    root = tmp_path / "vox1" / "wav"
    for i, utt in enumerate(["id1/v1/00001.wav", "id1/v2/00001.wav", "id2/v1/00001.wav"]):
        write_wav(root / utt, seed=i)
    write_wav(tmp_path / "vox1" / "secret.wav", seed=9)  # outside the wav root
    return root


# ---------------------------------------------------------------- paths outside the wav root


@pytest.mark.parametrize(
    "outside",
    [
        "../secret.wav",
        "id1/../../secret.wav",
        "{root}/../secret.wav",
        "{root}/id1/v1/00001.wav",
        "./id1/v1/00001.wav",
        "id1//v1/00001.wav",
    ],
)
def test_scoring_refuses_paths_outside_the_wav_root(tmp_path, wav_root, outside):
    outside = outside.format(root=wav_root)
    trials = tmp_path / "t.txt"
    trials.write_text(
        f"1 id1/v1/00001.wav id1/v2/00001.wav\n0 id1/v1/00001.wav {outside}\n0 id1/v2/00001.wav id2/v1/00001.wav\n"
    )
    with pytest.raises(ValueError, match=rf"{trials}:2: '{outside}' is not a relative path inside"):
        score_trial_lists(must_not_run, "m", wav_root, [trials], tmp_path / "out")
    with pytest.raises(ValueError, match=rf"{trials}:2: "):
        check_trial_files(read_trial_lists([trials]), wav_root)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- encoding, duplicates, one class only


def test_non_utf8_list_error_names_file_and_line(tmp_path):
    trials = tmp_path / "latin1.txt"
    trials.write_bytes(b"1 id1/v1/00001.wav id1/v2/00001.wav\n0 id1/v1/caf\xe9.wav id2/v1/00001.wav\n")
    with pytest.raises(ValueError, match=rf"{trials}:2: not UTF-8 text"):
        read_trial_list(trials)


def test_utf8_bom_is_not_read_into_the_first_label(tmp_path):
    trials = tmp_path / "bom.txt"
    trials.write_bytes("1 id1/v1/00001.wav id1/v2/00001.wav\n0 id1/v1/00001.wav id2/v1/00001.wav\n".encode("utf-8-sig"))
    parsed = read_trial_list(trials)
    assert parsed.labels.tolist() == [1, 0] and parsed.enrol[0] == "id1/v1/00001.wav"


def test_duplicate_trials_are_dropped_with_a_counted_warning(tmp_path, caplog):
    trials = tmp_path / "dup.txt"
    a, b, c = "id1/v1/00001.wav", "id1/v2/00001.wav", "id2/v1/00001.wav"
    trials.write_text(f"1 {a} {b}\n0 {a} {c}\n1 {a} {b}\n1 {a} {b}\n0 {c} {a}\n")
    with caplog.at_level(logging.WARNING):
        parsed = read_trial_list(trials)
    assert f"{trials}: 2 duplicate trials dropped" in caplog.text and f"{trials}:3" in caplog.text
    assert parsed.line_numbers.tolist() == [1, 2, 5]  # the first of each; (c, a) is another trial than (a, c)
    assert parsed.labels.tolist() == [1, 0, 0]

    trials.write_text(f"1 {a} {b}\n0 {a} {c}\n0 {a} {b}\n")
    with pytest.raises(ValueError, match=rf"{trials}:3: .* also on line 1 with label 1"):
        read_trial_list(trials)


@pytest.mark.parametrize("label", ["1", "0"])
def test_single_class_list_fails_scoring_before_anything_is_written(tmp_path, wav_root, label):
    good = tmp_path / "good.txt"
    good.write_text("1 id1/v1/00001.wav id1/v2/00001.wav\n0 id1/v1/00001.wav id2/v1/00001.wav\n")
    one_class = tmp_path / "one_class.txt"
    one_class.write_text(f"{label} id1/v1/00001.wav id1/v2/00001.wav\n{label} id1/v2/00001.wav id2/v1/00001.wav\n")
    kind = "target" if label == "1" else "non-target"
    with pytest.raises(ValueError, match=rf"{one_class}: only {kind} trials"):
        score_trial_lists(must_not_run, "m", wav_root, [good, one_class], tmp_path / "out")
    assert not (tmp_path / "out").exists()
