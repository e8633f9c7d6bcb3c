"""The prepare stage on a tiny synthetic corpus with bad files, m4a trees and broken trial lists."""

import csv
import importlib.util
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile

from qmargin_spk.data.manifest import MANIFEST_FIELDS, read_manifest
from qmargin_spk.data.prepare import PrepareError, prepare
from qmargin_spk.data.synthetic import PRESETS, generate_corpus

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return generate_corpus(tmp_path_factory.mktemp("pristine"), num_workers=2, **PRESETS["tiny"])


@pytest.fixture
def corpus(pristine, tmp_path):
    """A private copy of the tiny corpus that a test may damage."""
    shutil.copytree(pristine.train_root.parent, tmp_path / "corpus")
    root = tmp_path / "corpus"
    return root / "train", root / "test", root / "trials.txt"


def _tone(seconds: float, rate: int = 16000, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.3 * np.sin(2 * np.pi * 220 * t)
    return np.stack([wave] * channels, axis=1) if channels > 1 else wave


def _add_bad_files(train_root: Path) -> dict[str, Path]:
    folder = train_root / "wav" / "id19999" / "badvideo000"
    folder.mkdir(parents=True)
    files = {
        name: folder / f"{i:05d}.wav" for i, name in enumerate(["corrupt", "empty", "stereo", "short", "rate8k"], 1)
    }
    files["corrupt"].write_bytes(b"RIFF\x00\x00garbage, not audio" * 10)
    soundfile.write(str(files["empty"]), np.zeros(0), 16000, subtype="PCM_16")
    soundfile.write(str(files["stereo"]), _tone(1.0, channels=2), 16000, subtype="PCM_16")
    soundfile.write(str(files["short"]), _tone(0.2), 16000, subtype="PCM_16")
    soundfile.write(str(files["rate8k"]), _tone(1.25, rate=8000), 8000, subtype="PCM_16")
    return files


def _listing(path: Path) -> dict[str, str]:
    return dict(line.split("\t", 1) for line in path.read_text().splitlines())


def test_bad_files_are_skipped_with_reasons_and_manifests_are_correct(corpus, tmp_path, caplog):
    train, test, trials = corpus
    bad = _add_bad_files(train)
    with caplog.at_level(logging.WARNING):
        result = prepare([train], test, [trials], tmp_path / "out", min_duration=0.5, num_workers=2)
    assert "skipped 4 of" in caplog.text

    skipped = _listing(tmp_path / "out" / "skipped.txt")
    assert set(skipped) == {str(bad[name]) for name in ("corrupt", "empty", "stereo", "short")}
    assert "unreadable" in skipped[str(bad["corrupt"])]
    assert "empty" in skipped[str(bad["empty"])]
    assert "2 channels" in skipped[str(bad["stereo"])]
    assert "too short" in skipped[str(bad["short"])]
    assert _listing(tmp_path / "out" / "resampled.txt") == {str(bad["rate8k"]): "8000"}
    assert (result.num_skipped, result.num_resampled, result.num_conversion_failures) == (4, 1, 0)

    preset = PRESETS["tiny"]
    with open(result.train_manifest, newline="") as handle:
        assert next(csv.reader(handle)) == list(MANIFEST_FIELDS)
    rows = read_manifest(result.train_manifest)
    assert (
        result.num_train_utterances == len(rows) == preset["num_train_speakers"] * preset["utts_per_train_speaker"] + 1
    )
    assert result.num_train_speakers == preset["num_train_speakers"] + 1
    for row in rows:
        assert row.id == Path(row.wav).relative_to(train / "wav").with_suffix("").as_posix()
        assert row.spk_id == row.id.split("/")[0]
        assert row.duration == pytest.approx(soundfile.info(row.wav).duration, abs=1e-5)
    assert {r.id: r.duration for r in rows}["id19999/badvideo000/00005"] == pytest.approx(1.25)
    test_rows = read_manifest(result.test_manifest)
    assert len(test_rows) == result.num_test_utterances == preset["num_test_speakers"] * preset["utts_per_test_speaker"]


def test_second_run_is_a_no_op_until_inputs_change(corpus, tmp_path):
    train, test, trials = corpus
    first = prepare([train], test, [trials], tmp_path / "out")
    manifest_mtime = first.train_manifest.stat().st_mtime_ns
    second = prepare([train], test, [trials], tmp_path / "out")
    assert second.reused and not first.reused
    assert second.train_manifest.stat().st_mtime_ns == manifest_mtime
    assert {k: v for k, v in second.to_json().items() if k != "reused"} == {
        k: v for k, v in first.to_json().items() if k != "reused"
    }

    extra = train / "wav" / "id10001" / "newvideo000" / "00001.wav"
    extra.parent.mkdir()
    soundfile.write(str(extra), _tone(1.0), 16000, subtype="PCM_16")
    third = prepare([train], test, [trials], tmp_path / "out")
    assert not third.reused and third.num_train_utterances == first.num_train_utterances + 1


def test_overlapping_speakers_are_refused_unless_allowed(corpus, tmp_path, caplog):
    train, test, trials = corpus
    shared = sorted(p.name for p in (test / "wav").iterdir())[0]
    shutil.copytree(test / "wav" / shared, train / "wav" / shared)
    with pytest.raises(PrepareError, match=shared):
        prepare([train], test, [trials], tmp_path / "out")
    assert not (tmp_path / "out" / "train.csv").exists()
    with caplog.at_level(logging.WARNING):
        result = prepare([train], test, [trials], tmp_path / "out", allow_overlap=True)
    assert shared in caplog.text and result.num_train_speakers == PRESETS["tiny"]["num_train_speakers"] + 1


def test_roots_without_audio_are_refused(corpus, tmp_path):
    train, test, trials = corpus
    (tmp_path / "empty" / "wav").mkdir(parents=True)
    with pytest.raises(PrepareError, match="no audio files"):
        prepare([tmp_path / "empty"], test, [trials], tmp_path / "out")
    with pytest.raises(PrepareError, match="no wav/ or aac/"):
        prepare([tmp_path], test, [trials], tmp_path / "out")


def test_the_same_utterance_in_two_training_roots_is_refused(corpus, tmp_path):
    train, test, trials = corpus
    shutil.copytree(train, tmp_path / "copy")
    with pytest.raises(PrepareError, match="utterance ids occur in more than one training root"):
        prepare([train, tmp_path / "copy"], test, [trials], tmp_path / "out")


def test_trial_problems_are_reported_with_file_and_line(corpus, tmp_path):
    train, test, trials = corpus
    lines = trials.read_text().splitlines()
    enrol = next(line for line in lines if line.startswith("1 ")).split()[1]
    broken = tmp_path / "broken.txt"

    def problems_with(*bad_lines: str) -> str:
        broken.write_text("\n".join([lines[0], *bad_lines]) + "\n")
        with pytest.raises(PrepareError) as caught:
            prepare([train], test, [broken], tmp_path / "out")
        return str(caught.value)

    assert f"{broken}:2: id10099/nosuchvideo/00001.wav" in problems_with(f"1 {enrol} id10099/nosuchvideo/00001.wav")
    assert f"{broken}:3: label 0 disagrees" in problems_with(lines[1], f"0 {enrol} {enrol}")
    assert f"{broken}:2: expected" in problems_with("1 two_fields")
    with pytest.raises(PrepareError, match="trial list not found"):
        prepare([train], test, [tmp_path / "missing.txt"], tmp_path / "out")

    (test / "wav" / enrol).write_bytes(b"not audio")
    with pytest.raises(PrepareError, match=rf"{trials}:\d+: {enrol} is unusable \(unreadable"):
        prepare([train], test, [trials], tmp_path / "out")
    assert not (tmp_path / "out" / "prepare_done.json").exists()


FAKE_FFMPEG = """#!/bin/sh
# Test stand-in for ffmpeg: the ".m4a" inputs are wavs; copy the input to the last argument.
echo "$@" >> "$(dirname "$0")/calls.log"
for arg in "$@"; do last="$arg"; done
while [ $# -gt 0 ]; do [ "$1" = "-i" ] && input="$2"; shift; done
case "$input" in *broken*) echo "$input: Invalid data found when processing input" >&2; exit 1;; esac
cp "$input" "$last"
"""


def _m4a_root(tmp_path: Path) -> Path:
    root = tmp_path / "vox2"
    for speaker, video, utt in [
        ("id00012", "abc", "00001"),
        ("id00012", "abc", "00002"),
        ("id00015", "broken_vid", "00001"),
    ]:
        target = root / "aac" / speaker / video / f"{utt}.m4a"
        target.parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(str(target), _tone(1.0), 16000, subtype="PCM_16", format="WAV")
    return root


def test_m4a_trees_are_decoded_resumably_and_failures_listed(corpus, tmp_path, monkeypatch):
    _, test, trials = corpus
    root = _m4a_root(tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ffmpeg").write_text(FAKE_FFMPEG)
    (bin_dir / "ffmpeg").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")

    result = prepare([root], test, [trials], tmp_path / "out", num_workers=2)
    assert result.num_train_utterances == 2 and result.num_conversion_failures == 1
    failures = _listing(tmp_path / "out" / "conversion_failures.txt")
    assert list(failures) == [str(root / "aac" / "id00015" / "broken_vid" / "00001.m4a")]
    assert "Invalid data" in next(iter(failures.values()))
    calls = (bin_dir / "calls.log").read_text().splitlines()
    assert len(calls) == 3 and all("-ac 1 -ar 16000 -acodec pcm_s16le" in call for call in calls)
    assert not list(root.rglob("*.partial"))

    (tmp_path / "out" / "prepare_done.json").unlink()
    prepare([root], test, [trials], tmp_path / "out", num_workers=2)
    assert len((bin_dir / "calls.log").read_text().splitlines()) == 4, "only the failed file is retried"

    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    (tmp_path / "out" / "prepare_done.json").unlink()
    with pytest.raises(PrepareError, match="ffmpeg not found on PATH"):
        prepare([root], test, [trials], tmp_path / "out")


def _recipe_main():
    spec = importlib.util.spec_from_file_location("voxceleb_prepare", REPO / "recipes" / "voxceleb" / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_recipe_cli(corpus, tmp_path, capsys):
    train, test, trials = corpus
    main = _recipe_main()
    args = [
        "--train_root",
        str(train),
        "--test_root",
        str(test),
        "--trials",
        str(trials),
        "--out",
        str(tmp_path / "out"),
    ]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["num_test_speakers"] == PRESETS["tiny"]["num_test_speakers"]
    assert main(["--train_root", str(test), *args[2:]]) == 1
    assert "in both training and test" in capsys.readouterr().err
    assert main(["--train_root", str(test), *args[2:], "--allow_overlap"]) == 0


def _float_wav(path: Path, seconds: float, bad_value: float | None) -> Path:
    """A 32-bit float wav (header fine) with one NaN or inf sample when ``bad_value`` is given."""
    samples = _tone(seconds).astype(np.float32)
    if bad_value is not None:
        samples[len(samples) // 3] = bad_value
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), samples, 16000, subtype="FLOAT")
    return path


def test_nan_and_inf_audio_is_skipped_at_prepare(corpus, tmp_path):
    train, test, trials = corpus
    folder = train / "wav" / "id19999" / "floatvideo"
    nan = _float_wav(folder / "00001.wav", 1.0, np.nan)
    inf = _float_wav(folder / "00002.wav", 1.0, -np.inf)
    fine = _float_wav(folder / "00003.wav", 1.0, None)
    test_nan = _float_wav(test / "wav" / "id10300" / "v" / "00001.wav", 1.0, np.nan)
    result = prepare([train], test, [trials], tmp_path / "out", num_workers=2)
    skipped = _listing(tmp_path / "out" / "skipped.txt")
    assert set(skipped) == {str(nan), str(inf), str(test_nan)}
    assert all("NaN or inf" in reason for reason in skipped.values())
    train_ids = {row.id for row in read_manifest(result.train_manifest)}
    assert "id19999/floatvideo/00003" in train_ids and "id19999/floatvideo/00001" not in train_ids
    assert str(fine) not in skipped

    # A trial naming such a file is refused at prepare time, with file and line.
    enrol = trials.read_text().split()[1]
    with_nan = tmp_path / "with_nan.txt"
    with_nan.write_text(f"0 {enrol} id10300/v/00001.wav\n")
    with pytest.raises(PrepareError, match=rf"{with_nan}:1: id10300/v/00001.wav is unusable \(audio contains NaN"):
        prepare([train], test, [with_nan], tmp_path / "out2", num_workers=2)


def test_broken_symlinks_are_skipped_with_reasons(corpus, tmp_path):
    train, test, trials = corpus
    folder = train / "wav" / "id19999" / "linkvideo"
    folder.mkdir(parents=True)
    (folder / "00001.wav").symlink_to(tmp_path / "nowhere.wav")
    (folder / "00002.wav").symlink_to(folder / "00003.wav")
    (folder / "00003.wav").symlink_to(folder / "00002.wav")  # a loop
    good = folder / "00004.wav"
    good.symlink_to(next((train / "wav").glob("id1*/*/*.wav")))  # a working link is followed
    result = prepare([train], test, [trials], tmp_path / "out", num_workers=2)
    skipped = _listing(tmp_path / "out" / "skipped.txt")
    assert skipped[str(folder / "00001.wav")].startswith("dangling symbolic link")
    assert skipped[str(folder / "00002.wav")].startswith("symbolic link loop")
    assert skipped[str(folder / "00003.wav")].startswith("symbolic link loop")
    assert "id19999/linkvideo/00004" in {row.id for row in read_manifest(result.train_manifest)}
    assert (tmp_path / "out" / "prepare_done.json").is_file()
    assert prepare([train], test, [trials], tmp_path / "out", num_workers=2).reused


def test_prepare_outputs_are_written_only_after_every_check(corpus, tmp_path, monkeypatch):
    """A failure anywhere before the end leaves no manifest or listing behind."""
    import qmargin_spk.data.prepare as prepare_module

    train, test, trials = corpus

    def failing_fingerprint(*args, **kwargs):
        raise OSError("simulated failure while reading the inputs")

    monkeypatch.setattr(prepare_module, "input_fingerprint", failing_fingerprint)
    with pytest.raises(OSError, match="simulated"):
        prepare([train], test, [trials], tmp_path / "out", num_workers=2)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_prepare_refuses_paths_outside_the_wav_root_with_the_shared_check(corpus, tmp_path):
    train, test, trials = corpus
    lines = trials.read_text().splitlines()
    enrol = lines[0].split()[1]
    outside = tmp_path / "outside.txt"
    for path in (f"{enrol.split('/')[0]}/../{enrol}", str(test / "wav" / enrol)):
        outside.write_text(f"{lines[0]}\n0 {enrol} {path}\n")
        with pytest.raises(PrepareError, match=rf"{outside}:2: '{path}' is not a relative path inside"):
            prepare([train], test, [outside], tmp_path / "out")


def test_prepare_refuses_a_list_with_one_class_only(corpus, tmp_path):
    train, test, trials = corpus
    targets = tmp_path / "targets_only.txt"
    targets.write_text("".join(line + "\n" for line in trials.read_text().splitlines() if line.startswith("1 ")))
    with pytest.raises(PrepareError, match=rf"{targets}: only target trials"):
        prepare([train], test, [targets], tmp_path / "out")
