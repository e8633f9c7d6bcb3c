"""``SpeakerModel``: embeddings, enrolment, scores and calibrated decisions from a model folder.

Batching policy. An utterance's embedding must not depend on its batch-mates
(speechbrain #1374): padding changes the filterbank frames at the end of the shorter
signals and the convolutions near them, so a padded batch does not give the
embeddings of its members alone. Items are therefore planned by the scoring stage's
batch planner (:mod:`qmargin_spk.data.batching`): sorted by length, and only
*equal-length* items share a batch; everything else runs alone. The embeddings are
then exactly those of the scoring stage, and bulk throughput comes from equal-length
inputs (fixed-length crops, or ``chunk_seconds``).

Decisions. With a ``calibration.json`` the score becomes a natural-log LLR and the
decision is ``LLR >= log((1 - p_target) / p_target)`` (Bayes). Without one there is no
LLR; the decision then uses the minDCF threshold at ``p_target`` measured on the first
cosine-scored list of ``model.json`` with this model (``source`` says which), and is None
when there is no such entry (:mod:`qmargin_spk.inference.decisions`).
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from numpy.typing import ArrayLike

from qmargin_spk.calibration import Calibration, bayes_threshold, trial_quality, utterance_quality
from qmargin_spk.data.audio import audio_info, load_audio
from qmargin_spk.data.batching import (
    Piece,
    check_batching,
    check_min_length,
    embed_pieces,
    max_batch_samples,
    plan_pieces,
)
from qmargin_spk.inference.decisions import own_results, stored_threshold
from qmargin_spk.inference.package import (
    CALIBRATION_FILE,
    CHECKPOINT_FILE,
    MODEL_JSON,
    ModelFolderError,
    model_description,
    read_model_info,
)
from qmargin_spk.models.embedder import SpeakerEmbedder
from qmargin_spk.models.identity import model_identity
from qmargin_spk.models.min_input import shortest_input
from qmargin_spk.models.registry import build_backbone, build_embedder

AudioItem = str | os.PathLike | np.ndarray | torch.Tensor


@dataclass(frozen=True)
class Verification:
    """Outcome of :meth:`SpeakerModel.verify`.

    ``llr`` is None for an uncalibrated model; ``decision`` (True: same speaker) is
    None when the model has neither a calibration nor a stored threshold for
    ``p_target``; ``threshold`` is the threshold applied (on the LLR when calibrated,
    else on the cosine score) and ``source`` says where it comes from.
    """

    score: float
    llr: float | None
    decision: bool | None
    threshold: float | None
    p_target: float
    source: str


class SpeakerModel:
    """A packaged speaker-embedding model (see :mod:`qmargin_spk.inference.package` for the folder)."""

    def __init__(
        self,
        embedder: SpeakerEmbedder,
        info: dict,
        calibration: Calibration | None = None,
        cohort: np.ndarray | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.embedder = embedder.to(device).eval()
        self.info = info
        self.calibration = calibration
        self.cohort = cohort
        self.device = torch.device(device)
        self.folder: Path | None = None  # set by from_folder, for messages

    @classmethod
    def from_folder(
        cls, folder: str | os.PathLike, device: str | torch.device = "cpu", calibrated: bool = True
    ) -> SpeakerModel:
        """Load a model folder (ModelFolderError naming the file when it is incomplete or inconsistent).

        ``calibrated=False`` leaves out the folder's calibration (``qmargin-spk calibrate`` replaces it).

        Nothing in the folder runs: the registry builds the model from ``model.json`` (``hyperparams.yaml``
        is never read), the weights file must have ``model.json``'s ``checkpoint_sha256`` and hold tensors
        only, the loaded weights must have its ``model_identity``, and a calibration must name this model.
        """
        folder = Path(folder)
        info = read_model_info(folder)
        frontend, backbone = model_description(info, folder / MODEL_JSON)
        embedding_model = build_backbone(backbone)
        try:
            embedding_model.load_state_dict(_read_weights(folder, info), strict=True)
        except RuntimeError as err:
            raise ModelFolderError(f"{folder / CHECKPOINT_FILE}: cannot load into the model ({err})") from err
        identity = model_identity(embedding_model.state_dict())
        claimed = info.get("model_identity")
        if claimed is not None and claimed != identity:
            raise ModelFolderError(
                f"{folder / MODEL_JSON}: model_identity {claimed} but the weights in {CHECKPOINT_FILE} have "
                f"identity {identity}"
            )
        embedder = build_embedder(frontend, embedding_model)
        calibration, cohort = _load_calibration(folder, info, identity) if calibrated else (None, None)
        model = cls(embedder, info, calibration, cohort, device)
        model.folder = folder
        model.__dict__["identity"] = identity  # the cached_property's value, computed from these loaded weights
        return model

    @functools.cached_property
    def identity(self) -> str:
        """The model's identity: SHA-256 over its loaded weights (as stage 3 computes it for the same weights)."""
        return model_identity(self.embedder.embedding_model.state_dict())

    @functools.cached_property
    def min_samples(self) -> int:
        """The shortest input (samples) the model embeds: ``model.json``'s ``min_samples``, else probed once."""
        stored = self.info.get("min_samples")
        if stored is None:  # a folder packaged before min_samples was recorded
            return shortest_input(self.embedder, self.sample_rate)
        if isinstance(stored, bool) or not isinstance(stored, int) or stored < 1:
            where = MODEL_JSON if self.folder is None else self.folder / MODEL_JSON
            raise ModelFolderError(f"{where}: min_samples must be a positive integer, got {stored!r}")
        return stored

    @property
    def sample_rate(self) -> int:
        return int(self.info["sample_rate"])

    @property
    def embedding_dim(self) -> int:
        return int(self.info["embedding_dim"])

    def embed_batch(self, wavs: torch.Tensor, rel_lens: torch.Tensor) -> torch.Tensor:
        """Raw float32 CPU embeddings ``[B, D]`` of a padded batch: the scoring stage's ``embed_fn``."""
        with torch.no_grad():
            return self.embedder(wavs.to(self.device), rel_lens.to(self.device)).float().cpu()

    def embed(
        self,
        items: AudioItem | Sequence[AudioItem],
        batch_size: int = 16,
        chunk_seconds: float | None = None,
        progress: bool = False,
        max_batch_seconds: float | None = None,
    ) -> np.ndarray:
        """L2-normalised float32 embeddings ``[N, D]`` of audio files or 1-D waveforms at the model rate.

        One path or waveform gives ``[1, D]``; a 2-D numpy array is read as one waveform per row.

        With ``chunk_seconds``, an item longer than 1.5 chunks is cut into near-equal chunks
        of about that length whose raw embeddings are averaged (as the scoring stage does).
        ``max_batch_seconds`` caps the audio of a batch of several pieces (None: no cap).
        """
        raw = self._raw_embeddings(_as_list(items), batch_size, chunk_seconds, progress, max_batch_seconds)
        return _normalised(raw).astype(np.float32)

    def enroll(
        self, items: AudioItem | Sequence[AudioItem], batch_size: int = 16, chunk_seconds: float | None = None
    ) -> np.ndarray:
        """One speaker's embedding ``[D]``: the renormalised mean of the items' normalised embeddings."""
        embeddings = self.embed(items, batch_size=batch_size, chunk_seconds=chunk_seconds).astype(np.float64)
        return _normalised(embeddings.mean(axis=0, keepdims=True))[0].astype(np.float32)

    @staticmethod
    def score(a: ArrayLike, b: ArrayLike) -> float | np.ndarray:
        """Cosine similarity of embeddings ``[D]`` or row-wise of ``[N, D]`` (float64)."""
        a = np.asarray(a, dtype=np.float64)
        b = np.asarray(b, dtype=np.float64)
        if a.shape != b.shape or a.ndim not in (1, 2):
            raise ValueError(f"score needs two embeddings or two [N, D] arrays of one shape, got {a.shape}, {b.shape}")
        scores = np.sum(_normalised(np.atleast_2d(a)) * _normalised(np.atleast_2d(b)), axis=1)
        return float(scores[0]) if a.ndim == 1 else scores

    def verify(
        self, a: AudioItem | Sequence[AudioItem], b: AudioItem | Sequence[AudioItem], p_target: float = 0.01
    ) -> Verification:
        """Same speaker in ``a`` and ``b``? Each side is a file, a waveform, or a list of them (enrolled together)."""
        sides = [_as_list(a), _as_list(b)]
        embeddings = [self.enroll(side) for side in sides]
        score = self.score(*embeddings)
        if self.calibration is not None:
            values = {"score": np.array([score])}
            if self.calibration.uses_quality:
                values.update(self._quality(sides, embeddings))
            llr = float(self.calibration.llrs(values)[0])
            threshold = bayes_threshold(p_target)
            return Verification(score, llr, llr >= threshold, threshold, p_target, "calibrated: LLR >= log((1-P)/P)")
        stored = self._stored_threshold(p_target)
        if stored is None:
            source = f"uncalibrated, no stored threshold for p_target {p_target:g}: run qmargin-spk calibrate"
            return Verification(score, None, None, None, p_target, source)
        threshold, source = stored
        return Verification(score, None, score >= threshold, threshold, p_target, source)

    def _raw_embeddings(
        self,
        items: list[AudioItem],
        batch_size: int,
        chunk_seconds: float | None,
        progress: bool,
        max_batch_seconds: float | None = None,
    ) -> np.ndarray:
        """Float64 raw embeddings [N, D], batched by :mod:`qmargin_spk.data.batching` (the scoring stage's plan).

        Files are read batch by batch (lengths come from their headers), so memory holds
        one batch of audio, and each piece is read exactly as the scoring stage reads it.
        """
        check_batching(
            batch_size, max_batch_seconds=max_batch_seconds, chunk_seconds=chunk_seconds, sample_rate=self.sample_rate
        )
        lengths = [self._length(item, index) for index, item in enumerate(items)]
        pieces = plan_pieces(dict(enumerate(lengths)), chunk_seconds, self.sample_rate)
        check_min_length(pieces, self.min_samples, self.sample_rate, lambda row: _item_name(items[row], row))
        on_batch, close = _progress_bar(progress, len(pieces))

        def embed(wavs: np.ndarray) -> np.ndarray:
            return self.embed_batch(torch.from_numpy(wavs), torch.ones(len(wavs))).double().numpy()

        try:
            raw = embed_pieces(
                pieces,
                len(items),
                lambda piece: self._load(items[piece.row], piece).numpy(),
                embed,
                batch_size,
                max_batch_samples(max_batch_seconds, self.sample_rate),
                on_batch,
            )
        finally:
            close()
        bad = np.flatnonzero(~np.isfinite(raw).all(axis=1))
        if bad.size:
            raise ValueError(f"the model gave NaN/inf embeddings for item {bad[0]} ({_describe(items[bad[0]])})")
        return raw

    def _length(self, item: AudioItem, index: int) -> int:
        """Samples at the model rate: from a file's header (checked by the audio policy) or a checked waveform."""
        if isinstance(item, (str, os.PathLike)):
            info = audio_info(item)
            return max(1, info.frames * self.sample_rate // info.sample_rate)
        if isinstance(item, (np.ndarray, torch.Tensor)):
            wav = torch.as_tensor(item)
            if wav.ndim != 1 or wav.numel() == 0:
                raise ValueError(f"waveform {index}: expected a non-empty 1-D array (mono), got {tuple(wav.shape)}")
            if not bool(torch.isfinite(wav).all()):
                raise ValueError(f"waveform {index}: contains NaN or inf samples")
            return wav.numel()
        raise TypeError(f"item {index}: expected a path or a 1-D waveform, got {type(item).__name__}")

    def _load(self, item: AudioItem, piece: Piece) -> torch.Tensor:
        """The piece's samples as float32: read from the file like the scoring stage, or sliced from the waveform."""
        if isinstance(item, (str, os.PathLike)):
            return load_audio(
                item, self.sample_rate, start=piece.start, num_samples=None if piece.whole else piece.length
            )
        return torch.as_tensor(item)[piece.start : piece.start + piece.length].detach().to("cpu", torch.float32)

    def _quality(self, sides: list[list[AudioItem]], embeddings: list[np.ndarray]) -> dict[str, np.ndarray]:
        """Quality inputs of one trial: total seconds of each side, imposter means against the stored cohort."""
        durations = [sum(self._length(item, i) for i, item in enumerate(side)) / self.sample_rate for side in sides]
        per_side = utterance_quality(durations, np.stack(embeddings), self.cohort, self.calibration.cohort["top_n"])
        return trial_quality(per_side, [0], [1])

    def _stored_threshold(self, p_target: float) -> tuple[float, str] | None:
        """The minDCF threshold at ``p_target`` of the first cosine-scored list of *this model* in ``model.json``.

        Results that name no model (folders packaged before results did) are not used: when only they
        hold a threshold, an error says so.
        """
        own, unnamed = own_results(self.info, self.identity)
        stored = stored_threshold(own, p_target)
        if stored is None and stored_threshold(unnamed, p_target) is not None:
            where = MODEL_JSON if self.folder is None else self.folder / MODEL_JSON
            raise ModelFolderError(
                f"{where}: its results name no model, so their thresholds cannot be trusted for these weights: "
                "re-run stage 4 (package) or calibrate the folder (qmargin-spk calibrate)"
            )
        return stored


def _read_weights(folder: Path, info: dict) -> dict:
    """The weights file's state dict: its SHA-256 must be ``model.json``'s, and it must hold tensors only."""
    path = folder / CHECKPOINT_FILE
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ModelFolderError(f"{path}: unreadable ({err.strerror})") from err
    actual, claimed = hashlib.sha256(data).hexdigest(), info["checkpoint_sha256"]
    if actual != claimed:
        raise ModelFolderError(
            f"{path}: SHA-256 {actual} differs from model.json's checkpoint_sha256 {claimed} (changed or damaged)"
        )
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ModelFolderError(
            f"{path}: cannot load: not a weights-only checkpoint, refused ({_unpickling_reason(err)})"
        ) from err
    except (RuntimeError, EOFError, ValueError) as err:
        raise ModelFolderError(f"{path}: cannot load ({_unpickling_reason(err)})") from err


def _unpickling_reason(err: Exception) -> str:
    """The line of torch's (multi-line) load error that says what was found."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    details = [line for line in lines[1:] if not line.startswith(("Please file an issue", "Check the documentation"))]
    return details[-1] if details else (lines[0] if lines else type(err).__name__)


def _load_calibration(folder: Path, info: dict, identity: str) -> tuple[Calibration | None, np.ndarray | None]:
    """The folder's calibration and, for quality inputs, its cohort; it must have been fitted for this model."""
    path = folder / CALIBRATION_FILE
    if not path.is_file():
        return None, None
    calibration = Calibration.load(path)
    if not calibration.fitted_for(identity, info["checkpoint_sha256"]):
        fitted = calibration.fit.get("model_identity") or "none recorded"
        raise ModelFolderError(
            f"{path} was fitted for model {fitted}, not this one ({identity}): recalibrate (qmargin-spk calibrate)"
        )
    if not calibration.uses_quality:
        return calibration, None
    if not calibration.cohort or "file" not in calibration.cohort:
        raise ModelFolderError(f"{path}: quality inputs without a cohort")
    cohort_path = folder / calibration.cohort["file"]
    try:
        return calibration, np.load(cohort_path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ModelFolderError(f"{cohort_path}: cannot read the calibration cohort ({err})") from err


def _as_list(items: AudioItem | Sequence[AudioItem]) -> list[AudioItem]:
    """One item becomes a list of one; an empty list is an error."""
    single = isinstance(items, (str, os.PathLike, torch.Tensor)) or (isinstance(items, np.ndarray) and items.ndim == 1)
    listed = [items] if single else list(items)
    if not listed:
        raise ValueError("no audio given")
    return listed


def _progress_bar(show: bool, total: int) -> tuple[Callable[[int], None] | None, Callable[[], None]]:
    """``(on_batch, close)`` of a tqdm bar counting ``total`` pieces when ``show``, else no bar."""
    if not show:
        return None, lambda: None
    from tqdm import tqdm

    bar = tqdm(total=total, unit="utt", desc="embedding")
    return bar.update, bar.close


def _normalised(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError("cannot normalise an all-zero embedding")
    return vectors / norms


def _item_name(item: AudioItem, index: int) -> str:
    """The file's path, or ``waveform <index>``."""
    return str(item) if isinstance(item, (str, os.PathLike)) else f"waveform {index}"


def _describe(item: AudioItem) -> str:
    return str(item) if isinstance(item, (str, os.PathLike)) else f"waveform of {len(item)} samples"
