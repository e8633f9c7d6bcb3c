"""Which input form a ``--train_root``/``--test_root`` is, from its content; ``--input_format`` decides ties."""

from __future__ import annotations

from pathlib import Path

from qmargin_spk.data.sources.kaldi_dir import is_kaldi_dir, read_kaldi_dir
from qmargin_spk.data.sources.manifest_file import is_manifest_file, read_manifest_file
from qmargin_spk.data.sources.tree import first_audio_file, is_voxceleb_layout, nested_voxceleb_root, read_tree
from qmargin_spk.data.sources.utterances import INPUT_FORMATS, KALDI, MANIFEST, TREE, InputError, InputSource

_READERS = {KALDI: read_kaldi_dir, MANIFEST: read_manifest_file, TREE: read_tree}


def detect_format(root: Path) -> str:
    """:data:`KALDI`, :data:`MANIFEST` or :data:`TREE`; InputError when none fits or several do."""
    if not root.exists():
        raise InputError(f"{root}: no such file or folder")
    if root.is_file():
        if is_manifest_file(root):
            return MANIFEST
        raise InputError(f"{root}: not a manifest (a .csv with header id,path,spk[,start,end], or .jsonl)")
    forms = [KALDI] if is_kaldi_dir(root) else []
    audio_file = None if is_voxceleb_layout(root) else first_audio_file(root)
    nested = None if audio_file is None else nested_voxceleb_root(root, audio_file)
    if nested is not None and not forms:
        raise InputError(f"{root}: no wav/ or aac/ folder, but {nested} below it has one: give that root")
    if is_voxceleb_layout(root) or audio_file is not None:
        forms.append(TREE)
    if len(forms) > 1:
        raise InputError(f"{root}: both a Kaldi data dir and an audio tree; pass --input_format kaldi or tree")
    if not forms:
        raise InputError(
            f"{root}: no wav/ or aac/ folder, no audio files below <spk>/ folders and no wav.scp with "
            "utt2spk: not an audio tree, nor a Kaldi data dir (a manifest is a .csv or .jsonl file)"
        )
    return forms[0]


_FITS = {KALDI: is_kaldi_dir, MANIFEST: Path.is_file, TREE: Path.is_dir}


def read_input(root: Path, input_format: str | None = None) -> InputSource:
    """Read ``root``; InputError naming the file for bad content.

    ``input_format`` is the form of every root it fits (a Kaldi dir: ``wav.scp`` and a speaker
    map; a manifest: a file; a tree: a folder), so it settles a folder that is both a Kaldi dir
    and a tree while the other roots (a Kaldi training dir, a test tree) are still detected.
    """
    if input_format is not None and input_format not in INPUT_FORMATS:
        raise InputError(f"unknown input format {input_format!r}; expected one of {', '.join(INPUT_FORMATS)}")
    kind = input_format if input_format is not None and _FITS[input_format](root) else detect_format(root)
    if kind == MANIFEST and not root.is_file():
        raise InputError(f"{root}: a manifest is a file (.csv or .jsonl)")
    if kind != MANIFEST and not root.is_dir():
        raise InputError(f"{root}: an audio tree or Kaldi data dir is a folder")
    return _READERS[kind](root)
