"""A model's identity: one SHA-256 over its loaded weights, the same wherever the weights came from.

Names in sorted order, then each tensor's dtype, shape and raw bytes (on the CPU, contiguous). It is
computed on the model after the weights are loaded into it, so averaged checkpoints, a model folder
and an imported checkpoint of the same weights share one identity; caches and results carry it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch


def model_identity(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Hex SHA-256 of a state dict (sorted names, dtype, shape, bytes)."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().to("cpu").contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
