"""The file lists that training augmentation reads, made from unpacked MUSAN and RIRS_NOISES folders.

MUSAN (OpenSLR 17) holds ``noise/``, ``music/`` and ``speech/``; its speech is mixed as babble. RIRS_NOISES
(OpenSLR 28) holds impulse responses and noises side by side, so taking every wav under it as an impulse
response would reverberate speech with recordings of fans and crowds:

- ``simulated_rirs/{smallroom,mediumroom,largeroom}/RoomNNN/*.wav``: impulse responses (mono);
- ``real_rirs_isotropic_noises/``: real impulse responses, the ones its ``rir_list`` names (2-8 channels
  for some), beside isotropic noise recordings of the same rooms, which ``rir_list`` does not name;
- ``pointsource_noises/``: noise recordings (taken from MUSAN's noise part), not impulse responses.

Written here, one absolute path per line, no other column (``LIST_FILES``): ``noise.list``, ``music.list``,
``babble.list``, ``rir.list``. The augmenter uses channel 0 of a multichannel file. RIRS_NOISES' noises
(isotropic and point-source) join ``noise.list`` only when no MUSAN is given: with MUSAN they would
repeat its noise files (point-source) or add room tone (isotropic) to MUSAN's noise mix.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from qmargin_spk.utils.atomic import atomic_write_text

logger = logging.getLogger(__name__)

# Augmenter category (MUSAN's folder names, "rir" for impulse responses) -> the list file written and read.
LIST_FILES = {"noise": "noise.list", "music": "music.list", "speech": "babble.list", "rir": "rir.list"}
MUSAN_FOLDERS = ("noise", "music", "speech")
RIRS_NOISES_MARKERS = ("simulated_rirs", "real_rirs_isotropic_noises", "pointsource_noises")


class AugmentListError(ValueError):
    """A MUSAN / RIRS_NOISES folder or a list file that cannot be used; the message names it."""


@dataclass
class RirsNoises:
    """What an RIRS_NOISES folder holds: impulse responses, noises, and ``rir_list`` entries not found."""

    simulated: list[Path] = field(default_factory=list)
    real: list[Path] = field(default_factory=list)
    isotropic_noises: list[Path] = field(default_factory=list)
    pointsource_noises: list[Path] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    @property
    def rirs(self) -> list[Path]:
        return [*self.simulated, *self.real]

    @property
    def noises(self) -> list[Path]:
        return [*self.isotropic_noises, *self.pointsource_noises]


def _absolute(path: str | os.PathLike) -> Path:
    """``path`` made absolute and normalised (``..`` removed), symbolic links kept as named."""
    return Path(os.path.abspath(path))


def wavs_under(folder: Path) -> list[Path]:
    """Every ``*.wav`` file below ``folder``, sorted, as absolute paths."""
    return sorted(_absolute(path) for path in folder.rglob("*.wav") if path.is_file())


def _corpus_root(folder: str | os.PathLike, child: str, is_root) -> Path:
    """``folder`` if it is the corpus root, else its ``child`` folder if that is (an archive unpacked into folder)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AugmentListError(f"{folder}: no such folder")
    if is_root(folder):
        return folder
    if is_root(folder / child):
        return folder / child
    return folder


def musan_lists(folder: str | os.PathLike) -> dict[str, list[Path]]:
    """MUSAN's wavs by category (``noise``, ``music``, ``speech``); ``folder`` is ``musan/`` or holds it."""
    root = _corpus_root(folder, "musan", lambda path: all((path / name).is_dir() for name in MUSAN_FOLDERS))
    lists = {}
    for name in MUSAN_FOLDERS:
        if not (root / name).is_dir():
            raise AugmentListError(f"{root}: not a MUSAN folder (no {name}/ in it; expected noise/, music/, speech/)")
        lists[name] = wavs_under(root / name)
        if not lists[name]:
            raise AugmentListError(f"{root / name}: no wav files")
    return lists


def is_rirs_noises(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` has the layout of an unpacked RIRS_NOISES (one of its three subfolders)."""
    return any((Path(folder) / name).is_dir() for name in RIRS_NOISES_MARKERS)


def _listed_path(entry: str, root: Path, list_folder: Path) -> Path | None:
    """The file a ``rir_list`` entry names: relative to the folder above the root (``RIRS_NOISES/real_...``), the
    root itself, or the list's folder (a root unpacked under another name); None when none exists."""
    path = Path(entry)
    if path.is_absolute():
        return _absolute(path) if path.is_file() else None
    candidates = [root.parent / path, root / path, root / Path(*path.parts[1:]) if len(path.parts) > 1 else path]
    candidates.append(list_folder / path.name)
    return next((_absolute(candidate) for candidate in candidates if candidate.is_file()), None)


def _rir_list_entries(rir_list: Path) -> list[str]:
    """The file each line of a Kaldi ``rir_list`` names (``--rir-id ID --room-id ROOM PATH``): its non-option field."""
    entries = []
    for number, line in enumerate(rir_list.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        positional = []
        while fields:
            word = fields.pop(0)
            if not word.startswith("--"):
                positional.append(word)
            elif "=" not in word and fields:
                fields.pop(0)  # the option's value
        if not positional:
            raise AugmentListError(f"{rir_list}:{number}: no file named (expected '--rir-id ID --room-id ROOM PATH')")
        entries.append(positional[-1])
    return entries


def rirs_noises_lists(folder: str | os.PathLike) -> RirsNoises:
    """Sort an RIRS_NOISES folder (``RIRS_NOISES/`` or the folder holding it) into impulse responses and noises."""
    root = _corpus_root(folder, "RIRS_NOISES", is_rirs_noises)
    if not is_rirs_noises(root):
        raise AugmentListError(f"{root}: not an RIRS_NOISES folder (none of {', '.join(RIRS_NOISES_MARKERS)})")
    found = RirsNoises()
    if (root / "simulated_rirs").is_dir():
        found.simulated = wavs_under(root / "simulated_rirs")
    real_folder = root / "real_rirs_isotropic_noises"
    if real_folder.is_dir():
        rir_list = real_folder / "rir_list"
        if not rir_list.is_file():
            raise AugmentListError(f"{rir_list}: missing (it names the real impulse responses among the noises)")
        real = {}
        for entry in _rir_list_entries(rir_list):
            path = _listed_path(entry, root, real_folder)
            if path is None:
                found.missing.append(entry)
            else:
                real[path] = None
        found.real = list(real)
        found.isotropic_noises = [path for path in wavs_under(real_folder) if path not in real]
        if found.missing:
            logger.warning(
                "%s names %d files that are not there (first: %s); they are left out",
                rir_list,
                len(found.missing),
                found.missing[0],
            )
    if (root / "pointsource_noises").is_dir():
        found.pointsource_noises = wavs_under(root / "pointsource_noises")
    if not found.rirs:
        raise AugmentListError(f"{root}: no impulse responses found (simulated_rirs/ or rir_list)")
    return found


def rir_files(folder: str | os.PathLike) -> list[Path]:
    """Impulse responses in ``folder``: RIRS_NOISES' own (never its noises) for that layout, else every wav."""
    if is_rirs_noises(folder) or is_rirs_noises(Path(folder) / "RIRS_NOISES"):
        return rirs_noises_lists(folder).rirs
    return wavs_under(Path(folder))


@dataclass
class AugmentLists:
    """The lists written (category -> files) and what was left out of them, for the report."""

    files: dict[str, list[Path]]
    written: dict[str, Path]
    left_out: dict[str, int]

    def report(self) -> str:
        """One line per list with its count, then what was left out and why."""
        lines = [f"{self.written[name]}: {len(self.files[name])} files" for name in self.written]
        lines += [f"left out: {count} {what}" for what, count in self.left_out.items() if count]
        return "\n".join(lines)


def _list_text(paths: list[Path], list_name: str) -> str:
    for path in paths:
        if "\n" in str(path) or "\r" in str(path):
            raise AugmentListError(f"{path!r}: a line break in the path cannot be written to {list_name}")
    return "".join(f"{path}\n" for path in paths)


def write_augment_lists(
    out: str | os.PathLike, musan: str | os.PathLike | None = None, rirs: str | os.PathLike | None = None
) -> AugmentLists:
    """Write ``noise/music/babble.list`` from MUSAN and ``rir.list`` from RIRS_NOISES into ``out`` (atomically).

    RIRS_NOISES' noises join ``noise.list`` only without MUSAN (module docstring). Lists of a
    corpus not given are left as they are, so MUSAN and RIRS_NOISES can be listed in two runs.
    """
    if musan is None and rirs is None:
        raise AugmentListError("nothing to list: give a MUSAN folder, an RIRS_NOISES folder or both")
    files: dict[str, list[Path]] = {}
    left_out: dict[str, int] = {}
    if musan is not None:
        files.update(musan_lists(musan))
    if rirs is not None:
        found = rirs_noises_lists(rirs)
        files["rir"] = found.rirs
        if musan is None:
            files["noise"] = found.noises
        else:
            left_out["isotropic noises (MUSAN gives the noise)"] = len(found.isotropic_noises)
            left_out["point-source noises (MUSAN gives the noise)"] = len(found.pointsource_noises)
        left_out["rir_list entries not found"] = len(found.missing)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, paths in files.items():
        if not paths:
            continue
        written[name] = out / LIST_FILES[name]
        atomic_write_text(written[name], _list_text(paths, LIST_FILES[name]))
    return AugmentLists({name: files[name] for name in written}, written, left_out)


def read_list(path: str | os.PathLike) -> list[Path]:
    """The files a list names, one per line (relative paths are taken from the list's folder).

    An empty list, or one naming a file that is not there, is an error naming the list (and the line).
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as err:
        raise AugmentListError(f"{path}: no such list file") from err
    files = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        file = _absolute(line if Path(line).is_absolute() else path.parent / line)
        if not file.is_file():
            raise AugmentListError(f"{path}:{number}: no such file {line}")
        files.append(file)
    if not files:
        raise AugmentListError(f"{path}: the list names no files")
    return files


def read_lists(lists_dir: str | os.PathLike | None = None, **lists: str | os.PathLike | None) -> dict[str, list[Path]]:
    """Category -> files from the list files given (``noise=``, ``music=``, ``speech=``, ``rir=``) and those in
    ``lists_dir`` (``LIST_FILES``). A ``lists_dir`` that does not exist gives nothing (stage 0 was not run); one
    that exists without any list is an error. A list given by name wins over the folder's."""
    unknown = set(lists) - set(LIST_FILES)
    if unknown:
        raise TypeError(f"unknown list kind(s): {', '.join(sorted(unknown))}")
    chosen = {name: Path(value) for name, value in lists.items() if value is not None}
    if lists_dir is not None:
        lists_dir = Path(lists_dir)
        if not lists_dir.exists():
            logger.info("%s: no augmentation lists (run.sh --stage 0 writes them)", lists_dir)
        else:
            present = {name: lists_dir / file for name, file in LIST_FILES.items() if (lists_dir / file).is_file()}
            if not present:
                raise AugmentListError(f"{lists_dir}: none of {', '.join(LIST_FILES.values())} in it")
            chosen = {**present, **chosen}
    return {name: read_list(path) for name, path in chosen.items()}
