"""Random training crops per second: one file per utterance (CropDataset) vs tar shards (ShardCropDataset); prints JSON.

    python bench/data_loading.py [--dir DIR] [--files 20000] [--seconds 3] [--crop 2] [--batch 64] [--workers 2]

Generates (or reuses, in ``--dir``) a corpus of short 16 kHz noise wavs from 1,000 speakers,
writes it as shards, and times whole epochs through a DataLoader with the same batch size and
workers for both readers. Each reader is timed twice: **cold**, after evicting the corpus files
(or the shards) from the page cache with ``posix_fadvise(DONTNEED)`` (the per-file way that
needs no root; the host may still cache the virtual disk), then **warm**, right after. The
machine is shared, so the load average is reported with the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import soundfile
import torch

from qmargin_spk.data.dataset import CropDataset, SpeakerLabelEncoder, collate_crops
from qmargin_spk.data.manifest import ManifestRow, read_manifest, write_manifest
from qmargin_spk.data.shards import INDEX_NAME, ShardCropDataset, write_shards
from qmargin_spk.utils.atomic import atomic_write_text

RATE = 16000
SPEAKERS = 1000


def _write_files(job: tuple[str, list[int], int, float]) -> None:
    root, numbers, seed, seconds = job
    rng = np.random.default_rng([seed, numbers[0]])
    for n in numbers:
        path = Path(root) / "wav" / f"spk{n % SPEAKERS:04d}" / f"{n:06d}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(
            path, (0.1 * rng.standard_normal(int(seconds * RATE))).astype(np.float32), RATE, subtype="PCM_16"
        )


def make_corpus(root: Path, files: int, seconds: float, workers: int) -> list[ManifestRow]:
    """``files`` noise wavs of ``seconds`` under ``root/wav/spkNNNN/``; reused when ``root/corpus.json`` matches."""
    settings = {"files": files, "seconds": seconds, "speakers": SPEAKERS}
    marker, manifest = root / "corpus.json", root / "train.csv"
    if marker.is_file() and json.loads(marker.read_text()) == settings and manifest.is_file():
        return read_manifest(manifest)
    chunks = [list(range(start, min(files, start + 500))) for start in range(0, files, 500)]
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_write_files, [(str(root), chunk, 0, seconds) for chunk in chunks]))
    rows = [
        ManifestRow(
            f"spk{n % SPEAKERS:04d}/v/{n:06d}",
            str(root / "wav" / f"spk{n % SPEAKERS:04d}" / f"{n:06d}.wav"),
            int(seconds * RATE) / RATE,
            f"spk{n % SPEAKERS:04d}",
        )
        for n in range(files)
    ]
    write_manifest(manifest, rows)
    atomic_write_text(marker, json.dumps(settings) + "\n")
    return rows


def evict(paths) -> None:
    """Drop these files from the page cache (written back first), without root."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def time_epoch(dataset, batch: int, workers: int, shuffle: bool) -> dict:
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch, num_workers=workers, shuffle=shuffle, collate_fn=collate_crops, drop_last=True
    )
    start, crops = time.perf_counter(), 0
    for _, wavs, _, _ in loader:
        crops += wavs.shape[0]
    seconds = time.perf_counter() - start
    return {"crops": crops, "seconds": round(seconds, 2), "crops_per_second": round(crops / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", help="where the corpus and shards live (kept); default: a temporary folder, removed")
    parser.add_argument("--files", type=int, default=20000)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--crop", type=float, default=2.0)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--utts_per_shard", type=int, default=1000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench_data_loading_"))
    load_before = os.getloadavg()
    try:
        reused = {"corpus": (root / "corpus.json").is_file(), "shards": (root / "shards" / INDEX_NAME).is_file()}
        start = time.perf_counter()
        rows = make_corpus(root, args.files, args.seconds, args.workers)
        corpus_seconds = time.perf_counter() - start
        start = time.perf_counter()
        index = write_shards(rows, root / "shards", utts_per_shard=args.utts_per_shard, num_workers=args.workers)
        shard_seconds = time.perf_counter() - start
        labels = SpeakerLabelEncoder.from_rows(rows)
        files = CropDataset(rows, labels, crop_seconds=args.crop)
        shards = ShardCropDataset(root / "shards" / INDEX_NAME, labels, crop_seconds=args.crop, batch_size=args.batch)
        shard_paths = [root / "shards" / s.name for s in index.shards]
        results = {}
        for name, dataset, paths, shuffle in (
            ("files", files, [r.wav for r in rows], True),
            ("shards", shards, shard_paths, False),
        ):
            evict(paths)
            results[name] = {"cold": time_epoch(dataset, args.batch, args.workers, shuffle)}
            dataset.set_epoch(1)
            results[name]["warm"] = time_epoch(dataset, args.batch, args.workers, shuffle)
        print(
            json.dumps(
                {
                    "what": f"random {args.crop} s crops per second, one epoch, DataLoader batch {args.batch}, "
                    f"{args.workers} workers, collate_crops",
                    "corpus": {
                        "files": args.files,
                        "seconds_each": args.seconds,
                        "speakers": SPEAKERS,
                        "format": "16 kHz PCM16 wav",
                        "bytes": sum(os.path.getsize(r.wav) for r in rows),
                        "generate_seconds": round(corpus_seconds, 1),
                        "reused_from_dir": reused["corpus"],
                    },
                    "shards": {
                        "count": len(index.shards),
                        "utts_per_shard": args.utts_per_shard,
                        "bytes": sum(p.stat().st_size for p in shard_paths),
                        "write_seconds": round(shard_seconds, 1),
                        "index_existed": reused["shards"],
                    },
                    "page_cache": "cold = files evicted with posix_fadvise(DONTNEED) just before (no root needed; the "
                    "virtual disk may still be cached by the host); warm = the epoch right after",
                    "rates": results,
                    "ratio_shards_to_files": {
                        k: round(results["shards"][k]["crops_per_second"] / results["files"][k]["crops_per_second"], 2)
                        for k in ("cold", "warm")
                    },
                    "load_average_before": load_before,
                    "load_average_after": os.getloadavg(),
                    "cpus": os.cpu_count(),
                    "note": "machine shared with other engineers (see load average)",
                    "torch": torch.__version__,
                    "machine": platform.machine(),
                },
                indent=2,
            )
        )
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
