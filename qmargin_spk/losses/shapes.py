"""SpeechBrain's ``[B, 1, X]`` / ``[B, 1]`` batch shapes, brought to ``[B, X]`` / ``[B]`` in one place."""

from __future__ import annotations

import torch


def flatten_batch(
    values: torch.Tensor, targets: torch.Tensor, name: str = "outputs"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``values`` ``[B, 1, X]`` or ``[B, X]`` -> ``[B, X]``; ``targets`` ``[B, 1]`` or ``[B]`` -> ``[B]``."""
    if values.dim() == 3 and values.shape[1] == 1:
        values = values.squeeze(1)
    if values.dim() != 2:
        raise ValueError(f"{name} must be [B, 1, X] or [B, X], got shape {tuple(values.shape)}")
    if targets.dim() == 2 and targets.shape[1] == 1:
        targets = targets.squeeze(1)
    if targets.dim() != 1:
        raise ValueError(f"targets must be [B, 1] or [B], got shape {tuple(targets.shape)}")
    return values, targets
