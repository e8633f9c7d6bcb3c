"""Caches built from audio are keyed on its content: embeddings (complete and partial) and tar shards
follow an audio file changed in place, and the embedding cache also follows the front-end settings."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from qmargin_spk.data.manifest import ManifestRow
from qmargin_spk.data.shards import write_shards
from qmargin_spk.scoring import extract_embeddings, read_score_file, score_trial_lists

SR = 16000


def write_wav(path: Path, samples: np.ndarray, keep_mtime: bool = False) -> Path:
    """Write 16-bit PCM (same length, same size); ``keep_mtime`` restores the previous mtime, as ``cp -p`` would."""
    before = path.stat() if keep_mtime else None
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, samples, SR, subtype="PCM_16")
    if before is not None:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    return path


def noise(seconds: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(scale=0.1, size=int(round(seconds * SR))).clip(-1, 1)


class BandEnergies:
    """Dummy model: energy in 8 frequency bands of each unpadded row; records the width of every row embedded."""

    def __init__(self):
        self.widths = []

    def __call__(self, wavs, rel_lens):
        lengths = torch.round(rel_lens * wavs.shape[1]).long()
        self.widths += lengths.tolist()
        bands = [(torch.fft.rfft(w[:n], n=2048).abs() ** 2)[:512].reshape(8, -1) for w, n in zip(wavs, lengths)]
        return torch.stack([band.sum(1).log1p() for band in bands])


# ---------------------------------------------------------------- the fingerprint


def test_fingerprint_follows_size_mtime_and_edge_blocks(tmp_path):
    from qmargin_spk.data.fingerprint import EDGE_BYTES, audio_fingerprint, audio_fingerprints

    path = tmp_path / "a.bin"
    data = bytearray(np.random.default_rng(0).integers(0, 256, 4 * EDGE_BYTES, dtype=np.uint8).tobytes())
    path.write_bytes(data)
    first = audio_fingerprint(path)
    assert audio_fingerprint(path) == first

    def rewritten(offset: int) -> str:
        stat = path.stat()
        changed = bytearray(data)
        changed[offset] ^= 0xFF
        path.write_bytes(changed)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        return audio_fingerprint(path)

    assert rewritten(10) != first  # header / first block
    assert rewritten(len(data) - 1) != first  # last block
    assert rewritten(2 * EDGE_BYTES) == first  # documented blind spot: mid-file edit with the mtime restored
    path.write_bytes(data)
    os.utime(path, ns=(1, 1))
    assert audio_fingerprint(path) != first  # mtime alone
    path.write_bytes(data[:-1])
    assert audio_fingerprint(path).split(":")[0] == str(len(data) - 1)
    small = tmp_path / "small.bin"
    small.write_bytes(b"xy")
    assert audio_fingerprint(small).startswith("2:")

    fifo = tmp_path / "fifo.wav"
    os.mkfifo(fifo)  # would block an open()
    many = [path, tmp_path / "missing.wav", fifo, small]
    expected = [audio_fingerprint(path), None, None, audio_fingerprint(small)]
    assert audio_fingerprints(many, num_workers=2, chunk=1) == audio_fingerprints(many, num_workers=1) == expected


# ---------------------------------------------------------------- embeddings and scores


@pytest.fixture()
def trial_setup(tmp_path, monkeypatch):
    """Two speakers x two utterances of distinct lengths (so a width names the file), all six pairs as trials."""
    monkeypatch.setattr("qmargin_spk.scoring.pipeline.det_available", lambda: False)
    root = tmp_path / "wav"
    lengths = {"id0/v0/1.wav": 0.30, "id0/v1/1.wav": 0.35, "id1/v0/1.wav": 0.40, "id1/v1/1.wav": 0.45}
    for seed, (utt, seconds) in enumerate(lengths.items()):
        write_wav(root / utt, noise(seconds, seed))
    utts = sorted(lengths)
    trials = tmp_path / "O.txt"
    trials.write_text("".join(f"{int(a[:3] == b[:3])} {a} {b}\n" for a in utts for b in utts if a < b))
    return root, trials, lengths


def scores_by_pair(root, trials, out, embed, **kwargs) -> dict[tuple[str, str], float]:
    run = score_trial_lists(embed, "m", root, {"O": trials}, out, print_table=False, bootstrap_resamples=0, **kwargs)
    enrol, test, scores, _ = read_score_file(run["results"][0]["score_file"])
    return {(e, t): float(s) for e, t, s in zip(enrol, test, scores)}


@pytest.mark.parametrize("keep_mtime", [False, True], ids=["rewritten", "mtime_restored"])
def test_audio_changed_in_place_is_embedded_again_and_rescored(trial_setup, tmp_path, keep_mtime):
    root, trials, lengths = trial_setup
    out = tmp_path / "scores"
    first = BandEnergies()
    before = scores_by_pair(root, trials, out, first)
    assert sorted(first.widths) == sorted(int(round(s * SR)) for s in lengths.values())

    changed = "id0/v1/1.wav"
    samples = soundfile.read(root / changed)[0]
    samples[:2000] = noise(2000 / SR, 99)  # a different first block, same length and size
    size = (root / changed).stat().st_size
    write_wav(root / changed, samples, keep_mtime=keep_mtime)
    assert (root / changed).stat().st_size == size

    second = BandEnergies()
    after = scores_by_pair(root, trials, out, second)
    assert second.widths == [int(round(lengths[changed] * SR))], "only the changed file is embedded again"
    assert all(abs(after[pair] - before[pair]) > 1e-6 for pair in after if changed in pair), "its scores change"
    assert all(after[pair] == before[pair] for pair in after if changed not in pair)

    third = BandEnergies()
    assert scores_by_pair(root, trials, out, third) == after and third.widths == [], "then all from the cache"


def test_front_end_settings_are_in_the_cache_key(trial_setup, tmp_path):
    root, trials, lengths = trial_setup
    out = tmp_path / "scores"
    scores_by_pair(root, trials, out, BandEnergies(), frontend={"name": "fbank", "n_mels": 80})
    same = BandEnergies()
    scores_by_pair(root, trials, out, same, frontend={"n_mels": 80, "name": "fbank"})
    assert same.widths == []
    other = BandEnergies()
    scores_by_pair(root, trials, out, other, frontend={"name": "fbank", "n_mels": 40})
    assert len(other.widths) == len(lengths)


def test_partial_progress_is_not_reused_for_a_changed_file(tmp_path):
    lengths = {"a": 0.3, "b": 0.4, "c": 0.5, "d": 0.6, "e": 0.7}  # embedded longest first, one per batch
    paths = {utt: write_wav(tmp_path / f"{utt}.wav", noise(s, i)) for i, (utt, s) in enumerate(lengths.items())}
    cache = tmp_path / "emb" / "test.pt"
    calls = []

    def fails_on_third_batch(wavs, rel_lens):
        calls.append(wavs.shape[1])
        if len(calls) == 3:
            raise RuntimeError("CUDA out of memory (simulated)")
        return BandEnergies()(wavs, rel_lens)

    with pytest.raises(RuntimeError, match="out of memory"):
        extract_embeddings(paths, fails_on_third_batch, cache, "m")
    assert Path(f"{cache}.partial").is_file()  # holds e and d
    write_wav(paths["e"], noise(0.7, 42), keep_mtime=True)

    recorder = BandEnergies()
    table = extract_embeddings(paths, recorder, cache, "m")
    assert sorted(recorder.widths) == [4800, 6400, 8000, 11200], "d resumed; e embedded again"
    torch.testing.assert_close(table.vectors, extract_embeddings(paths, BandEnergies(), None, "m").vectors)


# ---------------------------------------------------------------- tar shards


def test_a_changed_source_file_rewrites_its_shard_with_the_new_samples(tmp_path):
    rows = []
    for i in range(12):
        speaker = f"id{i % 3}"
        path = write_wav(tmp_path / "wav" / speaker / f"{i:02d}.wav", noise(0.2 + 0.01 * i, i))
        rows.append(ManifestRow(f"{speaker}/v/{i:02d}", str(path), (0.2 + 0.01 * i), speaker))
    folder = tmp_path / "shards"

    def shards() -> dict[str, tuple[int, bytes]]:
        return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.glob("shard-*.tar"))}

    write_shards(rows, folder, utts_per_shard=4, num_workers=1)
    for keep_mtime in (True, False):  # new samples with the old mtime (the edge blocks' hash), then a plain rewrite
        before = shards()
        source = Path(rows[5].wav)
        write_wav(source, noise(0.25, 100 + keep_mtime), keep_mtime=keep_mtime)
        write_shards(rows, folder, utts_per_shard=4, num_workers=1)
        after = shards()
        rewritten = [name for name in after if after[name] != before[name]]
        assert len(rewritten) == 1, "only the shard holding row 5 is rewritten"
        with tarfile.open(folder / rewritten[0]) as tar:
            assert tar.extractfile(f"{5:09d}.wav").read() == source.read_bytes()
