"""Tar shards: writing (layout, index, atomic and re-runnable) and the streaming crop dataset (exact epochs)."""

import io
import json
import os
import shlex
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from qmargin_spk.data.audio import AudioError, load_audio, load_audio_bytes
from qmargin_spk.data.dataset import CropDataset, SpeakerLabelEncoder, collate_crops
from qmargin_spk.data.manifest import ManifestRow
from qmargin_spk.data.shards import (
    INDEX_NAME,
    ShardCropDataset,
    ShardIndex,
    worker_item_counts,
    write_shards,
)
from qmargin_spk.data.tar_stream import ShardError, read_shard

RATE = 16000
NUM_UTTS = 61  # not a multiple of the shard size nor of 2 ranks x 2 workers


def _corpus(root: Path, count: int = NUM_UTTS, seed: int = 0) -> list[ManifestRow]:
    """Short noise files of 0.2-0.9 s from 5 speakers (manifest order = speaker-major, as prepare writes it)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        samples = (0.3 * rng.standard_normal(int(rng.uniform(0.2, 0.9) * RATE))).clip(-1, 1)
        speaker = f"id{i * 5 // count:05d}"
        path = root / "wav" / speaker / f"{i:05d}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(path, samples, RATE, subtype="PCM_16")
        rows.append(ManifestRow(f"{speaker}/v/{i:05d}", str(path), len(samples) / RATE, speaker))
    return rows


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    rows = _corpus(root)
    index = write_shards(rows, root / "shards", utts_per_shard=8, seed=3, num_workers=2)
    return rows, index, root / "shards"


def _dataset(folder: Path, rows, **kwargs) -> ShardCropDataset:
    options = dict(crop_seconds=0.25, shuffle_buffer=5, seed=11) | kwargs
    return ShardCropDataset(folder / INDEX_NAME, SpeakerLabelEncoder.from_rows(rows), **options)


def _ids(items) -> list[str]:
    return [item[0] for item in items]


def _loader_batches(dataset, num_workers: int, batch_size: int = 4, drop_last: bool = False) -> list[list[str]]:
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_crops, drop_last=drop_last
    )
    return [batch[0] for batch in loader]


def _loader_ids(dataset, num_workers: int, batch_size: int = 4, drop_last: bool = False) -> list[str]:
    return [utt for batch in _loader_batches(dataset, num_workers, batch_size, drop_last) for utt in batch]


def test_layout_index_and_speaker_mixing(corpus):
    rows, index, folder = corpus
    assert [s.name for s in index.shards] == [f"shard-{k:06d}.tar" for k in range(8)]
    counts = [s.num_utterances for s in index.shards]
    assert sum(counts) == NUM_UTTS and max(counts) - min(counts) <= 1 and max(counts) <= 8
    saved = json.loads((folder / INDEX_NAME).read_text())
    assert saved["format"] == "qmargin_spk.shards/1" and saved["complete"] and saved["num_utterances"] == NUM_UTTS
    assert saved["speakers"] == sorted({r.spk_id for r in rows})
    assert ShardIndex.load(folder / INDEX_NAME).shards == index.shards

    by_id = {row.id: (n, row) for n, row in enumerate(rows)}
    seen = []
    for shard in index.shards:
        with tarfile.open(folder / shard.name) as tar:
            names = tar.getnames()
            assert len(names) == 2 * shard.num_utterances
            for json_name, wav_name in zip(names[::2], names[1::2]):
                meta = json.loads(tar.extractfile(json_name).read())
                number, row = by_id[meta["id"]]
                assert json_name == f"{number:09d}.json" and wav_name == f"{number:09d}.wav"
                assert meta == {"id": row.id, "spk_id": row.spk_id, "duration": row.duration, "index": number}
                assert tar.extractfile(wav_name).read() == Path(row.wav).read_bytes()
                seen.append(meta["spk_id"])
    assert sorted(by_id) == sorted(r.id for r in rows) and len(seen) == NUM_UTTS
    first_shard_speakers = set(seen[: index.shards[0].num_utterances])
    assert len(first_shard_speakers) >= 3, "shards must mix speakers, not follow the speaker-major manifest"


def test_rewriting_is_a_no_op_and_changed_rows_rewrite_only_their_shards(corpus, tmp_path):
    rows, _, _ = corpus
    folder = tmp_path / "shards"
    write_shards(rows, folder, utts_per_shard=8, seed=3, num_workers=1)
    stamps = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.glob("shard-*.tar")}
    assert stamps == {p.name: (stamps[p.name][0], p.read_bytes()) for p in corpus[2].glob("shard-*.tar")}, (
        "the same rows give byte-identical shards"
    )
    (folder / ".shard-000001.tar.abc.tmp").write_bytes(b"left by a killed run")
    write_shards(rows, folder, utts_per_shard=8, seed=3, num_workers=1)
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.glob("shard-*.tar")} == stamps
    assert not list(folder.glob(".*.tmp"))

    changed = list(rows)
    changed[0] = ManifestRow(rows[0].id, rows[0].wav, rows[0].duration, rows[-1].spk_id)
    index = write_shards(changed, folder, utts_per_shard=8, seed=3, num_workers=1)
    rewritten = [p.name for p in sorted(folder.glob("shard-*.tar")) if p.read_bytes() != stamps[p.name][1]]
    assert len(rewritten) == 1, "only the shard holding row 0 changes"
    with tarfile.open(folder / rewritten[0]) as tar:
        assert json.loads(tar.extractfile("000000000.json").read())["spk_id"] == rows[-1].spk_id

    smaller = write_shards(rows[:20], folder, utts_per_shard=8, seed=3, num_workers=1)
    assert sorted(p.name for p in folder.glob("shard-*.tar")) == [s.name for s in smaller.shards]
    assert len(smaller.shards) == 3 and index.num_utterances == NUM_UTTS


def test_an_unfinished_index_is_refused(corpus, tmp_path):
    rows, index, _ = corpus
    ShardIndex(index.shards, index.num_utterances, index.speakers, 3, 8, complete=False).save(tmp_path / INDEX_NAME)
    with pytest.raises(ValueError, match="not all written"):
        ShardIndex.load(tmp_path / INDEX_NAME)
    with pytest.raises(ValueError, match="not a shard index"):
        (tmp_path / "other.json").write_text("{}")
        ShardIndex.load(tmp_path / "other.json")


def test_items_equal_the_file_datasets_items_with_speed_perturbation(corpus):
    rows, _, folder = corpus
    encoder = SpeakerLabelEncoder.from_rows(rows)
    options = dict(crop_seconds=0.5, speed_factors=(0.9, 1.0, 1.1), seed=5)
    files = CropDataset(rows, encoder, **options)
    shards = ShardCropDataset(folder / INDEX_NAME, encoder, shuffle_buffer=1, **options)
    assert shards.num_classes == files.num_classes == 15
    for epoch in (0, 1):
        files.set_epoch(epoch)
        shards.set_epoch(epoch)
        number = {row.id: n for n, row in enumerate(rows)}
        items = list(shards)
        assert len(items) == NUM_UTTS
        for utt, crop, label in items:
            expected = files[number[utt]]
            assert crop.dtype == torch.float32 and crop.shape == (8000,)
            assert expected[0] == utt and expected[2] == label and torch.equal(expected[1], crop)


def _epoch_ids(folder, rows, epoch, world_size=2, num_workers=2, **kwargs) -> list[list[str]]:
    """Ids per rank, reading through a real DataLoader with ``num_workers`` worker processes."""
    per_rank = []
    for rank in range(world_size):
        dataset = _dataset(folder, rows, rank=rank, world_size=world_size, **kwargs)
        dataset.set_epoch(epoch)
        per_rank.append(_loader_ids(dataset, num_workers))
    return per_rank


def test_two_ranks_two_workers_see_each_utterance_once_per_epoch(corpus):
    rows, _, folder = corpus
    epochs = [_epoch_ids(folder, rows, epoch) for epoch in (0, 1)]
    all_ids = {row.id for row in rows}
    for per_rank in epochs:
        assert [len(ids) for ids in per_rank] == [NUM_UTTS // 2] * 2, "equal counts: equal DDP steps"
        seen = Counter(utt for ids in per_rank for utt in ids)
        assert max(seen.values()) == 1 and len(seen) == NUM_UTTS - 1  # N mod W = 1 left out
    left_out = [all_ids - {u for ids in per_rank for u in ids} for per_rank in epochs]
    assert left_out[0] != left_out[1], "the utterance left out changes with the epoch"
    assert epochs[0] != epochs[1]
    assert _epoch_ids(folder, rows, 1) == epochs[1], "same seed and epoch: same order"
    assert _epoch_ids(folder, rows, 1, seed=12) != epochs[1]


def test_every_utterance_once_when_the_world_divides_the_corpus(corpus, tmp_path):
    rows, _, _ = corpus
    write_shards(rows[:60], tmp_path, utts_per_shard=7, seed=1, num_workers=1)
    per_rank = _epoch_ids(tmp_path, rows[:60], 4)
    assert sorted(u for ids in per_rank for u in ids) == sorted(r.id for r in rows[:60])


def test_batch_aligned_split_drops_less_than_one_batch_per_rank(corpus):
    rows, _, folder = corpus
    assert worker_item_counts(30, 2, 4) == [16, 14]  # 7 batches of 4 dealt 4 + 3, the 2 left to worker 1
    assert worker_item_counts(30, 2) == [15, 15]
    for rank in range(2):
        dataset = _dataset(folder, rows, rank=rank, world_size=2, batch_size=4)
        assert len(dataset) == 30 and dataset.num_batches(4, num_workers=2) == 7
        unaligned = _dataset(folder, rows, rank=rank, world_size=2)
        assert unaligned.num_batches(4, num_workers=2) == 6  # 15 // 4 per worker
        ids = _loader_ids(dataset, num_workers=2, drop_last=True)
        assert len(ids) == 28 == 4 * dataset.num_batches(4, num_workers=2)


@pytest.mark.parametrize(
    "batch_aligned, drop_last, num_batches", [(True, True, 7), (False, True, 6), (False, False, 8)]
)
def test_resume_continues_the_same_sequence(corpus, batch_aligned, drop_last, num_batches):
    rows, _, folder = corpus
    options = dict(batch_size=4 if batch_aligned else None, rank=1, world_size=2)
    full = _dataset(folder, rows, **options)
    full.set_epoch(2)
    reference = _loader_batches(full, num_workers=2, drop_last=drop_last)
    assert len(reference) == num_batches == full.num_batches(4, num_workers=2, drop_last=drop_last)
    for done in (1, 4, 7):
        resumed = _dataset(folder, rows, **options)
        resumed.set_epoch(2)
        resumed.resume_after(done, batch_size=4)
        assert _loader_batches(resumed, num_workers=2, drop_last=drop_last) == reference[done:]
    resumed.set_epoch(3)
    assert len(_loader_batches(resumed, num_workers=2, drop_last=drop_last)) == len(reference), (
        "set_epoch ends the resume"
    )


def test_pipe_urls_read_like_local_files(corpus):
    rows, _, folder = corpus
    local = _dataset(folder, rows)
    piped = _dataset(folder, rows, url_template="pipe:cat " + shlex.quote(str(folder)) + "/{name}")
    assert [(utt, label) for utt, _, label in local] == [(utt, label) for utt, _, label in piped]
    assert all(torch.equal(a[1], b[1]) for a, b in zip(local, piped))
    partial = list(read_shard(f"pipe:cat {shlex.quote(str(folder / 'shard-000000.tar'))}", first=2, stop=4))
    assert [key for key, _ in partial] == [key for key, _ in read_shard(str(folder / "shard-000000.tar"))][2:4]
    with pytest.raises(ShardError, match="status"):
        list(read_shard(f"pipe:cat {shlex.quote(str(folder / 'shard-000000.tar'))}; exit 3"))
    with pytest.raises(ShardError, match="no such shard"):
        list(read_shard(str(folder / "missing.tar")))


def _rewrite_member(source: Path, target: Path, member: str, data: bytes | None) -> None:
    """Copy a shard, replacing one member's bytes (or cutting the tar off before it when ``data`` is None)."""
    with tarfile.open(source) as tar, tarfile.open(target, "w", format=tarfile.USTAR_FORMAT) as out:
        for info in tar.getmembers():
            content = tar.extractfile(info).read()
            if info.name == member:
                if data is None:
                    break
                content = data
            info.size = len(content)
            out.addfile(info, io.BytesIO(content))


def test_damaged_members_are_skipped_with_a_warning_and_replaced(corpus, tmp_path):
    rows, index, folder = corpus
    for shard in index.shards:
        os.symlink(folder / shard.name, tmp_path / shard.name)
    (tmp_path / INDEX_NAME).write_text((folder / INDEX_NAME).read_text())
    with tarfile.open(folder / "shard-000002.tar") as tar:
        names = tar.getnames()
    (tmp_path / "shard-000002.tar").unlink()
    _rewrite_member(folder / "shard-000002.tar", tmp_path / "shard-000002.tar", names[3], b"not audio")
    with tarfile.open(folder / "shard-000005.tar") as tar:
        cut_after = tar.getnames()[4]
    (tmp_path / "shard-000005.tar").unlink()
    _rewrite_member(folder / "shard-000005.tar", tmp_path / "shard-000005.tar", cut_after, None)

    dataset = _dataset(tmp_path, rows)
    with pytest.warns(RuntimeWarning) as caught:
        items = list(dataset)
    messages = [str(w.message) for w in caught]
    assert any("shard-000002.tar" in m and f"member {names[3]}" in m for m in messages), messages
    assert any("shard-000005.tar" in m and "read 2 of the" in m for m in messages), messages
    assert len(items) == NUM_UTTS, "replacements keep the epoch length (equal DDP steps)"
    damaged_key = names[3].split(".")[0]
    assert rows[int(damaged_key)].id not in _ids(items)
    assert len(set(_ids(items))) < NUM_UTTS


@pytest.mark.parametrize("piped", [False, True])
def test_a_shard_cut_off_mid_member_warns_and_keeps_the_epoch_length(corpus, tmp_path, piped):
    rows, index, folder = corpus
    for shard in index.shards:
        (tmp_path / shard.name).write_bytes((folder / shard.name).read_bytes())
    (tmp_path / INDEX_NAME).write_text((folder / INDEX_NAME).read_text())
    data = (folder / "shard-000003.tar").read_bytes()
    (tmp_path / "shard-000003.tar").write_bytes(data[: len(data) // 2])
    template = "pipe:cat {root}/{name}" if piped else None
    with pytest.warns(RuntimeWarning, match="shard-000003.tar") as caught:
        items = list(_dataset(tmp_path, rows, url_template=template))
    assert len(items) == NUM_UTTS
    assert any("of the 8 utterances expected" in str(w.message) for w in caught)


def test_unknown_speakers_and_a_missing_shard_are_errors(corpus, tmp_path):
    rows, index, folder = corpus
    with pytest.raises(ValueError, match="not in the label encoder"):
        ShardCropDataset(folder / INDEX_NAME, SpeakerLabelEncoder.from_rows(rows[:10]))
    (tmp_path / INDEX_NAME).write_text((folder / INDEX_NAME).read_text())
    with pytest.raises(ShardError, match="no such shard"):
        list(_dataset(tmp_path, rows))


def _gloo_worker(rank: int, world_size: int, index_path: str, speakers: list, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        dataset = ShardCropDataset(index_path, SpeakerLabelEncoder(speakers), crop_seconds=0.1, shuffle_buffer=4)
        dataset.set_epoch(1)
        ids = _loader_ids(dataset, num_workers=2)
        in_process = _ids(dataset)  # no loader workers: the live process group
        gathered = [None] * world_size
        dist.all_gather_object(
            gathered, {"rank": dist.get_rank(), "len": len(dataset), "ids": ids, "in_process": in_process}
        )
        if rank == 0:
            Path(out).write_text(json.dumps(gathered))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_with_two_workers_each_see_each_utterance_once(corpus, tmp_path):
    rows, index, folder = corpus
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "gathered.json"
    torch.multiprocessing.spawn(
        _gloo_worker, args=(2, str(folder / INDEX_NAME), list(index.speakers), port, str(out)), nprocs=2, join=True
    )
    gathered = json.loads(out.read_text())
    assert [g["rank"] for g in gathered] == [0, 1] and [g["len"] for g in gathered] == [30, 30]
    assert [len(g["ids"]) for g in gathered] == [30, 30]
    seen = Counter(utt for g in gathered for utt in g["ids"])
    assert max(seen.values()) == 1 and len(seen) == NUM_UTTS - 1  # N mod W = 1 left out
    simulated = [
        _dataset(folder, rows, rank=r, world_size=2, crop_seconds=0.1, shuffle_buffer=4, seed=0) for r in (0, 1)
    ]
    for dataset in simulated:
        dataset.set_epoch(1)
    assert [g["ids"] for g in gathered] == [_loader_ids(d, num_workers=2) for d in simulated], (
        "torch.distributed rank = explicit rank"
    )
    assert [g["in_process"] for g in gathered] == [_ids(d) for d in simulated]


def _wav_bytes(samples: np.ndarray, rate: int, **options) -> bytes:
    handle = io.BytesIO()
    soundfile.write(handle, samples, rate, format=options.pop("format", "WAV"), **options)
    return handle.getvalue()


@pytest.mark.parametrize(
    "rate, subtype, fmt",
    [(16000, "PCM_16", "WAV"), (8000, "PCM_16", "WAV"), (16000, "FLOAT", "WAV"), (16000, "PCM_16", "FLAC")],
)
def test_audio_bytes_decode_like_soundfile_reads_the_file(tmp_path, rate, subtype, fmt):
    samples = np.random.default_rng(0).uniform(-0.9, 0.9, rate)
    data = _wav_bytes(samples, rate, subtype=subtype, format=fmt)
    path = tmp_path / "a.audio"
    path.write_bytes(data)
    for start, count in ((0, None), (1234, 4000), (15000, 5000)):
        expected = load_audio(path, 16000, start, count)
        assert torch.equal(load_audio_bytes(data, "a", 16000, start, count), expected)


def test_audio_bytes_skip_extra_chunks_and_refuse_stereo_and_garbage():
    samples = np.random.default_rng(1).integers(-32768, 32767, 3000).astype(np.int16)
    plain = _wav_bytes(samples, RATE, subtype="PCM_16")
    assert plain[36:40] == b"data"
    listed = plain[:36] + b"LIST" + (5).to_bytes(4, "little") + b"abcde\0" + plain[36:]  # odd-sized chunk, padded
    listed = listed[:4] + (len(listed) - 8).to_bytes(4, "little") + listed[8:]
    assert torch.equal(load_audio_bytes(listed, "x"), torch.from_numpy(samples / np.float32(32768)))
    with pytest.raises(AudioError, match="stereo.wav: 2 channels"):
        load_audio_bytes(_wav_bytes(np.zeros((100, 2)), RATE, subtype="PCM_16"), "stereo.wav")
    with pytest.raises(AudioError, match="junk: unreadable audio"):
        load_audio_bytes(b"RIFF not really a wave file", "junk")
    with pytest.raises(AudioError, match="empty audio segment"):
        load_audio_bytes(plain, "short", start=5000, num_samples=10)
