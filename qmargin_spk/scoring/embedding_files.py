"""Embedding files for other tools: Kaldi ark/scp, numpy ``.npz`` or a folder of ``.npy`` files, by the output's name.

One writer (:func:`write_embeddings`) serves ``qmargin-spk embed --out`` and stage 3's
``--embedding_format``; :func:`read_embeddings` reads any of the three back. The form
follows the output path (:func:`embedding_format`):

``X.ark``
    A Kaldi binary archive of float32 vectors keyed by utterance id, written with kaldiio,
    and ``X.scp`` beside it (``<id> <absolute path of X.ark>:<offset>``), which Kaldi, ESPnet,
    WeSpeaker and ``kaldiio.load_scp`` read. Kaldi keys hold no whitespace: such an id is refused.
``X.npz``
    ``ids`` [N] (str) and ``embeddings`` [N, D] (float32), as ``numpy.load`` reads them.
``X/`` (a name ending in ``/``, an existing folder, or a name without extension)
    One ``<id>.npy`` (float32 [D]) per utterance, the id percent-encoded (``/`` as ``%2F``) so any id
    is one flat, reversible file name. An existing folder is replaced only when it holds nothing but
    ``.npy`` files (an earlier output); anything else there is refused, never deleted.

Any other extension (``.npy``, ``.scp``, ``.pt`` ...) is an :class:`EmbeddingFileError`, never an
npz under another name. Every form is written atomically: the ark and the scp go to temporary
names and are renamed once both are complete (the scp already names the final ark); the folder is
assembled beside its target and swapped into place.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.parse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from qmargin_spk.utils.atomic import _umask, atomic_open, swap_folder_into_place, write_error

FORMATS = ("ark", "npz", "npy")
_EXTENSIONS = {".ark": "ark", ".npz": "npz", "": "npy"}


class EmbeddingFileError(ValueError):
    """An embedding output that cannot be written as asked; the message names the path."""


def embedding_format(path: str | os.PathLike) -> str:
    """``'ark'``, ``'npz'`` or ``'npy'`` (a folder) for an output path; :class:`EmbeddingFileError` for any other name.

    A folder is a path written with a trailing ``/``, an existing folder or a name without extension.
    """
    text = os.fspath(path)
    if text.endswith(("/", os.sep)) or Path(text).is_dir():
        return "npy"
    suffix = Path(text).suffix.lower()
    if suffix not in _EXTENSIONS:
        raise EmbeddingFileError(
            f"{text}: unknown embedding output {suffix!r}: name an .ark (Kaldi ark + scp), an .npz, "
            "or a folder (one .npy per utterance: a trailing '/' or no extension)"
        )
    return _EXTENSIONS[suffix]


def check_output(path: str | os.PathLike, ids: Sequence[str], form: str | None = None) -> str:
    """The form ``path`` (or ``form``) names, once the ids fit it (unique; Kaldi keys: no whitespace); else an
    :class:`EmbeddingFileError`. Callers check before embedding, so a refused output costs no work.

    ``form`` names the form when the path does not (stage 3 passes it): the path must then agree or have no extension.
    """
    detected = embedding_format(path)
    form = form or detected
    if form not in FORMATS or (detected != form and Path(path).suffix):
        raise EmbeddingFileError(f"{path}: not a name for {form!r} embeddings (expected one of {FORMATS})")
    if len(set(ids)) != len(ids):
        raise EmbeddingFileError(f"{path}: utterance ids must be unique")
    spaced = next((utt for utt in ids if not utt or any(char.isspace() for char in utt)), None)
    if form == "ark" and spaced is not None:
        raise EmbeddingFileError(
            f"{path}: utterance id {spaced!r} is empty or holds whitespace, which a Kaldi key cannot "
            "(give ids with --list, or write an .npz)"
        )
    folder = Path(path)
    if form == "npy" and folder.exists() and (not folder.is_dir() or any(f.suffix != ".npy" for f in folder.iterdir())):
        raise EmbeddingFileError(
            f"{folder}: exists and holds files other than .npy embeddings: not replacing it (name a new folder)"
        )
    return form


def write_embeddings(
    path: str | os.PathLike, ids: Sequence[str], vectors: np.ndarray, form: str | None = None
) -> list[Path]:
    """Write ``vectors`` [N, D] of utterances ``ids`` in the form of ``path`` (or ``form``, :func:`check_output`);
    returns the files written (the ark and its scp, the npz, or every ``.npy``).

    Vectors are stored as float32, in the order given.
    """
    ids = [str(utt) for utt in ids]
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != len(ids):
        raise ValueError(f"{path}: expected {len(ids)} embeddings [N, D], got shape {vectors.shape}")
    form = check_output(path, ids, form)
    if form == "ark":
        return _write_ark(Path(path), ids, vectors)
    if form == "npz":
        with atomic_open(path, "wb") as handle:
            np.savez(handle, ids=np.array(ids, dtype=str), embeddings=vectors)
        return [Path(path)]
    return _write_npy_folder(Path(path), ids, vectors)


def read_embeddings(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """``(ids, vectors [N, D] float32)`` of an output of :func:`write_embeddings` (an ``.ark`` is read through its scp).

    The ark's and the npz's order is the written one; a folder's is by file name.
    """
    form = embedding_format(path)
    path = Path(path)
    if form == "ark":
        import kaldiio

        table = kaldiio.load_scp(str(path.with_suffix(".scp")))
        ids = list(table)
        return ids, np.stack([table[utt] for utt in ids]).astype(np.float32, copy=False)
    if form == "npz":
        with np.load(path) as stored:
            return stored["ids"].tolist(), stored["embeddings"]
    files = sorted(path.glob("*.npy"))
    return [urllib.parse.unquote(file.stem) for file in files], np.stack([np.load(file) for file in files])


def _write_ark(ark: Path, ids: list[str], vectors: np.ndarray) -> list[Path]:
    """The ark and its scp (naming the final ark) both written to temporary names, then renamed: the ark, the scp."""
    import kaldiio

    scp = ark.with_suffix(".scp")
    final = os.path.abspath(ark)
    with atomic_open(scp, "w") as scp_handle, atomic_open(ark, "wb") as ark_handle:
        for utt, vector in zip(ids, vectors):
            # A Kaldi offset points just past "<key> ", where the binary vector starts.
            offset = ark_handle.tell() + len(f"{utt} ".encode())
            kaldiio.save_ark(ark_handle, {utt: vector})
            scp_handle.write(f"{utt} {final}:{offset}\n")
    return [ark, scp]


def _write_npy_folder(folder: Path, ids: list[str], vectors: np.ndarray) -> list[Path]:
    """One ``<quoted id>.npy`` per utterance, assembled in a sibling folder and swapped into place."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    names = [f"{urllib.parse.quote(utt, safe='')}.npy" for utt in ids]
    try:
        for name, vector in zip(names, vectors):
            np.save(staging / name, vector)
        os.chmod(staging, 0o777 & ~_umask())
        swap_folder_into_place(staging, folder)
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        failed = write_error(err, folder, staging)
        if failed is not None:
            raise failed from err
        raise
    return [folder / name for name in names]
