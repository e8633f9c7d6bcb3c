"""Published models in: a SpeechBrain, WeSpeaker or 3D-Speaker folder becomes an ordinary model folder.

:func:`import_published` reads the folder as its project publishes it (one module per source), checks the
weights strictly against the model the registry builds from the descriptions (every unknown key, missing
key and shape mismatch named, nothing written), then writes the folder through
:func:`~qmargin_spk.inference.package.package_model`, recording where it came from in ``model.json``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qmargin_spk.inference.importers.common import Imported, SourceError, check_weights
from qmargin_spk.inference.importers.speechbrain import read_speechbrain
from qmargin_spk.inference.importers.threedspeaker import read_3dspeaker
from qmargin_spk.inference.importers.wespeaker import read_wespeaker
from qmargin_spk.utils.hashing import file_sha256

READERS: dict[str, Callable[[Path], Imported]] = {
    "speechbrain": read_speechbrain,
    "wespeaker": read_wespeaker,
    "3dspeaker": read_3dspeaker,
}

__all__ = ["READERS", "ImportResult", "SourceError", "import_published"]


@dataclass(frozen=True)
class ImportResult:
    """The written model folder, the SHA-256 of the source weights file and what was left out."""

    folder: Path
    source_sha256: str
    notes: list[str]


def import_published(source_format: str, source: str | os.PathLike, out_dir: str | os.PathLike) -> ImportResult:
    """Import the published model folder ``source`` (``source_format``: a key of :data:`READERS`) into ``out_dir``.

    ``model.json`` records ``source`` (the folder given), ``source_format``, ``source_sha256`` (of the weights
    file) and ``license`` when the folder states one. SourceError (one line) when the folder cannot be imported.
    """
    from qmargin_spk.inference.package import package_model

    if source_format not in READERS:
        raise SourceError(f"unknown source format {source_format!r}; accepted: {', '.join(READERS)}")
    source = Path(source)
    if not source.is_dir():
        raise SourceError(f"{source}: no such folder")
    imported = READERS[source_format](source)
    check_weights(imported)
    digest = file_sha256(imported.weights_file)
    meta = {"source": str(source), "source_format": source_format, "source_sha256": digest}
    if imported.license:
        meta["license"] = imported.license
    if imported.notes:
        meta["source_notes"] = imported.notes
    folder = package_model(out_dir, imported.frontend, imported.backbone, imported.state_dict, meta)
    return ImportResult(folder, digest, imported.notes)
