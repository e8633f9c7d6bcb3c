"""The synthetic corpus: determinism, layout, disjoint speakers, valid balanced trials."""

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile

from qmargin_spk.data.synthetic import PRESETS, generate_corpus, main, make_trials

WAV_PATH = re.compile(r"^id1\d{4}/[A-Za-z0-9_-]{11}/\d{5}\.wav$")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return generate_corpus(tmp_path_factory.mktemp("tiny"), num_workers=2, **PRESETS["tiny"])


def _wavs(root: Path) -> list[str]:
    return sorted(p.relative_to(root / "wav").as_posix() for p in (root / "wav").rglob("*.wav"))


def _digest(paths) -> str:
    digest = hashlib.sha256()
    for root in (paths.train_root, paths.test_root):
        for relative in _wavs(root):
            digest.update(relative.encode() + (root / "wav" / relative).read_bytes())
    digest.update(paths.trials.read_bytes())
    return digest.hexdigest()


def test_same_seed_same_corpus_whatever_the_workers(tiny, tmp_path):
    again = generate_corpus(tmp_path / "again", num_workers=1, **PRESETS["tiny"])
    assert _digest(again) == _digest(tiny)
    other = generate_corpus(tmp_path / "other", seed=1, num_workers=1, **PRESETS["tiny"])
    assert _digest(other) != _digest(tiny)


def test_layout_and_audio_format(tiny):
    preset = PRESETS["tiny"]
    for root, speakers, utts in (
        (tiny.train_root, preset["num_train_speakers"], preset["utts_per_train_speaker"]),
        (tiny.test_root, preset["num_test_speakers"], preset["utts_per_test_speaker"]),
    ):
        files = _wavs(root)
        assert len(files) == speakers * utts
        assert all(WAV_PATH.match(f) for f in files), files[:3]
        assert len({f.split("/")[0] for f in files}) == speakers
        for relative in files[:: max(1, len(files) // 10)]:
            info = soundfile.info(str(root / "wav" / relative))
            assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
            low, high = preset["duration_range"]
            assert low - 0.01 <= info.duration <= high + 0.01
            samples, _ = soundfile.read(str(root / "wav" / relative))
            assert 0 < np.abs(samples).max() < 1 and np.std(samples) > 1e-3


def test_train_and_test_speakers_are_disjoint(tiny):
    train = {f.split("/")[0] for f in _wavs(tiny.train_root)}
    test = {f.split("/")[0] for f in _wavs(tiny.test_root)}
    assert train and test and not train & test


def test_trials_are_valid_balanced_and_unique(tiny):
    lines = [line.split() for line in tiny.trials.read_text().splitlines()]
    assert len(lines) == PRESETS["tiny"]["num_trials"]
    test_files = set(_wavs(tiny.test_root))
    labels = [int(label) for label, _, _ in lines]
    assert sum(labels) == len(labels) // 2
    pairs = set()
    for label, enrol, test in lines:
        assert enrol in test_files and test in test_files
        assert (label == "1") == (enrol.split("/")[0] == test.split("/")[0])
        if label == "1":
            assert enrol.split("/")[1] != test.split("/")[1], "targets should cross videos"
        assert frozenset((enrol, test)) not in pairs
        pairs.add(frozenset((enrol, test)))


def test_make_trials_refuses_impossible_requests():
    utterances = {"a": [("v1", "a/v1/1.wav"), ("v2", "a/v2/1.wav")], "b": [("v1", "b/v1/1.wav")]}
    rng = np.random.default_rng(0)
    assert len(make_trials(utterances, 2, rng)) == 2
    with pytest.raises(ValueError, match="target"):
        make_trials(utterances, 4, rng)
    four_videos = {"a": [(f"v{i}", f"a/v{i}/1.wav") for i in range(4)], "b": utterances["b"]}
    with pytest.raises(ValueError, match="non-target"):
        make_trials(four_videos, 10, rng)


def test_existing_corpus_is_reused_and_a_different_one_refused(tiny):
    trials_mtime = tiny.trials.stat().st_mtime_ns
    assert generate_corpus(tiny.train_root.parent, num_workers=1, **PRESETS["tiny"]) == tiny
    assert tiny.trials.stat().st_mtime_ns == trials_mtime
    with pytest.raises(FileExistsError):
        generate_corpus(tiny.train_root.parent, seed=5, num_workers=1, **PRESETS["tiny"])


def test_cli_writes_a_corpus(tmp_path, capsys):
    main(["--out", str(tmp_path / "cli"), "--preset", "tiny", "--seed", "3", "--num_workers", "1"])
    printed = json.loads(capsys.readouterr().out)
    assert Path(printed["trials"]).is_file()
    assert json.loads((tmp_path / "cli" / "synthetic.json").read_text())["seed"] == 3


def test_demo_corpus_step_runs_twice_on_the_same_folder(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "demo", Path(__file__).resolve().parents[1] / "recipes/voxceleb/demo.py"
    )
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    first = demo.ensure_corpus(tmp_path / "corpus", seed=5, preset="tiny")
    marker = (tmp_path / "corpus" / "synthetic.json").stat().st_mtime_ns
    second = demo.ensure_corpus(tmp_path / "corpus", seed=5, preset="tiny")
    assert second == first and Path(second.trials).is_file()
    assert (tmp_path / "corpus" / "synthetic.json").stat().st_mtime_ns == marker  # reused, not regenerated


def test_all_pairs_trials_cover_every_cross_video_target_and_cross_speaker_pair():
    utterances = {
        "s1": [("v1", "s1/v1/a.wav"), ("v1", "s1/v1/b.wav"), ("v2", "s1/v2/c.wav")],
        "s2": [("v3", "s2/v3/d.wav"), ("v4", "s2/v4/e.wav")],
    }
    lines = make_trials(utterances, None, np.random.default_rng(0))
    targets = {tuple(line.split()[1:]) for line in lines if line.startswith("1 ")}
    nontargets = {frozenset(line.split()[1:]) for line in lines if line.startswith("0 ")}
    assert targets == {("s1/v1/a.wav", "s1/v2/c.wav"), ("s1/v1/b.wav", "s1/v2/c.wav"), ("s2/v3/d.wav", "s2/v4/e.wav")}
    assert len(nontargets) == 3 * 2 == len(lines) - 3  # every cross-speaker pair once
    assert PRESETS["demo"]["num_trials"] is None
