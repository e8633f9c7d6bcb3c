"""m4a audio (VoxCeleb2's) -> 16-bit WAV beside it, with ffmpeg (the prepare stage's first step).

In the VoxCeleb layout ``ROOT/aac/<spk>/<video>/<utt>.m4a`` becomes ``ROOT/wav/<spk>/<video>/<utt>.wav``;
in any other audio tree ``ROOT/<spk>/.../<utt>.m4a`` becomes ``<utt>.wav`` in the same folder.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

logger = logging.getLogger(__name__)


class FfmpegMissingError(RuntimeError):
    """m4a files need decoding and ffmpeg is not on PATH; the message says how many and which first."""


def decode_m4a(source: Path, target: Path, sample_rate: int) -> str | None:
    """Decode one file with ffmpeg through a temporary name; return an error message or None."""
    partial = target.with_name(f".{target.name}.partial")
    target.parent.mkdir(parents=True, exist_ok=True)
    command = ["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-i", str(source), "-ac", "1", "-ar", str(sample_rate)]
    command += ["-acodec", "pcm_s16le", "-f", "wav", str(partial)]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        lines = completed.stderr.strip().splitlines()
        return lines[-1] if lines else f"ffmpeg exited with status {completed.returncode}"
    os.replace(partial, target)
    return None


def m4a_targets(root: Path) -> list[tuple[Path, Path]]:
    """``(m4a file, the WAV it decodes to)`` for every m4a file of the tree ``root``, sorted."""
    if (root / "aac").is_dir():
        return [
            (source, root / "wav" / source.relative_to(root / "aac").with_suffix(".wav"))
            for source in sorted((root / "aac").glob("*/*/*.m4a"))
        ]
    if (root / "wav").is_dir():
        return []
    return [(source, source.with_suffix(".wav")) for source in sorted(root.glob("*/**/*.m4a"))]


def convert_m4a(roots: Iterable[Path], sample_rate: int, num_workers: int) -> list[tuple[Path, str]]:
    """Decode every m4a file of the trees ``roots`` that has no WAV counterpart yet; return the failures.

    Outputs appear only complete (temporary name, then rename), so an interrupted
    run resumes where it stopped. ffmpeg runs as child processes, so threads suffice
    to keep ``num_workers`` of them busy.
    """
    pending = [(source, target) for root in roots for source, target in m4a_targets(root) if not target.exists()]
    if not pending:
        return []
    if shutil.which("ffmpeg") is None:
        raise FfmpegMissingError(
            f"ffmpeg not found on PATH: it is needed to decode {len(pending)} m4a files "
            f"(first: {pending[0][0]}); install it (e.g. apt-get install ffmpeg) and re-run"
        )
    logger.info("decoding %d m4a files with ffmpeg (%d workers)", len(pending), num_workers)
    with ThreadPoolExecutor(num_workers) as pool:
        errors = list(pool.map(lambda job: decode_m4a(*job, sample_rate), pending))
    failures = [(source, error) for (source, _), error in zip(pending, errors) if error is not None]
    if failures:
        logger.warning("%d of %d m4a files failed to decode, e.g. %s: %s", len(failures), len(pending), *failures[0])
    return failures
