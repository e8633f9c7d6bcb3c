"""Where trial items find their audio and their speaker: a wav tree, or the test set's manifest.

In an audio tree an item is a path relative to the root and its speaker the first path
component (the tree's definition of a speaker). With a manifest (the prepared
``test.csv`` of a Kaldi data dir, a CSV manifest or a generic tree) an item is an
utterance id, or a path whose extension-stripped form is one (trees list paths, their
manifest ids drop the extension), and its speaker is the manifest's ``spk_id`` - never
guessed from the id, which in Kaldi dirs and manifests need not start with the speaker.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from qmargin_spk.data.manifest import ManifestError, read_manifest, utterance_id
from qmargin_spk.metrics.bootstrap import utterance_speakers


class TestUtterances:
    """The utterances trial items may name: under ``root`` (a wav tree) or the ``audio`` mapping (id -> audio).

    ``speakers`` (id -> speaker) overrides the first path component of tree items; with ``audio``
    it is required for every utterance a bootstrap or a model needs.
    """

    __test__ = False  # not a pytest class

    def __init__(
        self,
        root: str | os.PathLike,
        audio: Mapping[str, object] | None = None,
        speakers: Mapping[str, str] | None = None,
        source: str | os.PathLike | None = None,
    ) -> None:
        self.root = Path(root)
        self.audio_map = None if audio is None else dict(audio)
        self.speakers = None if speakers is None else dict(speakers)
        self.source = str(source if source is not None else root)

    @property
    def is_tree(self) -> bool:
        return self.audio_map is None

    def key(self, item: str) -> str | None:
        """The manifest id of ``item`` (itself, or without its extension), None when absent; tree: the item."""
        if self.audio_map is None:
            return item
        if item in self.audio_map:
            return item
        stripped = utterance_id(item)
        return stripped if stripped in self.audio_map else None

    def present(self, item: str) -> bool:
        """Whether ``item`` names an utterance of the test set (a file under the root, or a manifest id)."""
        if self.audio_map is None:
            return (self.root / item).is_file()
        return self.key(item) is not None

    def where(self) -> str:
        """How a missing item is reported (see :func:`qmargin_spk.data.trials.check_trial_items`)."""
        return f"missing under {self.root}" if self.is_tree else f"not in the test manifest {self.source}"

    def audio(self, item: str) -> object:
        """The audio of a present ``item``: its path under the root, or the manifest's entry."""
        if self.audio_map is None:
            return self.root / item
        return self.audio_map[self.key(item)]

    def speaker(self, item: str) -> str:
        """The speaker of a present ``item``: the manifest's, else (trees) the first path component."""
        key = self.key(item)
        if self.speakers is not None and key in self.speakers:
            return self.speakers[key]
        if self.audio_map is not None:
            raise KeyError(f"{self.source}: utterance {item!r} has no speaker")
        return str(utterance_speakers([item])[0])


def prepared_test_set(test_root: str | os.PathLike, test_manifest: str | os.PathLike | None) -> TestUtterances:
    """Stage 3's test set: ``test_root/wav`` for a VoxCeleb-layout tree, else the prepared test manifest.

    The manifest (``EXP/data/test.csv``, written by stage 1 from any input form) gives each id its
    audio and speaker. ManifestError when neither is there.
    """
    root = Path(test_root)
    if (root / "wav").is_dir():
        return TestUtterances(root / "wav")
    if test_manifest is None or not Path(test_manifest).is_file():
        raise ManifestError(
            f"{root}: not a VoxCeleb-layout folder (no wav/) and no prepared test manifest "
            f"({test_manifest}); run stage 1 on this test root first"
        )
    rows = read_manifest(test_manifest)
    return TestUtterances(
        root, {row.id: row.wav for row in rows}, {row.id: row.spk_id for row in rows}, source=test_manifest
    )
