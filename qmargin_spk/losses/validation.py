"""Input checks of the alpha-divergence solver and the heads: alpha's range, the target layout, finite values.

Kept apart from the solver so the heads and the loss modules check their inputs the same way. A
valid batch costs one host sync (``docs/performance.md``); the checks that name the fault run only
when that one fails.
"""

from __future__ import annotations

import torch

# The solver is exact (docs/loss.md, "Exactness"; tests/test_solver_exactness.py) over [1, MAX_ALPHA].
# Above it the loss's q_y^(1-alpha) overflows float32 for usual scales and margins; alpha 2
# (sparsemax) is already very sparse.
MAX_ALPHA = 10.0


def validate_inputs(logits: torch.Tensor, target: torch.Tensor, alpha: float) -> None:
    """Raise ``ValueError`` on alpha < 1, non-2-D logits, mismatched or out-of-range targets, non-finite logits."""
    validate_alpha(alpha)
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, C], got shape {tuple(logits.shape)}")
    _validate_target_layout(target, logits.shape[0])
    # One host sync for the value checks of a valid batch; the checks that name the fault run only if it fails.
    suspect = ~torch.isfinite(logits.sum())
    if target.numel():
        suspect = suspect | (target.min() < 0) | (target.max() >= logits.shape[1])
    if bool(suspect):
        validate_targets(target, logits.shape[0], logits.shape[1])
        validate_finite(logits, "logits")


def validate_alpha(alpha: float, sparse: bool = False) -> None:
    """Raise ``ValueError`` unless ``1 <= alpha <= MAX_ALPHA`` (``1 < alpha`` when ``sparse``: a sparse support)."""
    if not 1.0 <= alpha <= MAX_ALPHA:
        raise ValueError(f"alpha must lie in [1, {MAX_ALPHA}], got {alpha}")
    if sparse and alpha == 1.0:
        raise ValueError("alpha must be > 1 for a sparse head (alpha 1 is CosFaceLoss)")


def validate_targets(target: torch.Tensor, batch: int, num_classes: int) -> None:
    """Raise ``ValueError`` unless ``target`` is ``[batch]`` integer class indices in ``[0, num_classes)``."""
    _validate_target_layout(target, batch)
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        raise ValueError(f"targets out of range [0, {num_classes}): min {int(target.min())}, max {int(target.max())}")


def _validate_target_layout(target: torch.Tensor, batch: int) -> None:
    """Raise ``ValueError`` unless ``target`` is a ``[batch]`` tensor of an integer dtype (no host sync)."""
    if target.dim() != 1 or target.shape[0] != batch:
        raise ValueError(f"targets must be [B] with B = {batch}, got shape {tuple(target.shape)}")
    if target.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ValueError(f"targets must be integer class indices, got dtype {target.dtype}")


def validate_finite(values: torch.Tensor, name: str) -> None:
    """Raise ``ValueError`` if ``values`` holds NaN or inf."""
    # One reduction catches NaN and inf; only an overflowing sum needs the element-wise check.
    if not bool(torch.isfinite(values.sum())) and not bool(torch.isfinite(values).all()):
        raise ValueError(f"{name} contain NaN or inf")
