"""Run an exported ONNX embedding model with onnxruntime and numpy only (this module never imports torch).

    from qmargin_spk.inference.onnx_runtime import OnnxSpeakerModel
    model = OnnxSpeakerModel("DIR/embedding_model.onnx")
    embeddings = model.embed([wav1, wav2])          # 1-D float32 arrays at model.sample_rate

Waveforms are batched by the planner :class:`SpeakerModel` uses
(:mod:`qmargin_spk.data.batching`): only equal lengths share a batch (the graph has no
length input), so each embedding is that of the utterance alone. Reading and resampling audio
files is left to the caller (e.g. soundfile).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

from qmargin_spk.data.batching import check_batching, check_min_length, embed_pieces, max_batch_samples, plan_pieces

METADATA_KEY = "qmargin_spk"  # the same as qmargin_spk.inference.export.METADATA_KEY (that module needs torch)


class OnnxSpeakerModel:
    """An ``embedding_model.onnx`` written by :func:`qmargin_spk.inference.export.export_onnx`."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        metadata = self.session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in metadata:
            raise ValueError(f"{path}: not an embedding model exported by qmargin_spk (no {METADATA_KEY!r} metadata)")
        self.metadata = json.loads(metadata[METADATA_KEY])
        self.sample_rate = int(self.metadata["sample_rate"])
        self.embedding_dim = int(self.metadata["embedding_dim"])
        self.identity: str | None = self.metadata.get("model_identity")  # the model's identity (None: older export)
        # the shortest input (samples) the model embeds; None: an older export, not checked
        stored = self.metadata.get("min_samples")
        self.min_samples: int | None = None if stored is None else int(stored)

    def embed_batch(self, wavs: np.ndarray) -> np.ndarray:
        """Raw embeddings ``[B, D]`` of equal-length waveforms ``[B, T]``."""
        return self.session.run(None, {"wav": np.ascontiguousarray(wavs, dtype=np.float32)})[0]

    def embed(
        self,
        wavs: Sequence[np.ndarray],
        batch_size: int = 16,
        chunk_seconds: float | None = None,
        max_batch_seconds: float | None = None,
    ) -> np.ndarray:
        """L2-normalised float32 embeddings ``[N, D]`` of 1-D waveforms at :attr:`sample_rate`.

        Batched as :class:`SpeakerModel` batches (:mod:`qmargin_spk.data.batching`), with the
        same ``chunk_seconds`` and ``max_batch_seconds``. A waveform (or chunk) shorter than
        :attr:`min_samples` is a ValueError naming it (:class:`~qmargin_spk.data.batching.TooShortError`).
        """
        check_batching(
            batch_size, max_batch_seconds=max_batch_seconds, chunk_seconds=chunk_seconds, sample_rate=self.sample_rate
        )
        arrays = [np.asarray(wav, dtype=np.float32) for wav in wavs]
        if not arrays:
            raise ValueError("no audio given")
        for index, wav in enumerate(arrays):
            if wav.ndim != 1 or wav.size == 0:
                raise ValueError(f"waveform {index}: expected a non-empty 1-D array (mono), got shape {wav.shape}")
        pieces = plan_pieces({row: wav.size for row, wav in enumerate(arrays)}, chunk_seconds, self.sample_rate)
        check_min_length(pieces, self.min_samples, self.sample_rate, lambda row: f"waveform {row}")
        out = embed_pieces(
            pieces,
            len(arrays),
            lambda p: arrays[p.row][p.start : p.start + p.length],
            self.embed_batch,
            batch_size,
            max_batch_samples(max_batch_seconds, self.sample_rate),
        )
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        if np.any(norms == 0) or not np.all(np.isfinite(out)):
            raise ValueError("the model gave a zero or non-finite embedding")
        return (out / norms).astype(np.float32)
