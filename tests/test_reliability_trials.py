"""Issue 9, items 8 and 12 (trial lists): paths outside the wav root, encodings, BOM,
duplicate trials, lists with one class only."""
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


# ---------------------------------------------------------------- item 8


@pytest.mark.parametrize(
    "outside",
    ["../secret.wav", "id1/../../secret.wav", "{root}/../secret.wav", "{root}/id1/v1/00001.wav", "./id1/v1/00001.wav", "id1//v1/00001.wav"],
)
def test_issue9_item8_scoring_refuses_paths_outside_the_wav_root(tmp_path, wav_root, outside):
    outside = outside.format(root=wav_root)
    trials = tmp_path / "t.txt"
    trials.write_text(f"1 id1/v1/00001.wav id1/v2/00001.wav\n0 id1/v1/00001.wav {outside}\n0 id1/v2/00001.wav id2/v1/00001.wav\n")
    with pytest.raises(ValueError, match=rf"{trials}:2: '{outside}' is not a relative path inside"):
        score_trial_lists(must_not_run, "m", wav_root, [trials], tmp_path / "out")
    with pytest.raises(ValueError, match=rf"{trials}:2: "):
        check_trial_files(read_trial_lists([trials]), wav_root)
    assert not (tmp_path / "out").exists()
