"""Export a packaged model to ONNX or TorchScript: waveform in, raw embedding out, features inside the graph.

Two parts of the PyTorch model do not export as they are, so the exported graph uses
equivalents that compute the same numbers:

* SpeechBrain's ``Fbank`` calls ``torch.stft`` with complex output, which the ONNX
  exporter refuses. :class:`ExportableFbank` computes the same filterbanks with the
  short-time DFT as a strided convolution whose kernels are the windowed cosine and
  sine bases; the mel matrix, window, hop, padding and dB conversion are taken from the
  model's own ``Fbank`` (so they cannot drift). The Kaldi filterbank (``kaldi_fbank``,
  :class:`~qmargin_spk.models.kaldi_fbank.KaldiFbank`) exports as it is.
* ECAPA's attentive pooling builds its mask with ``length_to_mask``, which reads the
  batch size as a Python number, freezing it into a traced graph. During export the
  mask is built by broadcasting instead (:func:`_traceable_masks`; the same values).

The graph takes ``wav`` ``[batch, samples]`` (float32, mono, at the model's sample
rate, both axes dynamic) and returns ``embedding`` ``[batch, D]`` (not normalised).
Every row is treated as a whole utterance: there is no length input, so batch only
utterances of equal length (as :class:`SpeakerModel` does) or run them one at a time.
The ONNX file (and the TorchScript file's ``model.json`` extra file) carries the model's settings
and its identity (``model_identity``, as in the folder's ``model.json``) in its metadata; it runs with
``onnxruntime`` and ``numpy`` alone (:mod:`qmargin_spk.inference.onnx_runtime`).

``quantize="int8"`` adds dynamic int8 quantisation of the embedding network's weights
(``onnxruntime.quantization.quantize_dynamic``); the front end stays float32 because
quantised DFT kernels would wreck the filterbanks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from qmargin_spk.inference.model import SpeakerModel
from qmargin_spk.models.kaldi_fbank import KaldiFbank
from qmargin_spk.utils.atomic import atomic_open

ONNX_FILE = "embedding_model.onnx"
ONNX_INT8_FILE = "embedding_model.int8.onnx"
TORCHSCRIPT_FILE = "embedding_model.torchscript.pt"
OPSET = 17
METADATA_KEY = "qmargin_spk"  # the ONNX metadata entry holding :func:`_metadata` as JSON
FRONT_END_SCOPE = "front_end"  # the name of the feature module: its ONNX nodes are left unquantised


class ExportableFbank(torch.nn.Module):
    """SpeechBrain ``Fbank`` (no deltas, no context) as convolution + matrix product; same output."""

    def __init__(self, fbank: torch.nn.Module) -> None:
        super().__init__()
        if fbank.deltas or fbank.context:
            raise ValueError("only Fbank without deltas and context can be exported")
        stft, filterbank = fbank.compute_STFT, fbank.compute_fbanks
        if not (stft.center and stft.pad_mode == "constant" and stft.onesided and not stft.normalized_stft):
            raise ValueError("only the centred, zero-padded, one-sided, unnormalised STFT can be exported")
        self.n_fft, self.hop_length = stft.n_fft, stft.hop_length
        window = torch.zeros(self.n_fft, dtype=torch.float64)
        left = (self.n_fft - stft.win_length) // 2  # torch.stft centres a shorter window in the frame
        window[left : left + stft.win_length] = stft.window.to(torch.float64)
        bins = self.n_fft // 2 + 1
        phase = (
            2
            * math.pi
            * torch.outer(torch.arange(bins, dtype=torch.float64), torch.arange(self.n_fft, dtype=torch.float64))
            / self.n_fft
        )
        basis = torch.cat([torch.cos(phase), -torch.sin(phase)]) * window
        self.register_buffer("dft_kernels", basis.to(torch.float32)[:, None, :])
        self.register_buffer("mel_matrix", _mel_matrix(filterbank, bins))
        self.bins = bins
        self.log_mel = bool(filterbank.log_mel)
        self.multiplier = float(filterbank.multiplier)
        self.amin = float(filterbank.amin)
        self.db_offset = float(filterbank.multiplier * filterbank.db_multiplier)
        self.top_db = float(filterbank.top_db)

    def forward(self, wavs: torch.Tensor) -> torch.Tensor:
        """Filterbanks ``[B, frames, n_mels]`` of waveforms ``[B, T]`` (frames = T // hop + 1)."""
        padded = torch.nn.functional.pad(wavs.unsqueeze(1), (self.n_fft // 2, self.n_fft // 2))
        spectrum = torch.nn.functional.conv1d(padded, self.dft_kernels, stride=self.hop_length)
        power = spectrum[:, : self.bins].square() + spectrum[:, self.bins :].square()
        fbanks = torch.matmul(power.transpose(1, 2), self.mel_matrix)
        if not self.log_mel:
            return fbanks
        db = self.multiplier * torch.log10(torch.clamp(fbanks, min=self.amin)) - self.db_offset
        floor = db.amax(dim=(1, 2), keepdim=True) - self.top_db
        return torch.maximum(db, floor)


class ExportableEmbedder(torch.nn.Module):
    """Waveforms ``[B, T]`` (whole utterances) -> raw embeddings ``[B, D]``: ``SpeakerEmbedder`` at full lengths."""

    def __init__(self, model: SpeakerModel) -> None:
        super().__init__()
        embedder = model.embedder
        norm = embedder.mean_var_norm
        if norm.norm_type != "sentence" or norm.std_norm:
            raise ValueError("only per-sentence mean normalisation (std_norm False) can be exported")
        features = embedder.compute_features
        setattr(self, FRONT_END_SCOPE, features if isinstance(features, KaldiFbank) else ExportableFbank(features))
        self.embedding_model = embedder.embedding_model
        self.eval()

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        feats = getattr(self, FRONT_END_SCOPE)(wav)
        feats = feats - feats.mean(dim=1, keepdim=True)
        return self.embedding_model(feats).squeeze(1)


def export_onnx(model: SpeakerModel, out_path: str | os.PathLike, quantize: str | None = None) -> Path:
    """Write the ONNX graph (:data:`OPSET`) to ``out_path`` atomically; with ``quantize="int8"``, int8 weights."""
    import onnx

    if quantize not in (None, "int8"):
        raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
    out_path = Path(out_path)
    exportable = ExportableEmbedder(model).to("cpu")
    example = torch.zeros(2, model.sample_rate)
    with tempfile.TemporaryDirectory() as scratch:
        plain = Path(scratch) / "model.onnx"
        with _traceable_masks(), torch.no_grad(), _quiet_exporter():
            torch.onnx.export(
                exportable,
                (example,),
                str(plain),
                dynamo=False,
                opset_version=OPSET,
                input_names=["wav"],
                output_names=["embedding"],
                dynamic_axes={"wav": {0: "batch", 1: "samples"}, "embedding": {0: "batch"}},
            )
        graph = onnx.load(str(plain))
        if quantize == "int8":
            graph = _quantize_int8(graph, Path(scratch))
        entry = graph.metadata_props.add()
        entry.key = METADATA_KEY
        entry.value = json.dumps({**_metadata(model), "quantization": quantize or "none"})
        onnx.checker.check_model(graph)
        with atomic_open(out_path, "wb") as handle:
            handle.write(graph.SerializeToString())
    return out_path


def export_torchscript(model: SpeakerModel, out_path: str | os.PathLike) -> Path:
    """Write a traced TorchScript module (``torch.jit.load``; call it on ``[B, T]``) to ``out_path`` atomically.

    The model's settings are stored as the extra file ``model.json``.
    """
    out_path = Path(out_path)
    exportable = ExportableEmbedder(model).to("cpu")
    with _traceable_masks(), torch.no_grad(), _quiet_exporter():
        traced = torch.jit.trace(exportable, (torch.zeros(2, model.sample_rate),), check_trace=False)
    with atomic_open(out_path, "wb") as handle, _quiet_exporter():
        torch.jit.save(traced, handle, _extra_files={"model.json": json.dumps(_metadata(model))})
    return out_path


def _metadata(model: SpeakerModel) -> dict:
    """What a runtime needs to feed the graph, and which weights it holds."""
    return {
        "export_format": 1,
        "sample_rate": model.sample_rate,
        "embedding_dim": model.embedding_dim,
        "input": "wav [batch, samples] float32 mono, whole utterances of equal length per batch",
        "output": "embedding [batch, D], not normalised; score with the cosine",
        "checkpoint_sha256": model.info.get("checkpoint_sha256"),
        "model_identity": model.identity,  # model.json's, which loading checked against the weights
        "min_samples": model.min_samples,  # the shortest input the model embeds
    }


def _mel_matrix(filterbank: torch.nn.Module, bins: int) -> torch.Tensor:
    """The filterbank's ``[bins, n_mels]`` matrix, read by passing it an identity spectrogram without the log."""
    log_mel, training = filterbank.log_mel, filterbank.training
    try:
        filterbank.log_mel = False
        filterbank.eval()
        with torch.no_grad():
            return filterbank(torch.eye(bins)[None])[0].to(torch.float32)
    finally:
        filterbank.log_mel = log_mel
        filterbank.train(training)


@contextlib.contextmanager
def _traceable_masks() -> Iterator[None]:
    """Make ECAPA's ``length_to_mask`` broadcast instead of reading the batch size as a Python int."""
    from speechbrain.lobes.models import ECAPA_TDNN

    original = ECAPA_TDNN.length_to_mask

    def broadcast_mask(length, max_len=None, dtype=None, device=None):
        positions = torch.arange(max_len, device=length.device, dtype=length.dtype)
        return (positions[None, :] < length[:, None]).to(dtype or length.dtype)

    ECAPA_TDNN.length_to_mask = broadcast_mask
    try:
        yield
    finally:
        ECAPA_TDNN.length_to_mask = original


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporters' deprecation notices and constant-folding remarks (the graphs are tested)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.")
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message="Constant folding", category=UserWarning)
        warnings.filterwarnings("ignore", message="`torch.jit", category=FutureWarning)
        yield


def _quantize_int8(graph, scratch: Path):
    """Dynamic int8 quantisation of every node outside the front end."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source, target = scratch / "float.onnx", scratch / "int8.onnx"
    onnx.save(graph, str(source))
    front_end = [node.name for node in graph.graph.node if node.name.startswith(f"/{FRONT_END_SCOPE}/")]
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantiser warns on root about every integer tensor it skips
    try:
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, nodes_to_exclude=front_end)
    finally:
        root.setLevel(level)
    return onnx.load(str(target))
