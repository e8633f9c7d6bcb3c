"""Input forms of stage 1 (issue 26): Kaldi data dirs with file, pipe, ark and segment entries, CSV/JSONL
manifests and audio trees (WAV or FLAC, VoxCeleb or any <spk>/... layout), detected from their content.

The oracle throughout is soundfile reading the same audio as a plain file: every form must give those
samples bit for bit, and so the same embeddings and scores."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import kaldiio
import numpy as np
import pytest
import soundfile
import torch

from conftest import stage_script, write_wav
from qmargin_spk.data.audio import AudioError, audio_info, load_audio
from qmargin_spk.data.fingerprint import audio_fingerprint
from qmargin_spk.data.manifest import read_manifest, utterance_id
from qmargin_spk.data.prepare import PrepareError, prepare
from qmargin_spk.data.sources.address import format_address, parse_address
from qmargin_spk.data.sources.detect import detect_format, read_input
from qmargin_spk.data.sources.utterances import InputError

SR = 16000


def _tree_files(tree_root: Path) -> dict[str, Path]:
    """``spk/video/utt`` -> wav file of a VoxCeleb-layout tree."""
    base = tree_root / "wav"
    return {utterance_id(p.relative_to(base).as_posix()): p for p in sorted(base.glob("*/*/*.wav"))}


def kaldi_dir_from_tree(tree_root: Path, out: Path) -> dict[str, str]:
    """A Kaldi data dir over the tree's audio, entries cycling through plain path, ``cat ... |`` and ark.

    Utterance ids are ``spk-video-utt``; returns tree id -> Kaldi utterance id.
    """
    out.mkdir(parents=True)
    files, entries, ark_audio, ids = _tree_files(tree_root), {}, {}, {}
    for number, (tree_id, path) in enumerate(files.items()):
        utt = ids[tree_id] = tree_id.replace("/", "-")
        if number % 3 == 0:
            entries[utt] = str(path)
        elif number % 3 == 1:
            entries[utt] = f"cat {shlex.quote(str(path))} |"
        else:
            samples, rate = soundfile.read(path, dtype="int16")
            ark_audio[utt] = (rate, samples)
    kaldiio.save_ark(str(out / "audio.ark"), ark_audio, scp=str(out / "audio.scp"))
    entries |= dict(line.split(maxsplit=1) for line in (out / "audio.scp").read_text().splitlines())
    (out / "wav.scp").write_text("".join(f"{utt} {entries[utt].strip()}\n" for utt in sorted(entries)))
    (out / "utt2spk").write_text("".join(f"{utt} {tree.split('/')[0]}\n" for tree, utt in sorted(ids.items())))
    return ids


def kaldi_trials(trials: Path, ids: dict[str, str], out: Path, max_lines: int | None = None) -> Path:
    """The first ``max_lines`` of a VoxCeleb list with utterance ids for items, in Kaldi form.

    Kaldi form is ``enrol test target|nontarget``.
    """
    lines = []
    for line in trials.read_text().splitlines()[:max_lines]:
        label, enrol, test = line.split()
        kind = "target" if label == "1" else "nontarget"
        lines.append(f"{ids[utterance_id(enrol)]} {ids[utterance_id(test)]} {kind}\n")
    out.write_text("".join(lines))
    return out


# --- the same samples from every form ---------------------------------------------------------------


def test_the_same_audio_gives_the_same_samples_as_file_pipe_ark_segment_and_flac(tmp_path):
    wav = write_wav(tmp_path / "a.wav", 1.3, seed=4)
    reference = torch.from_numpy(soundfile.read(wav, dtype="float32")[0])
    samples = soundfile.read(wav, dtype="int16")[0]
    soundfile.write(tmp_path / "a.flac", samples, SR)
    soundfile.write(tmp_path / "a8.wav", samples, SR, subtype="PCM_U8")
    kaldiio.save_ark(str(tmp_path / "x.ark"), {"u": (SR, samples)}, scp=str(tmp_path / "x.scp"))
    ark_entry = (tmp_path / "x.scp").read_text().split()[1]
    for entry in (f"cat {wav} |", ark_entry, f"cat {tmp_path / 'a.flac'} |"):
        address = format_address(entry)
        assert torch.equal(load_audio(address, SR), reference), entry
        assert audio_info(address).frames == reference.numel()
        assert torch.equal(load_audio(address, SR, start=800, num_samples=1600), reference[800:2400])
    eight_bit = torch.from_numpy(soundfile.read(tmp_path / "a8.wav", dtype="float32")[0])
    assert torch.equal(load_audio(format_address(f"cat {tmp_path / 'a8.wav'} |"), SR), eight_bit)
    # segments: [0.25 s, 1.0 s) of the recording, as a file, a pipe and an ark entry
    for entry in (str(wav), f"cat {wav} |", ark_entry):
        segment = format_address(entry, 0.25, 1.0)
        assert torch.equal(load_audio(segment, SR), reference[4000:16000]), entry
        assert torch.equal(load_audio(segment, SR, start=100, num_samples=50), reference[4100:4150])
        assert audio_info(segment).frames == 12000
        assert torch.equal(load_audio(format_address(entry, 1.0, -1), SR), reference[16000:])


def test_cache_keys_hash_the_command_and_samples_of_pipes_the_ark_and_offset_and_the_segment(tmp_path):
    wav = write_wav(tmp_path / "a.wav", 1.0, seed=1)
    kaldiio.save_ark(
        str(tmp_path / "x.ark"), {"u": (SR, soundfile.read(wav, dtype="int16")[0])}, scp=str(tmp_path / "s")
    )
    pipe, ark = format_address(f"cat {wav} |"), format_address((tmp_path / "s").read_text().split()[1])
    keys = {name: audio_fingerprint(address) for name, address in [("pipe", pipe), ("ark", ark)]}
    assert audio_fingerprint(pipe) == keys["pipe"]  # stable
    assert audio_fingerprint(format_address(f"cat  {wav} |")) != keys["pipe"]  # another command
    assert audio_fingerprint(format_address(str(wav), 0.0, 0.5)) != audio_fingerprint(
        format_address(str(wav), 0.0, 0.6)
    )
    assert audio_fingerprint(format_address(f"cat {wav} |", 0, 0.5)) != keys["pipe"]
    write_wav(wav, 1.0, seed=2)  # same command and size, other samples
    assert audio_fingerprint(pipe) != keys["pipe"]
    kaldiio.save_ark(str(tmp_path / "x.ark"), {"u": (SR, np.zeros(SR, np.int16))})
    assert audio_fingerprint(ark) != keys["ark"]


# --- what cannot be read: one line naming the utterance ------------------------------------------------


def test_unreadable_kaldi_entries_are_skipped_and_counted_with_one_line_naming_each_utterance(corpus, tmp_path):
    data = tmp_path / "train"
    ids = kaldi_dir_from_tree(corpus.train_root, data)
    wav = next(iter(_tree_files(corpus.train_root).values()))
    samples = soundfile.read(wav, dtype="int16")[0]
    for name, subtype, fmt in (("24bit", "PCM_24", "WAV"), ("float", "FLOAT", "WAV"), ("vorbis", "VORBIS", "OGG")):
        soundfile.write(tmp_path / f"{name}.x", samples, SR, subtype=subtype, format=fmt)
    bad = {
        "bad-24bit": (f"cat {tmp_path / '24bit.x'} |", "24-bit or float WAV"),
        "bad-float": (f"cat {tmp_path / 'float.x'} |", "24-bit or float WAV"),
        "bad-ogg": (f"cat {tmp_path / 'vorbis.x'} |", "neither WAV, FLAC nor a Kaldi object"),
        "bad-exit": ("false |", "the command failed or wrote no audio (false |)"),
        "bad-header": (f"head -c 44 {wav} |", "empty audio (0 samples; a streamed WAV header"),
        "bad-ark": (f"{tmp_path / 'gone.ark'}:12", f"ark file {tmp_path / 'gone.ark'} not found"),
        "bad-offset": (f"{data / 'audio.ark'}:5", f"no audio object at offset 5 of {data / 'audio.ark'}"),
    }
    with open(data / "wav.scp", "a") as scp, open(data / "utt2spk", "a") as utt2spk:
        for utt, (entry, _) in bad.items():
            scp.write(f"{utt} {entry}\n")
            utt2spk.write(f"{utt} id19999\n")
        scp.write(f"nospeaker {wav}\n")
    result = prepare([data], corpus.test_root, [corpus.trials], tmp_path / "out", num_workers=1)
    skipped = dict(line.split("\t") for line in (tmp_path / "out" / "skipped.txt").read_text().splitlines())
    assert set(skipped) == {*bad, "nospeaker"}
    for utt, (_, reason) in bad.items():
        assert reason in skipped[utt]
        with pytest.raises(AudioError) as caught:
            load_audio(format_address(bad[utt][0]), SR)
        assert reason in str(caught.value) and "\n" not in str(caught.value)
    assert result.num_train_utterances == len(ids)
    assert result.dropped == {
        "empty": 1,
        "failed pipe or ark entry": 2,
        "missing": 1,
        "no speaker": 1,
        "unreadable": 3,
    }


# --- detection and --input_format --------------------------------------------------------------------


def test_each_form_is_detected_from_its_content_and_input_format_settles_a_folder_that_is_two(corpus, tmp_path):
    kaldi_dir_from_tree(corpus.train_root, tmp_path / "kaldi")
    csv_path = tmp_path / "list.csv"
    csv_path.write_text(
        "id,path,spk\n"
        + "".join(f"u{i},{p},{k.split('/')[0]}\n" for i, (k, p) in enumerate(_tree_files(corpus.train_root).items()))
    )
    flat = tmp_path / "flat"
    shutil.copytree(corpus.train_root / "wav", flat)
    assert detect_format(tmp_path / "kaldi") == "kaldi"
    assert detect_format(csv_path) == "manifest"
    assert detect_format(corpus.train_root) == "tree"
    assert detect_format(flat) == "tree"
    assert [u.id for u in read_input(flat).utterances] == list(_tree_files(corpus.train_root))
    shutil.copytree(flat, tmp_path / "kaldi" / "audio")  # now both a Kaldi dir and a tree
    with pytest.raises(InputError, match="both a Kaldi data dir and an audio tree; pass --input_format"):
        detect_format(tmp_path / "kaldi")
    assert read_input(tmp_path / "kaldi", "kaldi").kind == "kaldi"
    with pytest.raises(InputError, match=r"no wav/ or aac/ folder, but .*/(train|test) below it has one"):
        detect_format(corpus.train_root.parent)

    prepare_cli = stage_script("prepare")
    argv = [
        "--train_root",
        str(tmp_path / "kaldi"),
        "--test_root",
        str(corpus.test_root),
        "--trials",
        str(corpus.trials),
    ]
    assert prepare_cli([*argv, "--out", str(tmp_path / "o1")]) == 1
    assert prepare_cli([*argv, "--out", str(tmp_path / "o2"), "--input_format", "kaldi"]) == 0
    assert len(read_manifest(tmp_path / "o2" / "train.csv")) == len(_tree_files(corpus.train_root))


def test_csv_and_jsonl_manifests_with_segments_and_their_line_errors(tmp_path):
    wav = write_wav(tmp_path / "a.wav", 2.0, seed=5)
    reference = torch.from_numpy(soundfile.read(wav, dtype="float32")[0])
    (tmp_path / "m.csv").write_text("id,path,spk,start,end\nx,a.wav,s1,0.5,1.5\ny,a.wav,s2,,\n")
    rows = {u.id: u for u in read_input(tmp_path / "m.csv").utterances}
    assert torch.equal(load_audio(rows["x"].address, SR), reference[8000:24000])
    assert torch.equal(load_audio(rows["y"].address, SR), reference) and rows["y"].spk == "s2"
    cut = {"id": "z", "start": 0.5, "duration": 1.0, "recording": {"sources": [{"type": "file", "source": str(wav)}]}}
    (tmp_path / "m.jsonl").write_text(json.dumps(cut | {"supervisions": [{"speaker": "s3"}]}) + "\n")
    (utterance,) = read_input(tmp_path / "m.jsonl").utterances
    assert torch.equal(load_audio(utterance.address, SR), reference[8000:24000]) and utterance.spk == "s3"
    for text, message in (
        ("path,spk\na.wav,s\n", r"m.csv:1: header must name id,path,spk\[,start,end\]; missing id"),
        ("id,path,spk\nx,cat a.wav |,s\n", r"m.csv:2: 'cat a.wav \|' is not a file path"),
        ("id,path,spk,start,end\nx,a.wav,s,1,0.5\n", "m.csv:2: end 0.5 is not after start 1.0"),
        ("id,path,spk\nx,a.wav,s\nx,a.wav,s\n", r"m.csv:3: id x already on .*m.csv:2"),
    ):
        (tmp_path / "m.csv").write_text(text)
        with pytest.raises(InputError, match=message):
            read_input(tmp_path / "m.csv", "manifest")


def test_a_flac_tree_in_any_layout_scores_like_the_wav_tree(corpus, tiny_model, tmp_path):
    """CN-Celeb/LibriSpeech-like: ROOT/<spk>/<video>/<utt>.flac, trial lists naming .wav paths as released."""
    from qmargin_spk.inference import SpeakerModel

    flac_root = tmp_path / "flac"
    for tree_id, path in _tree_files(corpus.test_root).items():
        target = (flac_root / tree_id).with_suffix(".flac")
        target.parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(target, soundfile.read(path, dtype="int16")[0], SR, format="FLAC")
    results = {
        form: prepare([corpus.train_root], root, [corpus.trials], tmp_path / form, num_workers=1)
        for form, root in (("wav", corpus.test_root), ("flac", flac_root))
    }
    assert results["flac"].input_formats[str(flac_root)] == "tree"
    wav_rows, flac_rows = (read_manifest(result.test_manifest) for result in results.values())
    assert [row.id for row in flac_rows] == [row.id for row in wav_rows]
    assert {Path(row.wav).suffix for row in flac_rows} == {".flac"}
    model = SpeakerModel.from_folder(tiny_model[0])
    items = [line.split()[1:] for line in corpus.trials.read_text().splitlines()]
    scores = {}
    for form, rows in (("wav", wav_rows), ("flac", flac_rows)):
        embedded = dict(zip([row.id for row in rows], model.embed([row.wav for row in rows])))
        scores[form] = [float(embedded[utterance_id(a)] @ embedded[utterance_id(b)]) for a, b in items]
    np.testing.assert_allclose(scores["flac"], scores["wav"], rtol=0, atol=1e-5)


def test_m4a_files_in_any_tree_are_decoded_beside_themselves(corpus, tmp_path, monkeypatch):
    from test_prepare import FAKE_FFMPEG  # a stand-in that copies its input (here WAV bytes named .m4a)

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ffmpeg").write_text(FAKE_FFMPEG)
    (bin_dir / "ffmpeg").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    tree = tmp_path / "m4a"
    for number, path in enumerate(list(_tree_files(corpus.train_root).values())[:4]):
        target = tree / f"spk{number % 2}" / "session" / f"{number}.m4a"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    assert detect_format(tree) == "tree"
    result = prepare([tree], corpus.test_root, [corpus.trials], tmp_path / "out", num_workers=1)
    rows = read_manifest(result.train_manifest)
    assert [row.id for row in rows] == ["spk0/session/0", "spk0/session/2", "spk1/session/1", "spk1/session/3"]
    assert all(Path(row.wav).with_suffix(".m4a").is_file() and row.wav.endswith(".wav") for row in rows)
    assert len((bin_dir / "calls.log").read_text().splitlines()) == 4


def test_the_command_line_embeds_a_wav_scp_of_pipes_and_arks_and_scores_a_kaldi_dir_like_the_tree(
    corpus, tiny_model, tmp_path, capsys
):
    from qmargin_spk.cli import main

    test_ids = kaldi_dir_from_tree(corpus.test_root, tmp_path / "kaldi")
    trials = kaldi_trials(corpus.trials, test_ids, tmp_path / "trials.txt", max_lines=6)
    model = ["--model", str(tiny_model[0])]
    for name, root, lists in (("tree", corpus.test_root / "wav", corpus.trials), ("kaldi", tmp_path / "kaldi", trials)):
        argv = ["score", *model, "--trials", str(lists), "--root", str(root), "--out", str(tmp_path / name)]
        assert main(argv) == 0
    kaldi_scores = _scores(tmp_path / "kaldi", "")
    np.testing.assert_allclose(kaldi_scores, _scores(tmp_path / "tree", "")[:6], rtol=0, atol=1e-5)
    assert main(["embed", *model, "--list", str(tmp_path / "kaldi" / "wav.scp"), "--out", str(tmp_path / "e.npz")]) == 0
    stored = np.load(tmp_path / "e.npz")
    files = _tree_files(corpus.test_root)
    by_kaldi_id = {kaldi: tree for tree, kaldi in test_ids.items()}
    assert (
        main(["embed", *model, *[str(files[by_kaldi_id[i]]) for i in stored["ids"]], "--out", str(tmp_path / "f.npz")])
        == 0
    )
    np.testing.assert_allclose(stored["embeddings"], np.load(tmp_path / "f.npz")["embeddings"], rtol=0, atol=1e-6)
    capsys.readouterr()


def test_shards_of_a_kaldi_manifest_hold_the_samples_of_its_pipe_and_ark_entries(corpus, tmp_path):
    import tarfile

    from qmargin_spk.data.audio import load_audio_bytes
    from qmargin_spk.data.shards import write_shards

    kaldi_dir_from_tree(corpus.test_root, tmp_path / "kaldi")
    rows = [row for row in read_manifest_rows(tmp_path / "kaldi")][:6]
    write_shards(rows, tmp_path / "shards", utts_per_shard=6, seed=0, num_workers=1)
    with tarfile.open(tmp_path / "shards" / "shard-000000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    for number, row in enumerate(rows):
        stored = load_audio_bytes(members[f"{number:09d}.wav"], row.id, SR)
        assert torch.equal(stored, load_audio(row.wav, SR)), row.wav


def read_manifest_rows(kaldi: Path):
    """Manifest rows of a Kaldi dir without a prepare run (durations are not needed by the shard writer)."""
    from qmargin_spk.data.manifest import ManifestRow

    return [ManifestRow(u.id, u.address, 1.0, u.spk) for u in read_input(kaldi).utterances]


def test_segments_spk2utt_and_a_trial_naming_a_failed_pipe_at_prepare(corpus, tmp_path):
    files = list(_tree_files(corpus.train_root).values())[:2]
    data = tmp_path / "seg"
    data.mkdir()
    (data / "wav.scp").write_text(f"r1 {files[0]}\nr2 cat {files[1]} |\n")
    (data / "segments").write_text("a-1 r1 0.0 0.75\na-2 r1 0.75 -1\nb-1 r2 0.25 1.0\n")
    (data / "spk2utt").write_text("spkA a-1 a-2\nspkB b-1\n")
    (data / "utt2dur").write_text("a-1 0.75\n")
    source = read_input(data)
    assert [(u.id, u.spk) for u in source.utterances] == [("a-1", "spkA"), ("a-2", "spkA"), ("b-1", "spkB")]
    whole = {u.id: load_audio(u.address, SR) for u in source.utterances}
    first = torch.from_numpy(soundfile.read(files[0], dtype="float32")[0])
    assert torch.equal(torch.cat([whole["a-1"], whole["a-2"]]), first)
    assert whole["b-1"].numel() == 12000

    test = tmp_path / "kaldi_test"
    ids = kaldi_dir_from_tree(corpus.test_root, test)
    trials = kaldi_trials(corpus.trials, ids, tmp_path / "trials.txt")
    enrol = trials.read_text().split()[0]
    scp = (test / "wav.scp").read_text().splitlines()
    (test / "wav.scp").write_text(
        "".join(f"{enrol} false |\n" if line.startswith(f"{enrol} ") else f"{line}\n" for line in scp)
    )
    with pytest.raises(PrepareError) as caught:
        prepare([data], test, [trials], tmp_path / "out", num_workers=1)
    assert f"{trials}:1: {enrol} is unusable (the command failed or wrote no audio (false |))" in str(caught.value)
    (test / "wav.scp").write_text("".join(f"{line}\n" for line in scp))
    result = prepare([data], test, [trials], tmp_path / "out", num_workers=1)
    durations = [row.duration for row in read_manifest(result.train_manifest)]
    np.testing.assert_allclose(durations, [0.75, first.numel() / SR - 0.75, 0.75], atol=1e-6)  # written to 6 places
    assert result.input_formats == {str(data): "kaldi", str(test): "kaldi"}
    assert prepare([data], test, [trials], tmp_path / "out", num_workers=1).reused
    (data / "segments").write_text("a-1 r1 0.0 0.5\n")
    assert not prepare([data], test, [trials], tmp_path / "out", num_workers=1).reused


# --- the "done when": train, score and export from a Kaldi dir as from the tree ------------------

HPARAMS = Path(__file__).resolve().parents[1] / "hparams" / "demo_cpu_qmargin.yaml"
RUN_OPTS = {"device": "cpu", "noprogressbar": True}
ONE_EPOCH = {"batch_size": 16, "crop_seconds": 1.0, "channels": 16, "embedding_dim": 16, "num_workers": 0}


def _scores(folder: Path, scores: str = "scores") -> np.ndarray:
    (path,) = sorted((folder / scores).glob("*.cosine.scores"))
    return np.array([float(line.split()[2]) for line in path.read_text().splitlines()])  # enrol test score label


def _first_batch(train_manifest: Path) -> list[tuple[torch.Tensor, int]]:
    """The first 8 training items (random crops at random speeds, labels), as stage 2 draws them."""
    from qmargin_spk.data.dataset import CropDataset, SpeakerLabelEncoder

    rows = read_manifest(train_manifest)
    crops = CropDataset(rows, SpeakerLabelEncoder.from_rows(rows), crop_seconds=1.0, speed_factors=(0.9, 1.0, 1.1))
    return [crops[i][1:] for i in range(8)]


@pytest.mark.e2e
def test_a_kaldi_dir_of_file_pipe_and_ark_entries_trains_scores_and_exports_like_the_tree(corpus, tmp_path):
    """Trained once, from the Kaldi dir; the tree form is checked against it: the same first batch (so the
    same training) and, with the exported model, the same scores for the tree's files (within 1e-5)."""
    from qmargin_spk.inference import SpeakerModel
    from qmargin_spk.stages.package import package_stage
    from qmargin_spk.stages.score import score_stage
    from qmargin_spk.stages.train import train_stage

    test_ids = kaldi_dir_from_tree(corpus.test_root, tmp_path / "kaldi_test")
    train_ids = kaldi_dir_from_tree(corpus.train_root, tmp_path / "kaldi_train")
    trials = kaldi_trials(corpus.trials, test_ids, tmp_path / "kaldi_trials.txt", max_lines=12)
    exp = tmp_path / "exp"
    prepare([tmp_path / "kaldi_train"], tmp_path / "kaldi_test", [trials], exp / "data", num_workers=1)
    prepare([corpus.train_root], corpus.test_root, [corpus.trials], tmp_path / "tree_data", num_workers=1)
    kaldi_rows, tree_rows = (
        read_manifest(exp / "data" / "train.csv"),
        read_manifest(tmp_path / "tree_data" / "train.csv"),
    )
    assert [train_ids[row.id] for row in tree_rows] == [row.id for row in kaldi_rows]  # the same order
    assert {parse_address(row.wav).kind for row in kaldi_rows} == {"file", "pipe", "ark"}
    for (tree_wav, tree_label), (kaldi_wav, kaldi_label) in zip(
        _first_batch(tmp_path / "tree_data" / "train.csv"), _first_batch(exp / "data" / "train.csv")
    ):
        assert torch.equal(tree_wav, kaldi_wav) and tree_label == kaldi_label

    threads = torch.get_num_threads()
    try:
        train_stage(exp, HPARAMS, RUN_OPTS, None, {**ONE_EPOCH, "warmup_epochs": 1, "number_of_epochs": 1})
    finally:
        torch.set_num_threads(threads)  # stage 2 sets its own for the process; the tests after it keep theirs
    scoring = {"test_root": str(tmp_path / "kaldi_test"), "trial_files": [str(trials)], "bootstrap_resamples": 0}
    score_stage(exp, overrides=scoring, device="cpu")
    model = SpeakerModel.from_folder(package_stage(exp))

    # the tree form of the same trials, embedded from its files by the exported model
    tree_files = _tree_files(corpus.test_root)
    items = [[utterance_id(item) for item in line.split()[1:]] for line in corpus.trials.read_text().splitlines()[:12]]
    used = sorted({item for pair in items for item in pair})
    embedded = dict(zip(used, model.embed([str(tree_files[item]) for item in used])))
    tree_scores = [float(embedded[a] @ embedded[b]) for a, b in items]
    np.testing.assert_allclose(_scores(exp), tree_scores, rtol=0, atol=1e-5)
