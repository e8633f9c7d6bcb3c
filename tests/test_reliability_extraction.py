"""Issue 9, items 4 and 6: embeddings that do not depend on batch-mates, bounded batches,
and extraction that keeps its work when one file is bad."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from qmargin_spk.data.audio import AudioError
from qmargin_spk.scoring import extract_embeddings

SR = 16000


def write_noise(path, seconds, seed, rate=SR, subtype=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    samples = np.random.default_rng(seed).normal(scale=0.1, size=int(round(seconds * rate))).astype(np.float32)
    soundfile.write(path, samples, rate, subtype=subtype)
    return path


@pytest.fixture(scope="module")
def ecapa():
    """A small random ECAPA-TDNN composed like the demo experiment (40 mel bands; eval mode)."""
    from conftest import recipe_embedder

    embedder, _ = recipe_embedder({"channels": 32, "embedding_dim": 32, "attention_channels": 16, "n_mels": 40})
    return embedder


class Recorder:
    """Dummy model: mean and length of each unpadded row; records every batch's (rows, width)."""

    def __init__(self):
        self.batches = []

    def __call__(self, wavs, rel_lens):
        self.batches.append((wavs.shape[0], wavs.shape[1]))
        lengths = torch.round(rel_lens * wavs.shape[1]).long()
        return torch.stack(
            [torch.stack([w[:n].double().mean(), torch.tensor(float(n))]) for w, n in zip(wavs, lengths)]
        ).float()


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0).item()


# ---------------------------------------------------------------- batching does not change embeddings


def test_embedding_is_independent_of_its_batch_mates(tmp_path, ecapa):
    lengths = {"clip": 0.3, "long": 20.0, "mid_a": 1.0, "mid_b": 1.0, "mid_c": 1.02, "short": 0.55}
    paths = {utt: write_noise(tmp_path / f"{utt}.wav", s, seed) for seed, (utt, s) in enumerate(lengths.items())}
    batched = extract_embeddings(paths, ecapa, None, "ecapa", batch_size=16)
    single = extract_embeddings(paths, ecapa, None, "ecapa", batch_size=1)
    for utt in paths:
        alone = extract_embeddings({utt: paths[utt]}, ecapa, None, "ecapa", batch_size=16).vectors[0]
        for table in (batched, single):
            row = table.indices([utt])[0]
            assert cosine(table.vectors[row], alone) >= 0.9999, utt


def test_batches_are_bounded_in_padding_and_samples(tmp_path):
    lengths = [1.0] * 7 + [0.98, 0.9, 5.0]
    paths = {f"u{i}": write_noise(tmp_path / f"u{i}.wav", s, i) for i, s in enumerate(lengths)}
    recorder = Recorder()
    table = extract_embeddings(paths, recorder, None, "m", batch_size=16, max_batch_seconds=3.0)
    assert sorted(recorder.batches) == [(1, 14400), (1, 15680), (1, 16000), (1, 80000), (3, 16000), (3, 16000)]
    assert all(rows * width <= 3 * SR for rows, width in recorder.batches if rows > 1)  # a longer file goes alone
    np.testing.assert_array_equal(table.vectors[:, 1].numpy(), [int(s * SR) for s in lengths])

    recorder = Recorder()
    extract_embeddings(paths, recorder, None, "m", batch_size=16, max_batch_seconds=100.0, max_padding=0.05)
    assert sorted(recorder.batches) == [
        (1, 14400),
        (1, 80000),
        (8, 16000),
    ]  # 0.98 s joins the 1 s files, 0.9 s does not
    with pytest.raises(ValueError, match="max_padding"):
        extract_embeddings(paths, recorder, None, "m", max_padding=1.5)
    with pytest.raises(ValueError, match="max_batch_seconds"):
        extract_embeddings(paths, recorder, None, "m", max_batch_seconds=0)


def test_batch_policy_is_in_the_cache_key(tmp_path):
    paths = {f"u{i}": write_noise(tmp_path / f"u{i}.wav", 0.5, i) for i in range(3)}
    cache = tmp_path / "cache.pt"
    extract_embeddings(paths, Recorder(), cache, "m", batch_size=16)
    for changed in (dict(batch_size=1), dict(max_padding=0.01), dict(max_batch_seconds=10.0)):
        recorder = Recorder()
        extract_embeddings(paths, recorder, cache, "m", **changed)
        assert recorder.batches, f"{changed} must invalidate the cache"


# ---------------------------------------------------------------- a bad file does not lose the work done


def write_with_nan(path, seconds, seed):
    samples = np.random.default_rng(seed).normal(scale=0.1, size=int(seconds * SR)).astype(np.float32)
    samples[len(samples) // 2] = np.nan
    soundfile.write(path, samples, SR, subtype="FLOAT")  # the header is fine, the samples are not
    return path


@pytest.fixture()
def five_files(tmp_path):
    lengths = {"a": 0.3, "b": 0.4, "c": 0.5, "d": 0.6, "e": 0.7}
    return {utt: write_noise(tmp_path / "wav" / f"{utt}.wav", s, i) for i, (utt, s) in enumerate(lengths.items())}


def partial_files(cache):
    return sorted(p.name for p in cache.parent.iterdir() if p.name != cache.name)


def test_bad_file_is_named_and_the_other_embeddings_are_kept(tmp_path, five_files):
    cache = tmp_path / "emb" / "test.pt"
    fresh = extract_embeddings(five_files, Recorder(), None, "m")
    write_with_nan(five_files["c"], 0.5, 7)
    write_with_nan(five_files["e"], 0.7, 8)
    with pytest.raises(
        AudioError, match=r"(?s)2 of 5 .*kept in .*c\.wav: audio contains NaN or inf.*e\.wav: audio contains NaN"
    ):
        extract_embeddings(five_files, Recorder(), cache, "m")
    assert not cache.exists() and partial_files(cache) == ["test.pt.partial"]

    # Repaired files: only they are embedded; the result is that of an uninterrupted run.
    write_noise(five_files["c"], 0.5, 2)
    write_noise(five_files["e"], 0.7, 4)
    recorder = Recorder()
    table = extract_embeddings(five_files, recorder, cache, "m")
    assert sorted(recorder.batches) == [(1, 8000), (1, 11200)]
    torch.testing.assert_close(table.vectors, fresh.vectors, rtol=0, atol=0)
    assert cache.is_file() and partial_files(cache) == []

    # Or without the bad utterance (another utterance set, so another cache key): nothing is recomputed.
    write_with_nan(five_files["c"], 0.5, 7)
    with pytest.raises(AudioError, match="1 of 5"):
        extract_embeddings(five_files, Recorder(), tmp_path / "other" / "test.pt", "m")
    good = {utt: five_files[utt] for utt in "abde"}
    recorder = Recorder()
    table = extract_embeddings(good, recorder, tmp_path / "other" / "test.pt", "m")
    assert recorder.batches == []
    torch.testing.assert_close(table.vectors, fresh.vectors[[0, 1, 3, 4]], rtol=0, atol=0)


def test_failing_model_keeps_finished_batches(tmp_path, five_files):
    cache = tmp_path / "emb" / "test.pt"
    calls = []

    def fails_on_third_batch(wavs, rel_lens):
        calls.append(wavs.shape[1])
        if len(calls) == 3:
            raise RuntimeError("CUDA out of memory (simulated)")
        return Recorder()(wavs, rel_lens)

    with pytest.raises(RuntimeError, match="out of memory"):
        extract_embeddings(five_files, fails_on_third_batch, cache, "m")
    recorder = Recorder()
    table = extract_embeddings(five_files, recorder, cache, "m")
    assert [width for _, width in recorder.batches] == [8000, 6400, 4800]  # e (0.7 s) and d (0.6 s) were kept
    torch.testing.assert_close(table.vectors, extract_embeddings(five_files, Recorder(), None, "m").vectors)


def test_progress_is_saved_while_extracting(tmp_path, five_files):
    """A kill -9 cannot run an exception handler: progress is also saved every ``save_every_seconds``."""
    cache = tmp_path / "emb" / "test.pt"
    seen = []

    def inspect_partial(wavs, rel_lens):
        partial = cache.parent / "test.pt.partial"
        stored = torch.load(partial, weights_only=True) if partial.exists() else {"paths": []}
        seen.append(sorted(Path(p).stem for p in stored["paths"]))
        return Recorder()(wavs, rel_lens)

    extract_embeddings(five_files, inspect_partial, cache, "m", save_every_seconds=0.0)
    assert seen == [[], ["e"], ["d", "e"], ["c", "d", "e"], ["b", "c", "d", "e"]]
    assert partial_files(cache) == []
