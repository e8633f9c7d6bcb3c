"""Training crops, labels, speed perturbation, collation, and batch augmentation."""

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from qmargin_spk.data.augment import WaveformAugmenter, add_noise_at_snr, noise_categories, reverberate
from qmargin_spk.data.dataset import CropDataset, SpeakerLabelEncoder, collate_crops
from qmargin_spk.data.manifest import ManifestRow

RATE = 16000


def _write(path: Path, samples: np.ndarray, rate: int = RATE) -> ManifestRow:
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), samples.astype(np.float32), rate, subtype="FLOAT")
    speaker, video, utt = path.with_suffix("").parts[-3:]
    return ManifestRow(f"{speaker}/{video}/{utt}", str(path), len(samples) / rate, speaker)


def _ramp(seconds: float) -> np.ndarray:
    """Distinct increasing samples, so a crop's position in the file can be read off its values."""
    return np.arange(int(seconds * RATE)) / (seconds * RATE)


def _sine(hz: float, seconds: float) -> np.ndarray:
    return 0.5 * np.sin(2 * np.pi * hz * np.arange(int(seconds * RATE)) / RATE)


def _peak_hz(wav: torch.Tensor) -> float:
    spectrum = torch.fft.rfft(wav * torch.hann_window(len(wav))).abs()
    return float(spectrum.argmax()) * RATE / len(wav)


@pytest.fixture
def rows(tmp_path):
    return [
        _write(tmp_path / "wav" / "spkB" / "vid" / "00001.wav", _ramp(3.0)),
        _write(tmp_path / "wav" / "spkA" / "vid" / "00001.wav", _ramp(0.3)),
        _write(tmp_path / "wav" / "spkC" / "vid" / "00001.wav", _sine(500.0, 3.0)),
    ]


def test_label_encoder_is_sorted_saved_as_json_and_checked(rows, tmp_path):
    path = tmp_path / "labels.json"
    encoder = SpeakerLabelEncoder.load_or_create(path, rows)
    assert encoder.speakers == ["spkA", "spkB", "spkC"] and encoder.encode("spkC") == 2 and encoder.decode(1) == "spkB"
    assert json.loads(path.read_text()) == {
        "format": "qmargin_spk.speaker_labels/1",
        "speakers": ["spkA", "spkB", "spkC"],
    }
    assert SpeakerLabelEncoder.load_or_create(path, rows[:1]).speakers == encoder.speakers
    with pytest.raises(ValueError, match="not in the label file"):
        SpeakerLabelEncoder.load_or_create(path, [*rows, ManifestRow("spkZ/v/1", "x.wav", 1.0, "spkZ")])


def test_crops_are_contiguous_partial_reads_and_short_files_repeat(rows):
    dataset = CropDataset(rows, SpeakerLabelEncoder.from_rows(rows), crop_seconds=1.0)
    original = _ramp(3.0).astype(np.float32)
    starts = set()
    for epoch in range(4):
        dataset.set_epoch(epoch)
        utt, wav, label = dataset[0]
        assert (utt, label, wav.shape) == ("spkB/vid/00001", 1, (RATE,))
        start = int(round(float(wav[0]) * len(original)))
        np.testing.assert_array_equal(wav.numpy(), original[start : start + RATE])
        starts.add(start)
    assert len(starts) == 4, "each epoch should draw a new crop"

    _, short, label = dataset[1]
    assert label == 0 and short.shape == (RATE,)
    pattern = _ramp(0.3).astype(np.float32)
    np.testing.assert_array_equal(short.numpy()[: 3 * len(pattern)], np.tile(pattern, 3))


def test_items_are_deterministic_given_seed_epoch_and_index(rows):
    encoder = SpeakerLabelEncoder.from_rows(rows)
    first = CropDataset(rows, encoder, crop_seconds=0.5, speed_factors=(0.9, 1.0, 1.1), seed=7)
    second = CropDataset(rows, encoder, crop_seconds=0.5, speed_factors=(0.9, 1.0, 1.1), seed=7)
    for index in range(len(rows)):
        assert torch.equal(first[index][1], second[index][1]) and first[index][2] == second[index][2]
    other_seed = CropDataset(rows, encoder, crop_seconds=0.5, seed=8)
    assert not torch.equal(first[0][1], other_seed[0][1])


def test_speed_perturbation_changes_pitch_and_makes_new_classes(rows):
    encoder = SpeakerLabelEncoder.from_rows(rows)
    dataset = CropDataset(rows, encoder, crop_seconds=1.0, speed_factors=(0.9, 1.0, 1.1))
    assert dataset.num_classes == 9
    expected_hz = {0: 500.0, 1: 450.0, 2: 550.0}
    seen = set()
    for epoch in range(20):
        dataset.set_epoch(epoch)
        _, wav, label = dataset[2]
        assert wav.shape == (RATE,) and label % 3 == encoder.encode("spkC")
        assert _peak_hz(wav) == pytest.approx(expected_hz[label // 3], abs=3.0)
        seen.add(label // 3)
    assert seen == {0, 1, 2}

    same_class = CropDataset(rows, encoder, crop_seconds=1.0, speed_factors=(0.9, 1.0, 1.1), speed_as_new_class=False)
    assert same_class.num_classes == 3
    labels = set()
    for epoch in range(6):
        same_class.set_epoch(epoch)
        labels.add(same_class[2][2])
    assert labels == {2}


def test_unreadable_files_are_skipped_with_a_warning(rows, tmp_path):
    broken = tmp_path / "wav" / "spkD" / "vid" / "00001.wav"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"not audio at all")
    with_broken = [ManifestRow("spkD/vid/00001", str(broken), 2.0, "spkD"), *rows]
    dataset = CropDataset(with_broken, SpeakerLabelEncoder.from_rows(with_broken), crop_seconds=0.5)
    with pytest.warns(RuntimeWarning, match="skipping unreadable"):
        utt, wav, _ = dataset[0]
    assert utt != "spkD/vid/00001" and wav.shape == (RATE // 2,)

    only_broken = CropDataset(with_broken[:1], SpeakerLabelEncoder.from_rows(with_broken[:1]), max_retries=2)
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="3 unreadable files"):
        only_broken[0]


def test_collate_pads_and_gives_relative_lengths(rows):
    dataset = CropDataset(rows, SpeakerLabelEncoder.from_rows(rows), crop_seconds=0.5)
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=collate_crops, num_workers=2)
    ids, wavs, rel_lens, labels = next(iter(loader))
    assert ids == [row.id for row in rows] and wavs.shape == (3, RATE // 2)
    assert torch.equal(rel_lens, torch.ones(3)) and torch.equal(labels, torch.tensor([1, 0, 2]))
    assert torch.equal(wavs[0], dataset[0][1]), "workers must not change the crops"

    ids, wavs, rel_lens, labels = collate_crops([("a", torch.ones(4), 3), ("b", torch.ones(2), 5)])
    assert (
        wavs.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]] and rel_lens.tolist() == [1.0, 0.5] and labels.dtype == torch.long
    )


# --- augmentation -------------------------------------------------------------------


def _measured_snr(clean: torch.Tensor, noisy: torch.Tensor) -> torch.Tensor:
    return 10 * torch.log10(clean.pow(2).mean(-1) / (noisy - clean).pow(2).mean(-1))


def test_add_noise_hits_the_requested_snr():
    clean, noise = torch.randn(RATE), 3.0 * torch.randn(RATE)
    for snr in (0.0, 7.5, 20.0):
        assert float(_measured_snr(clean, add_noise_at_snr(clean, noise, snr))) == pytest.approx(snr, abs=1e-3)
    assert torch.equal(add_noise_at_snr(torch.zeros(10), noise[:10], 5.0), torch.zeros(10))


def test_fallback_noise_is_coloured_and_within_5_to_20_db():
    clean = torch.from_numpy(np.stack([_sine(200.0 + 50 * i, 1.0) for i in range(16)])).float()
    noisy = WaveformAugmenter(noise_prob=1.0, seed=1)(clean)
    snr = _measured_snr(clean, noisy)
    assert noisy.shape == clean.shape and torch.isfinite(noisy).all()
    assert snr.min() >= 5.0 - 1e-3 and snr.max() <= 20.0 + 1e-3 and snr.max() - snr.min() > 3.0
    assert torch.equal(WaveformAugmenter(noise_prob=0.0)(clean), clean)


def test_without_a_seed_the_global_torch_generator_drives_augmentation():
    clean = torch.from_numpy(np.stack([_sine(300.0, 0.5)] * 4)).float()
    augment = WaveformAugmenter(noise_prob=0.5)
    torch.manual_seed(3)
    first = augment(clean)
    torch.manual_seed(3)
    assert torch.equal(augment(clean), first), "restoring torch's RNG state must replay the augmentation"
    assert not torch.equal(augment(clean), first)


@pytest.mark.parametrize("category, low, high", [("noise", 0.0, 15.0), ("music", 5.0, 15.0), ("speech", 13.0, 20.0)])
def test_noise_folders_use_the_category_snr_range(tmp_path, category, low, high):
    rng = np.random.default_rng(0)
    for i in range(3):
        _write(
            tmp_path / "musan" / category / f"src{i}" / "a" / "000.wav", 0.1 * rng.standard_normal(RATE // 2 + 1000 * i)
        )
    assert list(noise_categories(tmp_path / "musan")) == [category]
    clean = torch.from_numpy(np.stack([_sine(300.0, 1.0)] * 12)).float()
    snr = _measured_snr(clean, WaveformAugmenter(noise_dir=tmp_path / "musan", noise_prob=1.0)(clean))
    assert snr.min() >= low - 1e-3 and snr.max() <= high + 1e-3


def test_noise_folder_without_files_is_refused(tmp_path):
    (tmp_path / "music").mkdir()
    with pytest.raises(ValueError, match="no noise wavs"):
        WaveformAugmenter(noise_dir=tmp_path)


def test_reverberation_keeps_shape_and_level_and_a_delta_rir_is_identity(tmp_path):
    clean = torch.from_numpy(_sine(300.0, 1.0)).float()
    delta = torch.zeros(800)
    delta[40] = 0.3
    assert torch.allclose(reverberate(clean, delta), clean, atol=1e-5)

    rng = np.random.default_rng(0)
    decay = np.exp(-np.arange(4000) / 800.0) * rng.standard_normal(4000)
    _write(tmp_path / "rirs" / "room" / "rir1.wav", decay)
    batch = torch.stack([clean, 2 * clean])
    wet = WaveformAugmenter(rir_dir=tmp_path / "rirs", reverb_prob=1.0, noise_prob=0.0)(batch)
    assert wet.shape == batch.shape and torch.isfinite(wet).all()
    assert torch.allclose(wet.norm(dim=1), batch.norm(dim=1), rtol=1e-4)
    assert not torch.allclose(wet, batch, atol=1e-2)
