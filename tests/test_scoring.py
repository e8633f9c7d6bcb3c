"""Scoring: trial lists, back-ends against per-trial loops, cached extraction, reports, the whole stage."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile
import torch

from qmargin_spk.data.audio import AudioError, load_audio
from qmargin_spk.metrics import compute_metrics, det_available
from qmargin_spk.scoring import (
    MissingTrialFilesError,
    asnorm_scores,
    backends,
    check_trial_files,
    cosine_scores,
    extract_embeddings,
    read_score_file,
    read_trial_list,
    read_trial_lists,
    results_table,
    score_trial_lists,
    speaker_means,
    unique_utterances,
    write_score_file,
)

SR = 16000

# ---------------------------------------------------------------- trial lists


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_read_trial_list(tmp_path):
    path = write_lines(tmp_path / "veri.txt", ["1 a/x/1.wav a/y/2.wav", "", "0 a/x/1.wav b/z/3.wav"])
    trials = read_trial_list(path)
    assert trials.name == "veri" and len(trials) == 2
    assert trials.labels.tolist() == [1, 0]
    assert trials.enrol.tolist() == ["a/x/1.wav", "a/x/1.wav"]
    assert trials.test.tolist() == ["a/y/2.wav", "b/z/3.wav"]
    assert trials.line_numbers.tolist() == [1, 3]


@pytest.mark.parametrize(
    "bad_line, message",
    [("1 a/x/1.wav", "expected '<label> <enrol> <test>'"), ("2 a b", "label must be 0 or 1"), ("x a b", "label")],
)
def test_malformed_trial_line_names_file_and_line(tmp_path, bad_line, message):
    path = write_lines(tmp_path / "list.txt", ["1 a b", "0 a c", bad_line])
    with pytest.raises(ValueError, match=message) as error:
        read_trial_list(path)
    assert f"{path}:3:" in str(error.value)


def test_empty_trial_list_raises(tmp_path):
    with pytest.raises(ValueError, match="no trials"):
        read_trial_list(write_lines(tmp_path / "empty.txt", [""]))


def test_several_lists_and_unique_utterances(tmp_path):
    o = write_lines(tmp_path / "o.txt", ["1 a b", "0 a c"])
    e = write_lines(tmp_path / "e.txt", ["1 c d", "0 b a"])
    lists = read_trial_lists({"Vox1-O": o, "Vox1-E": e})
    assert [t.name for t in lists] == ["Vox1-O", "Vox1-E"]
    assert unique_utterances(lists).tolist() == ["a", "b", "c", "d"]
    assert [t.name for t in read_trial_lists([o, e])] == ["o", "e"]
    with pytest.raises(ValueError, match="distinct names"):
        read_trial_lists([o, tmp_path / "o.txt"])


def test_check_trial_files_reports_missing(tmp_path):
    root = tmp_path / "wav"
    (root / "s1").mkdir(parents=True)
    (root / "s1" / "ok.wav").write_bytes(b"")
    path = write_lines(
        tmp_path / "list.txt",
        [
            "1 s1/ok.wav s1/ok.wav",
            "0 s1/ok.wav s2/gone1.wav",
            "0 s2/gone2.wav s1/ok.wav",
            "1 s2/gone3.wav s2/gone1.wav",
        ],
    )
    lists = read_trial_lists([path])
    with pytest.raises(MissingTrialFilesError) as error:
        check_trial_files(lists, root, max_listed=2)
    message = str(error.value)
    assert "3 of 4 utterances" in message
    assert f"{path}:2: s2/gone1.wav" in message and f"{path}:3: s2/gone2.wav" in message
    assert "gone3" not in message and "and 1 more" in message
    for name in ("gone1", "gone2", "gone3"):
        (root / "s2").mkdir(exist_ok=True)
        (root / "s2" / f"{name}.wav").write_bytes(b"")
    check_trial_files(lists, root)


# ---------------------------------------------------------------- back-ends


def random_embeddings(seed, n=12, dim=6):
    rng = np.random.default_rng(seed)
    vectors = torch.from_numpy(rng.normal(size=(n, dim)).astype(np.float32))
    enrol = rng.integers(0, n, 50)
    test = rng.integers(0, n, 50)
    return vectors, enrol, test


def cosine_loop(vectors, enrol, test, mean=None):
    x = vectors.double().numpy()
    if mean is not None:
        x = x - mean.double().numpy()
    return np.array([x[e] @ x[t] / (np.linalg.norm(x[e]) * np.linalg.norm(x[t])) for e, t in zip(enrol, test)])


@pytest.mark.parametrize("with_mean", [False, True])
def test_cosine_matches_per_trial_loop(monkeypatch, with_mean):
    monkeypatch.setattr(backends, "TRIAL_BLOCK", 7)  # several blocks
    vectors, enrol, test = random_embeddings(0)
    mean = vectors[:5].mean(dim=0) if with_mean else None
    scores = cosine_scores(vectors, enrol, test, mean=mean)
    assert scores.dtype == np.float64
    np.testing.assert_allclose(scores, cosine_loop(vectors, enrol, test, mean), rtol=0, atol=1e-12)


def test_cosine_rejects_zero_vector():
    vectors = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    with pytest.raises(ValueError, match="all-zero"):
        cosine_scores(vectors, np.array([0]), np.array([1]))


def test_speaker_means_matches_loop():
    vectors, _, _ = random_embeddings(1, n=9)
    speakers = ["b", "a", "b", "c", "a", "a", "c", "b", "b"]
    means, names = speaker_means(vectors, speakers)
    assert names == ["a", "b", "c"]
    for row, name in enumerate(names):
        members = [i for i, s in enumerate(speakers) if s == name]
        np.testing.assert_allclose(means[row].numpy(), vectors[members].numpy().mean(axis=0), rtol=1e-6)
    with pytest.raises(ValueError, match="speaker labels"):
        speaker_means(vectors, speakers[:-1])


def asnorm_loop(vectors, enrol, test, cohort, top_n, mean=None):
    """AS-norm trial by trial, straight from the formula."""
    x = vectors.double().numpy()
    c = cohort.double().numpy()
    if mean is not None:
        x, c = x - mean.double().numpy(), c - mean.double().numpy()
    unit = lambda v: v / np.linalg.norm(v)  # noqa: E731

    def stats(v):
        top = sorted((unit(v) @ unit(row) for row in c), reverse=True)[:top_n]
        return np.mean(top), np.std(top)

    out = []
    for e, t in zip(enrol, test):
        raw = unit(x[e]) @ unit(x[t])
        (me, se), (mt, st) = stats(x[e]), stats(x[t])
        out.append(0.5 * ((raw - me) / se + (raw - mt) / st))
    return np.array(out)


@pytest.mark.parametrize("top_n, with_mean", [(3, False), (5, True), (100, False)])
def test_asnorm_matches_per_trial_loop(monkeypatch, top_n, with_mean):
    monkeypatch.setattr(backends, "UTTERANCE_BLOCK", 5)
    vectors, enrol, test = random_embeddings(2)
    cohort = torch.from_numpy(np.random.default_rng(3).normal(size=(8, 6)).astype(np.float32))
    mean = cohort.mean(dim=0) if with_mean else None
    scores = asnorm_scores(vectors, enrol, test, cohort, top_n=top_n, mean=mean)
    np.testing.assert_allclose(scores, asnorm_loop(vectors, enrol, test, cohort, top_n, mean), rtol=0, atol=1e-10)


def test_asnorm_rejects_tiny_top_n():
    vectors, enrol, test = random_embeddings(4)
    with pytest.raises(ValueError, match="top_n"):
        asnorm_scores(vectors, enrol, test, vectors[:4], top_n=1)


# ---------------------------------------------------------------- extraction


def write_wav(path, seconds, frequency=220.0, rate=SR, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * rate)) / rate
    noise = np.random.default_rng(seed).normal(scale=0.05, size=t.size)
    soundfile.write(path, (0.5 * np.sin(2 * np.pi * frequency * t) + noise).astype(np.float32), rate)
    return path


def features(wav):
    """Mean, mean energy and length of one unpadded waveform."""
    return torch.stack([wav.double().mean(), (wav.double() ** 2).mean(), torch.tensor(float(wav.numel()))])


class CountingEmbedder:
    """Dummy model: ``features`` of each unpadded row; records every batch width and size."""

    def __init__(self):
        self.batches = []

    def __call__(self, wavs, rel_lens):
        assert not torch.is_grad_enabled()
        self.batches.append((wavs.shape[1], wavs.shape[0]))
        lengths = torch.round(rel_lens * wavs.shape[1]).long()
        return torch.stack([features(wav[:n]) for wav, n in zip(wavs, lengths)]).float()


@pytest.fixture()
def small_corpus(tmp_path):
    lengths = {"u1": 0.30, "u2": 0.55, "u3": 0.20, "u4": 0.80, "u5": 0.41}
    return {utt: write_wav(tmp_path / "wav" / f"{utt}.wav", s, seed=i) for i, (utt, s) in enumerate(lengths.items())}


def test_extract_embeddings_matches_direct_features(tmp_path, small_corpus):
    embedder = CountingEmbedder()
    # max_padding=1: any lengths may share a batch (this dummy model masks padding exactly)
    table = extract_embeddings(small_corpus, embedder, tmp_path / "cache.pt", "model-a", batch_size=2, max_padding=1.0)
    assert table.utt_ids == sorted(small_corpus)
    expected = torch.stack([features(load_audio(small_corpus[u])) for u in table.utt_ids]).float()
    torch.testing.assert_close(table.vectors, expected)
    widths = [width for width, _ in embedder.batches]
    assert widths == sorted(widths, reverse=True)  # longest first: each batch pads to its own longest
    assert [size for _, size in embedder.batches] == [2, 2, 1]  # each utterance once
    np.testing.assert_array_equal(table.indices(["u4", "u1", "u4"]), [3, 0, 3])
    with pytest.raises(KeyError, match="no embedding"):
        table.indices(["u9"])


def test_extract_embeddings_resamples(tmp_path):
    paths = {"a": write_wav(tmp_path / "a.wav", 0.5, rate=8000)}
    table = extract_embeddings(paths, CountingEmbedder(), None, "m")
    assert table.vectors[0, 2].item() == 8000  # 0.5 s at 16 kHz


def test_cache_is_reused_and_invalidated(tmp_path, small_corpus):
    cache = tmp_path / "emb" / "cache.pt"
    first = extract_embeddings(small_corpus, CountingEmbedder(), cache, "model-a")
    assert cache.is_file() and [p.name for p in cache.parent.iterdir()] == ["cache.pt"]

    def must_not_run(wavs, rel_lens):
        raise AssertionError("cache hit expected")

    again = extract_embeddings(small_corpus, must_not_run, cache, "model-a")
    torch.testing.assert_close(again.vectors, first.vectors)

    for changed in (
        dict(model_id="model-b"),
        dict(model_id="model-a", chunk_seconds=0.25),
        dict(model_id="model-a", paths={k: v for k, v in small_corpus.items() if k != "u1"}),
    ):
        embedder = CountingEmbedder()
        extract_embeddings(changed.pop("paths", small_corpus), embedder, cache, **changed)
        assert embedder.batches, f"{changed} must invalidate the cache"


def test_chunked_extraction_averages_chunks(tmp_path):
    paths = {"long": write_wav(tmp_path / "long.wav", 2.0), "short": write_wav(tmp_path / "short.wav", 0.7)}
    embedder = CountingEmbedder()
    table = extract_embeddings(paths, embedder, None, "m", batch_size=1, chunk_seconds=0.5)
    # 2.0 s -> 4 chunks of 0.5 s; 0.7 s rounds to one chunk: the whole utterance.
    assert [width for width, _ in embedder.batches] == [11200, 8000, 8000, 8000, 8000]
    long = load_audio(paths["long"])
    expected = torch.stack([features(chunk) for chunk in long.split(8000)]).mean(dim=0).float()
    torch.testing.assert_close(table.vectors[table.indices(["long"])[0]], expected)
    assert table.vectors[table.indices(["short"])[0], 2].item() == 11200


def test_audio_error_names_the_file(tmp_path, small_corpus):
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"not audio at all")
    with pytest.raises(AudioError, match="broken.wav"):
        extract_embeddings({**small_corpus, "bad": broken}, CountingEmbedder(), None, "m")
    with pytest.raises(AudioError, match="missing.wav"):
        extract_embeddings({"x": tmp_path / "missing.wav"}, CountingEmbedder(), None, "m")


def test_embed_fn_output_is_checked(small_corpus):
    flat = lambda wavs, rel_lens: torch.zeros(wavs.shape[0] * 3)  # noqa: E731
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        extract_embeddings(small_corpus, flat, None, "m")
    nan = lambda wavs, rel_lens: torch.full((wavs.shape[0], 2), float("nan"))  # noqa: E731
    with pytest.raises(ValueError, match="NaN/inf embeddings for .*u4.wav"):
        extract_embeddings(small_corpus, nan, None, "m")
    with_singleton = lambda wavs, rel_lens: torch.ones(wavs.shape[0], 1, 4)  # noqa: E731
    assert extract_embeddings(small_corpus, with_singleton, None, "m").vectors.shape == (5, 4)


# ---------------------------------------------------------------- reports


def test_score_file_round_trips_exactly(tmp_path):
    rng = np.random.default_rng(0)
    scores = np.r_[rng.normal(size=20), [1e-300, -1 / 3, 0.1 + 0.2, 123456789.123456789]]
    labels = rng.integers(0, 2, scores.size)
    enrol = [f"e{i}" for i in range(scores.size)]
    test = [f"t{i}" for i in range(scores.size)]
    path = tmp_path / "s.scores"
    write_score_file(path, enrol, test, scores, labels)
    read_enrol, read_test, read_scores, read_labels = read_score_file(path)
    assert read_enrol == enrol and read_test == test
    np.testing.assert_array_equal(read_scores, scores)  # bit-exact
    np.testing.assert_array_equal(read_labels, labels)
    assert path.read_text().splitlines()[-2] == f"e22 t22 0.30000000000000004 {labels[-2]}"


def test_results_table():
    scores = np.r_[np.arange(20.0), [5.5, 10.5, 15.5, 18.5, 25.0]]
    labels = np.r_[np.zeros(20, int), np.ones(5, int)]
    metrics = compute_metrics(scores, labels, fars=(0.5, 0.01)).to_dict()
    table = results_table([{"list": "toy", "backend": "cosine", "n_trials": 25, "metrics": metrics}])
    header, rule, row = table.splitlines()
    assert header == "| list | back-end | trials | EER % | minDCF@0.01 | minDCF@0.05 | TAR@FAR=0.5 % | TAR@FAR=0.01 % |"
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:3] == ["toy", "cosine", "25"]
    assert cells[3] == f"{100 * metrics['eer']:.3f}"
    assert cells[6:] == ["80.00", "n/a"]


# ---------------------------------------------------------------- end to end


def make_corpus(root, speakers, utterances_per_speaker, seed):
    """``root/<spk>/<video>/<n>.wav``: each speaker a distinct tone (plus noise)."""
    paths = {}
    for s, (speaker, frequency) in enumerate(speakers.items()):
        for n in range(utterances_per_speaker):
            utt = f"{speaker}/vid{n % 2}/{n:05d}.wav"
            paths[utt] = write_wav(root / utt, 0.25 + 0.05 * n, frequency, seed=seed + 10 * s + n)
    return paths


def spectral_embedder(wavs, rel_lens):
    """Energy in 16 frequency bands: separates the tones of different speakers."""
    lengths = torch.round(rel_lens * wavs.shape[1]).long()
    out = []
    for wav, n in zip(wavs, lengths):
        spectrum = torch.fft.rfft(wav[:n], n=4096).abs() ** 2
        out.append(torch.stack([band.sum() for band in spectrum[:1024].chunk(16)]).log1p())
    return torch.stack(out)


def test_pipeline_end_to_end(tmp_path, capsys):
    speakers = {"id10001": 300.0, "id10002": 700.0, "id10003": 1500.0}
    wav_root = tmp_path / "vox1" / "wav"
    utts = sorted(make_corpus(wav_root, speakers, 4, seed=0))
    rng = np.random.default_rng(0)
    lines = [f"{int(a.split('/')[0] == b.split('/')[0])} {a} {b}" for a in utts for b in utts if a < b]
    o = write_lines(tmp_path / "veri_test2.txt", lines[::2])
    e = write_lines(tmp_path / "list_test_all2.txt", list(rng.permutation(lines)))
    cohort = make_corpus(tmp_path / "vox2", {"id00001": 400.0, "id00002": 1000.0, "id00003": 2000.0}, 3, seed=99)
    out = tmp_path / "exp" / "scores"

    vectors = torch.stack([spectral_embedder(load_audio(wav_root / u)[None], torch.ones(1))[0] for u in utts])
    index = {u: i for i, u in enumerate(utts)}

    result = score_trial_lists(spectral_embedder, "toy-v1", wav_root, {"O": o, "E": e}, out)
    assert [r["list"] for r in result["results"]] == ["O", "E"]
    for entry in result["results"]:
        assert entry["metrics"]["eer"] == 0.0  # distinct tones are perfectly separable
        enrol, test, scores, labels = read_score_file(entry["score_file"])
        trials = read_trial_list(entry["trial_file"])
        assert enrol == trials.enrol.tolist() and labels.tolist() == trials.labels.tolist()
        expected = cosine_loop(vectors, [index[u] for u in enrol], [index[u] for u in test])
        np.testing.assert_allclose(scores, expected, atol=1e-6)
        if det_available():
            assert open(entry["det_plot"], "rb").read(4) == b"\x89PNG"
    saved = json.loads((out / "results.cosine.json").read_text())
    assert saved["results"] == result["results"] and saved["model_id"] == "toy-v1"
    table = (out / "results.cosine.md").read_text()
    assert table == result["table"] and table in capsys.readouterr().out

    # AS-norm embeds the cohort once; the test embeddings come from the cache.
    calls = []
    counting = lambda wavs, rel_lens: (calls.append(wavs.shape[0]), spectral_embedder(wavs, rel_lens))[1]  # noqa: E731
    normed = score_trial_lists(
        counting, "toy-v1", wav_root, {"O": o}, out, backend="asnorm", cohort_paths=cohort, top_n=2, print_table=False
    )
    assert sum(calls) == len(cohort)
    assert normed["settings"]["n_cohort_speakers"] == 3 and normed["settings"]["subtract_mean"] is True
    assert (out / "results.asnorm.md").is_file()
    cohort_utts = sorted(cohort)
    cohort_vectors = torch.stack(
        [spectral_embedder(load_audio(cohort[u])[None], torch.ones(1))[0] for u in cohort_utts]
    )
    speaker_vectors = torch.stack([cohort_vectors[i : i + 3].mean(dim=0) for i in (0, 3, 6)])
    enrol, test, scores, _ = read_score_file(out / "O.asnorm.scores")
    expected = asnorm_loop(
        vectors, [index[u] for u in enrol], [index[u] for u in test], speaker_vectors, 2, cohort_vectors.mean(dim=0)
    )
    np.testing.assert_allclose(scores, expected, rtol=1e-4)  # float32 embeddings, small top-N std


def test_pipeline_checks_files_before_extracting(tmp_path):
    wav_root = tmp_path / "wav"
    make_corpus(wav_root, {"id1": 300.0}, 2, seed=0)
    trials = write_lines(
        tmp_path / "t.txt", ["1 id1/vid0/00000.wav id1/vid1/00001.wav", "0 id1/vid0/00000.wav id9/x/1.wav"]
    )

    def must_not_run(wavs, rel_lens):
        raise AssertionError("no extraction before the lists are checked")

    with pytest.raises(MissingTrialFilesError, match=r"t.txt:2: id9/x/1.wav"):
        score_trial_lists(must_not_run, "m", wav_root, [trials], tmp_path / "out")
    with pytest.raises(ValueError, match="needs cohort_paths"):
        score_trial_lists(must_not_run, "m", wav_root, [trials], tmp_path / "out", backend="asnorm")
