"""Training data: random fixed-length crops of manifest utterances, with speed perturbation.

The manifest is read once, when the dataset is built; an item reads only its crop
from disk (a partial read). Randomness comes from ``(seed, epoch, index)``, so a
batch is the same whatever the number of DataLoader workers; call
:meth:`CropDataset.set_epoch` before each epoch (with non-persistent workers, which
receive a fresh copy of the dataset at every epoch).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torchaudio.functional

from qmargin_spk.data.audio import AudioError, load_audio, pad_waveforms, repeat_pad
from qmargin_spk.data.manifest import ManifestRow, read_manifest
from qmargin_spk.utils.atomic import atomic_write_text

LABEL_FORMAT = "qmargin_spk.speaker_labels/1"


class SpeakerLabelEncoder:
    """Speaker id <-> class index (sorted ids), stored as JSON so training, resume and scoring agree."""

    def __init__(self, speakers: Sequence[str]):
        if len(set(speakers)) != len(speakers):
            raise ValueError("speaker ids must be unique")
        self.speakers = list(speakers)
        self._index = {spk: i for i, spk in enumerate(self.speakers)}

    @classmethod
    def from_rows(cls, rows: Sequence[ManifestRow]) -> SpeakerLabelEncoder:
        return cls(sorted({row.spk_id for row in rows}))

    def __len__(self) -> int:
        return len(self.speakers)

    def encode(self, speaker: str) -> int:
        return self._index[speaker]

    def decode(self, index: int) -> str:
        return self.speakers[index]

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, json.dumps({"format": LABEL_FORMAT, "speakers": self.speakers}, indent=0) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> SpeakerLabelEncoder:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if data.get("format") != LABEL_FORMAT:
            raise ValueError(f"{path}: not a speaker label file (format {data.get('format')!r})")
        return cls(data["speakers"])

    @classmethod
    def load_or_create(cls, path: str | os.PathLike, rows: Sequence[ManifestRow]) -> SpeakerLabelEncoder:
        """Load ``path`` if it exists (checking it knows every speaker of ``rows``), else build and save it."""
        if not Path(path).is_file():
            encoder = cls.from_rows(rows)
            encoder.save(path)
            return encoder
        encoder = cls.load(path)
        unknown = sorted({row.spk_id for row in rows} - set(encoder.speakers))
        if unknown:
            raise ValueError(f"{path}: {len(unknown)} manifest speakers are not in the label file, e.g. {unknown[:3]}")
        return encoder


class CropMaker:
    """The random crop and label of one utterance, shared by :class:`CropDataset` and the shard reader.

    ``crop_length = crop_seconds * sample_rate`` samples. With ``speed_factors`` such as
    ``(0.9, 1.0, 1.1)`` the crop is played at a random factor (> 1 is faster and higher-pitched);
    with ``speed_as_new_class`` the k-th factor other than 1.0 makes its own classes:
    ``label = speaker + k * num_speakers``.
    """

    def __init__(
        self,
        labels: SpeakerLabelEncoder,
        crop_seconds: float = 2.0,
        sample_rate: int = 16000,
        speed_factors: Sequence[float] = (1.0,),
        speed_as_new_class: bool = True,
    ):
        if not speed_factors or any(f <= 0 for f in speed_factors):
            raise ValueError(f"speed factors must be positive, got {speed_factors}")
        self.labels = labels
        self.crop_length = int(round(crop_seconds * sample_rate))
        self.sample_rate = sample_rate
        self.speed_factors = tuple(float(f) for f in speed_factors)
        perturbed = [f for f in self.speed_factors if f != 1.0]
        self.speed_class = {1.0: 0} | {f: k + 1 if speed_as_new_class else 0 for k, f in enumerate(perturbed)}
        self.num_classes = len(labels) * (1 + (len(perturbed) if speed_as_new_class else 0))

    def make(
        self,
        read_segment: Callable[[int, int | None], torch.Tensor],
        duration: float,
        speaker: int,
        rng: np.random.Generator,
    ) -> tuple[torch.Tensor, int]:
        """``(crop [crop_length], label)``; ``read_segment(start, num_samples)`` reads the utterance.

        Draws the speed factor, then the start; ``num_samples`` is None when the whole
        utterance is shorter than needed (it is then tiled).
        """
        factor = self.speed_factors[rng.integers(len(self.speed_factors))]
        needed = math.ceil(self.crop_length * factor)
        available = int(round(duration * self.sample_rate))
        start = int(rng.integers(0, available - needed + 1)) if available > needed else 0
        wav = read_segment(start, needed if available > needed else None)
        if factor != 1.0:
            wav = torchaudio.functional.resample(wav, int(round(self.sample_rate * factor)), self.sample_rate)
        return repeat_pad(wav, self.crop_length), speaker + self.speed_class[factor] * len(self.labels)


class CropDataset(torch.utils.data.Dataset):
    """Items ``(utterance id, crop [T], label)`` with ``T = crop_seconds * sample_rate``.

    Crops and labels follow :class:`CropMaker` (speed perturbation, speed as new classes).
    An unreadable file is skipped with a warning and another utterance drawn.
    """

    def __init__(
        self,
        manifest: str | os.PathLike | Sequence[ManifestRow],
        labels: SpeakerLabelEncoder,
        crop_seconds: float = 2.0,
        sample_rate: int = 16000,
        speed_factors: Sequence[float] = (1.0,),
        speed_as_new_class: bool = True,
        seed: int = 0,
        max_retries: int = 10,
    ):
        self.rows = list(manifest) if isinstance(manifest, (list, tuple)) else read_manifest(manifest)
        if not self.rows:
            raise ValueError("empty manifest")
        self.crops = CropMaker(labels, crop_seconds, sample_rate, speed_factors, speed_as_new_class)
        self.labels = labels
        self.speaker_index = [labels.encode(row.spk_id) for row in self.rows]
        self.num_classes = self.crops.num_classes
        self.seed = seed
        self.epoch = 0
        self.max_retries = max_retries

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[str, torch.Tensor, int]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        sample_rate = self.crops.sample_rate
        for _ in range(self.max_retries + 1):
            row = self.rows[index]

            def read_segment(start: int, num_samples: int | None, wav: str = row.wav) -> torch.Tensor:
                return load_audio(wav, sample_rate, start=start, num_samples=num_samples)

            try:
                wav, label = self.crops.make(read_segment, row.duration, self.speaker_index[index], rng)
            except AudioError as err:
                warnings.warn(f"skipping unreadable training file: {err}", RuntimeWarning)
                index = int(rng.integers(len(self.rows)))
                continue
            return row.id, wav, label
        raise RuntimeError(f"{self.max_retries + 1} unreadable files in a row; is the data still there?")


def collate_crops(
    batch: Sequence[tuple[str, torch.Tensor, int]],
) -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack items into ``(ids, wavs [B, T], rel_lens [B], labels [B])``, zero-padding to the longest."""
    ids, wavs, labels = zip(*batch)
    padded, rel_lens = pad_waveforms(wavs)
    return list(ids), padded, rel_lens, torch.tensor(labels, dtype=torch.long)
