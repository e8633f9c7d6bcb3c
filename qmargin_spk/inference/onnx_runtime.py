"""Run an exported ONNX embedding model with onnxruntime and numpy only (this module never imports torch).

    from qmargin_spk.inference.onnx_runtime import OnnxSpeakerModel
    model = OnnxSpeakerModel("DIR/embedding_model.onnx")
    embeddings = model.embed([wav1, wav2])          # 1-D float32 arrays at model.sample_rate

Waveforms are batched like :class:`SpeakerModel` batches them: only equal lengths share
a batch (the graph has no length input), so each embedding is that of the utterance
alone. Reading and resampling audio files is left to the caller (e.g. soundfile).
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

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

    def embed_batch(self, wavs: np.ndarray) -> np.ndarray:
        """Raw embeddings ``[B, D]`` of equal-length waveforms ``[B, T]``."""
        return self.session.run(None, {"wav": np.ascontiguousarray(wavs, dtype=np.float32)})[0]

    def embed(self, wavs: Sequence[np.ndarray], batch_size: int = 16) -> np.ndarray:
        """L2-normalised float32 embeddings ``[N, D]`` of 1-D waveforms at :attr:`sample_rate`."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        arrays = [np.asarray(wav, dtype=np.float32) for wav in wavs]
        for index, wav in enumerate(arrays):
            if wav.ndim != 1 or wav.size == 0:
                raise ValueError(f"waveform {index}: expected a non-empty 1-D array (mono), got shape {wav.shape}")
        out = np.zeros((len(arrays), self.embedding_dim), dtype=np.float64)
        order = sorted(range(len(arrays)), key=lambda i: -arrays[i].size)
        start = 0
        while start < len(order):
            length = arrays[order[start]].size
            stop = start + 1
            while stop < len(order) and stop - start < batch_size and arrays[order[stop]].size == length:
                stop += 1
            rows = order[start:stop]
            out[rows] = self.embed_batch(np.stack([arrays[i] for i in rows]))
            start = stop
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        if np.any(norms == 0) or not np.all(np.isfinite(out)):
            raise ValueError("the model gave a zero or non-finite embedding")
        return (out / norms).astype(np.float32)
