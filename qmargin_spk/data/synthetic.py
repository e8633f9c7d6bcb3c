"""A small VoxCeleb-layout corpus of synthetic speech, for demos and tests.

Real VoxCeleb is hundreds of gigabytes; the recipe still has to run end to end on a
laptop. This module writes ``<root>/train/wav/<spk>/<video>/<nnnnn>.wav`` and
``<root>/test/wav/...`` (16 kHz mono int16) plus ``<root>/trials.txt``, all fixed by
one seed, and is the command line that does it
(``python -m qmargin_spk.data.synthetic --out DIR``). The voices, channels and utterances
come from ``synthetic_speech.py``; each speaker's "videos" are recording channels of their own.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile

from qmargin_spk.data.synthetic_speech import SAMPLE_RATE, random_channel, random_voice, synthesize_utterance
from qmargin_spk.utils.atomic import atomic_open, atomic_write_text

PRESETS: dict[str, dict] = {
    "tiny": dict(
        num_train_speakers=8,
        utts_per_train_speaker=6,
        num_test_speakers=4,
        utts_per_test_speaker=6,
        num_trials=40,
        duration_range=(1.2, 1.8),
    ),
    # Many identities for the sharded head (x3 classes with speed perturbation): docs/data_shards.md.
    "many": dict(
        num_train_speakers=2000,
        utts_per_train_speaker=3,
        num_test_speakers=20,
        utts_per_test_speaker=6,
        num_trials=None,
        duration_range=(1.0, 1.5),
    ),
    # 40 test speakers x 12 utterances, every pair: ~1,900 target and 112,320 non-target trials, enough
    # false accepts to report TAR down to FAR = 1e-4 and speakers enough for the bootstrap intervals.
    "demo": dict(
        num_train_speakers=60,
        utts_per_train_speaker=30,
        num_test_speakers=40,
        utts_per_test_speaker=12,
        num_trials=None,
        duration_range=(2.0, 4.0),
    ),
    # The seeded demo (demo.py --seeds, make study-demo; docs/studies.md): 200 test speakers x 3 utterances,
    # every pair: ~550 target and ~179,000 non-target trials, so TAR down to FAR = 1e-4 is defined and the
    # speaker bootstrap has many speakers; the training part is the demo's speakers with fewer utterances.
    "study": dict(
        num_train_speakers=60,
        utts_per_train_speaker=20,
        num_test_speakers=200,
        utts_per_test_speaker=3,
        num_trials=None,
        duration_range=(2.0, 3.0),
    ),
}


@dataclass(frozen=True)
class CorpusPaths:
    """Where a generated corpus lives: the two VoxCeleb-style roots and the trial list."""

    train_root: Path
    test_root: Path
    trials: Path


def _video_id(rng: np.random.Generator) -> str:
    """An 11-character YouTube-like id."""
    alphabet = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"))
    return "".join(rng.choice(alphabet, 11))


@dataclass(frozen=True)
class _SpeakerJob:
    """Everything needed to write one speaker's utterances in a worker process."""

    seed: int
    split: str
    index: int
    speaker: str
    num_utts: int
    duration_range: tuple[float, float]
    wav_root: str


def _write_speaker(job: _SpeakerJob) -> list[tuple[str, str]]:
    """Write all utterances of one speaker; return their ``(video, relative path)`` pairs."""
    speaker_rng = np.random.default_rng([job.seed, 0 if job.split == "train" else 1, job.index])
    voice = random_voice(speaker_rng)
    num_videos = int(min(job.num_utts, speaker_rng.integers(2, 6)))
    videos = [(_video_id(speaker_rng), random_channel(speaker_rng)) for _ in range(num_videos)]
    written = []
    for utt in range(job.num_utts):
        video, channel = videos[utt % num_videos]
        utt_rng = np.random.default_rng([job.seed, 2 if job.split == "train" else 3, job.index, utt])
        samples = synthesize_utterance(utt_rng, voice, channel, utt_rng.uniform(*job.duration_range))
        relative = f"{job.speaker}/{video}/{utt // num_videos + 1:05d}.wav"
        path = Path(job.wav_root) / relative
        with atomic_open(path, "wb") as handle:
            soundfile.write(handle, samples.astype(np.float32), SAMPLE_RATE, subtype="PCM_16", format="WAV")
        written.append((video, relative))
    return written


def make_trials(
    utterances: dict[str, list[tuple[str, str]]], num_trials: int | None, rng: np.random.Generator
) -> list[str]:
    """Trial lines ``"label enrol test"``: balanced, or every pair when ``num_trials`` is None.

    Targets pair utterances of one speaker from different videos (as VoxCeleb1 does);
    non-targets pair different speakers. Pairs are unique and the order is shuffled.
    """
    targets = [
        (a, b)
        for items in utterances.values()
        for i, (video_a, a) in enumerate(items)
        for video_b, b in items[i + 1 :]
        if video_a != video_b
    ]
    if num_trials is None:
        speakers = sorted(utterances)
        lines = [f"1 {a} {b}" for a, b in targets] + [
            f"0 {a} {b}"
            for i, first in enumerate(speakers)
            for second in speakers[i + 1 :]
            for _, a in utterances[first]
            for _, b in utterances[second]
        ]
        return [lines[i] for i in rng.permutation(len(lines))]
    num_targets = num_trials // 2
    if num_targets > len(targets):
        raise ValueError(
            f"{num_trials} trials need {num_targets} target pairs, only {len(targets)} cross-video pairs exist"
        )
    chosen = [targets[i] for i in rng.choice(len(targets), num_targets, replace=False)]
    lines = [f"1 {a} {b}" for a, b in chosen]

    speakers = sorted(utterances)
    counts = np.array([len(utterances[s]) for s in speakers])
    available = (counts.sum() ** 2 - (counts**2).sum()) // 2
    if num_trials - num_targets > available:
        raise ValueError(
            f"{num_trials - num_targets} non-target trials requested, only {available} cross-speaker pairs exist"
        )
    pairs: set[tuple[str, str]] = set()
    while len(pairs) < num_trials - num_targets:
        first, second = rng.choice(len(speakers), 2, replace=False)
        a = utterances[speakers[first]][rng.integers(len(utterances[speakers[first]]))][1]
        b = utterances[speakers[second]][rng.integers(len(utterances[speakers[second]]))][1]
        if (b, a) not in pairs:
            pairs.add((a, b))
    lines += [f"0 {a} {b}" for a, b in sorted(pairs)]
    return [lines[i] for i in rng.permutation(len(lines))]


def generate_corpus(
    root: str | os.PathLike,
    num_train_speakers: int = 60,
    utts_per_train_speaker: int = 30,
    num_test_speakers: int = 40,
    utts_per_test_speaker: int = 12,
    num_trials: int | None = None,
    duration_range: tuple[float, float] = (2.0, 4.0),
    seed: int = 0,
    num_workers: int | None = None,
) -> CorpusPaths:
    """Write a synthetic corpus under ``root`` (defaults = the ``demo`` preset).

    The output depends only on the arguments other than ``num_workers``. A root that
    already holds the same corpus (``synthetic.json`` matches) is left as it is; a root
    holding anything else under ``train/`` or ``test/`` is refused rather than mixed.
    Speaker ids are ``id1nnnn``: train speakers first, test speakers after them.
    """
    root = Path(root)
    paths = CorpusPaths(root / "train", root / "test", root / "trials.txt")
    settings = dict(
        num_train_speakers=num_train_speakers,
        utts_per_train_speaker=utts_per_train_speaker,
        num_test_speakers=num_test_speakers,
        utts_per_test_speaker=utts_per_test_speaker,
        num_trials=num_trials,
        duration_range=list(duration_range),
        seed=seed,
    )
    marker = root / "synthetic.json"
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        return paths
    if any(p.exists() and any(p.iterdir()) for p in (paths.train_root, paths.test_root)):
        raise FileExistsError(f"{root} already holds a different corpus; choose an empty folder")

    jobs = [
        _SpeakerJob(
            seed,
            "train",
            i,
            f"id1{i + 1:04d}",
            utts_per_train_speaker,
            tuple(duration_range),
            str(paths.train_root / "wav"),
        )
        for i in range(num_train_speakers)
    ] + [
        _SpeakerJob(
            seed,
            "test",
            i,
            f"id1{num_train_speakers + i + 1:04d}",
            utts_per_test_speaker,
            tuple(duration_range),
            str(paths.test_root / "wav"),
        )
        for i in range(num_test_speakers)
    ]
    workers = num_workers or min(len(jobs), os.cpu_count() or 1)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            written = list(pool.map(_write_speaker, jobs))
    else:
        written = [_write_speaker(job) for job in jobs]

    test_utterances = {job.speaker: items for job, items in zip(jobs, written) if job.split == "test"}
    trials = make_trials(test_utterances, num_trials, np.random.default_rng([seed, 4]))
    atomic_write_text(paths.trials, "".join(line + "\n" for line in trials))
    atomic_write_text(marker, json.dumps(settings, indent=1) + "\n")
    return paths


def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m qmargin_spk.data.synthetic --out DIR [--preset demo|tiny] [--seed N]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="corpus root to create")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_workers", type=int, default=None, help="processes (default: all cores)")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    paths = generate_corpus(args.out, seed=args.seed, num_workers=args.num_workers, **PRESETS[args.preset])
    print(
        json.dumps({k: str(v) for k, v in asdict(paths).items()} | {"seconds": round(time.perf_counter() - began, 1)})
    )


if __name__ == "__main__":
    main()
