"""The one batch planner: its policy on lengths, and the same embeddings through every door that uses it."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile
import torch

from qmargin_spk.data.batching import Piece, batch_pieces, chunk_bounds, plan_batches, plan_pieces
from qmargin_spk.inference import SpeakerModel
from qmargin_spk.scoring.embeddings import extract_embeddings


@pytest.mark.parametrize(
    "length, chunk", [(1, 3), (10, 3), (16000, 48000), (71999, 48000), (72000, 48000), (320000, 48000), (7, None)]
)
def test_chunks_are_near_equal_contiguous_and_round_the_count(length, chunk):
    bounds = chunk_bounds(length, chunk)
    expected_count = 1 if chunk is None else max(1, round(length / chunk))
    assert len(bounds) == expected_count
    assert bounds[0][0] == 0 and bounds[-1][1] == length
    assert all(end == start for (_, end), (start, _) in zip(bounds[:-1], bounds[1:]))
    sizes = [end - start for start, end in bounds]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_pieces_come_longest_first_and_only_unchunked_items_are_whole():
    pieces = plan_pieces({0: 16000, 2: 40000, 5: 16000}, chunk_seconds=1.5, sample_rate=16000)
    assert [p.length for p in pieces] == sorted((p.length for p in pieces), reverse=True)
    assert [(p.row, p.start, p.length, p.whole) for p in pieces] == [
        (2, 0, 20000, False),
        (2, 20000, 20000, False),
        (0, 0, 16000, True),
        (5, 0, 16000, True),
    ]
    with pytest.raises(ValueError, match="chunk_seconds"):
        plan_pieces({0: 10}, chunk_seconds=1e-6, sample_rate=16000)


def brute_force_batches(lengths, batch_size, max_padding, max_samples):
    """The policy written as a loop over the sorted lengths, for comparison."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches = []
    for i in order:
        if batches:
            head = lengths[batches[-1][0]]
            room = len(batches[-1]) < batch_size
            close = lengths[i] >= (1 - max_padding) * head - 1e-9
            small = max_samples is None or (len(batches[-1]) + 1) * head <= max_samples
            if room and close and small:
                batches[-1].append(i)
                continue
        batches.append([i])
    return batches


@pytest.mark.parametrize(
    "batch_size, max_padding, max_samples",
    [(16, 0.0, None), (2, 0.0, None), (16, 0.0, 40), (16, 0.25, None), (3, 0.5, 50)],
)
def test_batches_follow_the_policy(batch_size, max_padding, max_samples):
    rng = np.random.default_rng(0)
    lengths = rng.choice([4, 10, 10, 10, 12, 16, 16, 30, 100], size=40).tolist()
    plan = plan_batches(lengths, batch_size, max_padding, max_samples)
    assert plan == brute_force_batches(lengths, batch_size, max_padding, max_samples)
    assert sorted(i for batch in plan for i in batch) == list(range(len(lengths)))
    for batch in plan:
        assert len(batch) <= batch_size
        assert len(batch) == 1 or max_samples is None or len(batch) * lengths[batch[0]] <= max_samples
        if max_padding == 0:
            assert len({lengths[i] for i in batch}) == 1


def test_a_long_item_goes_alone_and_equal_lengths_share_a_batch():
    assert plan_batches([5, 100, 5, 5, 7], batch_size=16, max_samples=50) == [[1], [4], [0, 2, 3]]
    assert plan_batches([5, 5, 5], batch_size=2) == [[0, 1], [2]]
    pieces = [Piece(0, 0, 5, True), Piece(1, 0, 6, True), Piece(2, 0, 5, True)]
    assert [[p.row for p in batch] for batch in batch_pieces(pieces, 16)] == [[1], [0, 2]]
    with pytest.raises(ValueError, match="batch_size"):
        plan_batches([1], batch_size=0)
    with pytest.raises(ValueError, match="max_padding"):
        plan_batches([1], batch_size=1, max_padding=2.0)


def test_the_planner_never_imports_torch():
    import subprocess
    import sys

    script = "import sys; import qmargin_spk.inference.onnx_runtime; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", script], capture_output=True).returncode == 0


@pytest.mark.parametrize("chunk_seconds", [None, 2.0])
def test_mixed_lengths_embed_as_one_file_at_a_time_through_every_door(tiny_model, audio_dir, tmp_path, chunk_seconds):
    """Stage-3 extraction, SpeakerModel and the ONNX runner: a batch of a list equals each file alone."""
    pytest.importorskip("onnxruntime")
    from qmargin_spk.inference import export_onnx
    from qmargin_spk.inference.onnx_runtime import OnnxSpeakerModel

    torch.set_num_threads(1)
    files = sorted(audio_dir.rglob("*.wav"))
    for copy in range(2):  # more files of one length, so equal lengths do share batches
        target = tmp_path / f"copy{copy}.wav"
        target.write_bytes(files[1].read_bytes())
        files.append(target)
    model = SpeakerModel.from_folder(tiny_model[0])
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731

    def stage(paths, batch_size):
        table = extract_embeddings(
            {str(p): p for p in paths},
            model.embed_batch,
            None,
            "m",
            batch_size=batch_size,
            chunk_seconds=chunk_seconds,
            sample_rate=model.sample_rate,
        )
        return unit(table.vectors.numpy()[table.indices([str(p) for p in paths])].astype(np.float64))

    stage_all = stage(files, 4)
    stage_alone = np.concatenate([stage([p], 4) for p in files])
    np.testing.assert_allclose(stage_all, stage_alone, atol=1e-6)

    model_all = model.embed(files, batch_size=4, chunk_seconds=chunk_seconds)
    model_alone = np.concatenate([model.embed(p, chunk_seconds=chunk_seconds) for p in files])
    np.testing.assert_allclose(model_all, model_alone, atol=1e-6)
    np.testing.assert_allclose(model_all, stage_all, atol=1e-6)

    runtime = OnnxSpeakerModel(export_onnx(model, tmp_path / "m.onnx"), threads=1)
    wavs = [soundfile.read(p, dtype="float32")[0] for p in files]
    onnx_all = runtime.embed(wavs, batch_size=4, chunk_seconds=chunk_seconds)
    onnx_alone = np.concatenate([runtime.embed([wav], chunk_seconds=chunk_seconds) for wav in wavs])
    np.testing.assert_allclose(onnx_all, onnx_alone, atol=1e-6)
    np.testing.assert_allclose(onnx_all, model_all, atol=1e-4)  # another runtime: rounding differs
