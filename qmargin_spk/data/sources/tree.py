"""Audio trees: the VoxCeleb layout ``ROOT/wav/<spk>/<video>/<utt>.<ext>`` or any ``ROOT/<spk>/.../<utt>.<ext>``.

Files are read by soundfile (``wav``, ``flac``, ``ogg``); m4a files (VoxCeleb2's ``ROOT/aac/**.m4a``,
or ``.m4a`` anywhere in another tree) are decoded to WAV by prepare first (:mod:`qmargin_spk.data.m4a`).
The speaker is the first folder, the utterance id the path below the base (``ROOT/wav`` or
``ROOT``) without its extension, and trial items are paths relative to the base:
``spk/video/utt.wav`` names the id ``spk/video/utt`` whatever the file's extension (CN-Celeb's
lists name ``.wav`` for FLAC files).
"""

from __future__ import annotations

import os
from pathlib import Path

from qmargin_spk.data.manifest import utterance_id
from qmargin_spk.data.sources.utterances import TREE, InputError, InputSource, SourceUtterance

TREE_EXTENSIONS = ("wav", "flac", "ogg")


def is_voxceleb_layout(root: Path) -> bool:
    """A root with a ``wav/`` or ``aac/`` folder."""
    return (root / "wav").is_dir() or (root / "aac").is_dir()


def tree_base(root: Path) -> Path:
    """The folder trial paths are relative to: ``ROOT/wav`` in the VoxCeleb layout, else ``ROOT``."""
    return root / "wav" if is_voxceleb_layout(root) else root


def tree_files(root: Path) -> list[Path]:
    """Audio files of the tree, sorted: ``<spk>/<video>/<utt>.<ext>`` under ``wav/``, or ``<spk>/**/<utt>.<ext>``."""
    base = tree_base(root)
    if not base.is_dir():
        return []
    pattern = "*/*/*.{}" if is_voxceleb_layout(root) else "*/**/*.{}"
    return sorted({path for ext in TREE_EXTENSIONS for path in base.glob(pattern.format(ext))})


def first_audio_file(root: Path) -> Path | None:
    """The first audio file found below a speaker folder of ``root`` (the walk stops there), or None."""
    for folder, _, names in os.walk(root):
        if Path(folder) != root:
            for name in sorted(names):
                if name.rsplit(".", 1)[-1].lower() in (*TREE_EXTENSIONS, "m4a"):
                    return Path(folder) / name
    return None


def nested_voxceleb_root(root: Path, audio_file: Path) -> Path | None:
    """The VoxCeleb-layout root that ``audio_file`` lies in below ``root`` (a root given one level too high)."""
    parts = audio_file.relative_to(root).parts[:-1]
    for depth, part in enumerate(parts):
        if part in ("wav", "aac") and depth > 0:
            return root.joinpath(*parts[:depth])
    return None


def read_tree(root: Path) -> InputSource:
    """The utterances of an audio tree; InputError when two files give one id (``x.wav`` and ``x.flac``)."""
    base = tree_base(root)
    files = tree_files(root)
    utterances, seen = [], {}
    for path in files:
        relative = path.relative_to(base).as_posix()
        utt = utterance_id(relative)
        if utt in seen:
            raise InputError(f"{path}: the same utterance as {seen[utt]} (one file per utterance id)")
        seen[utt] = path
        utterances.append(SourceUtterance(utt, os.path.abspath(path), relative.split("/")[0], str(path)))
    return InputSource(TREE, root, utterances, files, utterance_id, trial_root=base)
