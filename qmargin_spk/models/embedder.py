"""Waveform -> speaker embedding: filterbank, per-utterance mean normalisation, embedding network.

Training and extraction call the same module, so features can never drift between them.
"""

from __future__ import annotations

import torch


class SpeakerEmbedder(torch.nn.Module):
    """Wraps a feature extractor, a normaliser and an embedding model (SpeechBrain lobes)."""

    def __init__(
        self, compute_features: torch.nn.Module, mean_var_norm: torch.nn.Module, embedding_model: torch.nn.Module
    ) -> None:
        super().__init__()
        self.compute_features = compute_features
        self.mean_var_norm = mean_var_norm
        self.embedding_model = embedding_model

    def forward(self, wavs: torch.Tensor, rel_lens: torch.Tensor) -> torch.Tensor:
        """Embeddings ``[B, D]`` of padded waveforms ``[B, T]`` with relative lengths ``[B]``."""
        feats = self.compute_features(wavs)
        feats = self.mean_var_norm(feats, rel_lens)
        return self.embedding_model(feats, rel_lens).squeeze(1)


def count_parameters(module: torch.nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
