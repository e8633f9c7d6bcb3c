"""ResNet speaker embedder in the form WeSpeaker trains (ResNet34, 32 base channels, TSTP pooling).

The network treats the filterbank ``[B, T, F]`` as a one-channel image ``[B, 1, F, T]``: a 3x3
stem, four stages of basic residual blocks (channels c, 2c, 4c, 8c; stride 2 in both axes at the
start of stages 2-4), temporal statistics pooling (mean and standard deviation over time of every
channel x frequency row) and one linear layer to the embedding.

Submodule names follow WeSpeaker's checkpoints (``conv1``, ``bn1``, ``layer{1-4}.{i}.conv1``,
``...bn1``, ``...conv2``, ``...bn2``, ``...shortcut.{0,1}``, ``seg_1``), so a WeSpeaker state dict
loads as it is (:func:`wespeaker_state_dict` drops what is not part of the embedder). The forward
pass follows SpeechBrain's embedding-model convention: ``forward(features, lengths) -> [B, 1, D]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

RESNET34_BLOCKS = (3, 4, 6, 3)
STD_FLOOR = 1e-7  # added to the variance before the square root, as WeSpeaker's TSTP pooling does


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a residual connection (a 1x1 projection when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Sequential()
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(residual + self.shortcut(x))


class ResNetSpeaker(nn.Module):
    """ResNet with basic blocks and temporal statistics pooling; ``[B, T, feat_dim]`` -> ``[B, 1, embedding_dim]``.

    Arguments:
        feat_dim: filterbank channels per frame (80 for WeSpeaker's models).
        embedding_dim: size of the embedding.
        base_channels: channels of the stem and the first stage (doubled at each later stage).
        num_blocks: residual blocks per stage (ResNet34: 3, 4, 6, 3).
    """

    def __init__(
        self,
        feat_dim: int = 80,
        embedding_dim: int = 256,
        base_channels: int = 32,
        num_blocks: Sequence[int] = RESNET34_BLOCKS,
    ) -> None:
        super().__init__()
        if len(num_blocks) != 4 or min(num_blocks) < 1:
            raise ValueError(f"num_blocks must be four positive counts, got {list(num_blocks)}")
        self.feat_dim, self.embedding_dim = feat_dim, embedding_dim
        self.conv1 = nn.Conv2d(1, base_channels, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(base_channels)
        channels = base_channels
        for stage, blocks in enumerate(num_blocks):
            width = base_channels * 2**stage
            stride = 1 if stage == 0 else 2
            layers = [BasicBlock(channels if i == 0 else width, width, stride if i == 0 else 1) for i in range(blocks)]
            setattr(self, f"layer{stage + 1}", nn.Sequential(*layers))
            channels = width
        # WeSpeaker sizes the pooled vector as feat_dim // 8 frequency rows (exact for multiples of 8).
        self.stats_dim = (feat_dim // 8) * channels
        self.seg_1 = nn.Linear(2 * self.stats_dim, embedding_dim)

    def frame_features(self, features: torch.Tensor) -> torch.Tensor:
        """Frame-level maps ``[B, channels, F / 8, T / 8]`` of features ``[B, T, F]``."""
        x = torch.relu(self.bn1(self.conv1(features.transpose(1, 2).unsqueeze(1))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, features: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings ``[B, 1, embedding_dim]`` of features ``[B, T, feat_dim]``.

        ``lengths`` (relative, in (0, 1]) restricts the pooling statistics to each item's own frames;
        ``None`` pools over all frames (WeSpeaker's behaviour).
        """
        maps = self.frame_features(features)
        maps = maps.flatten(1, 2)  # [B, channels * F/8, T/8]
        stats = _masked_stats(maps, lengths) if lengths is not None else _stats(maps)
        return self.seg_1(stats).unsqueeze(1)


def _stats(maps: torch.Tensor) -> torch.Tensor:
    """Mean and standard deviation (unbiased variance + floor) over the last axis, concatenated."""
    return torch.cat([maps.mean(dim=-1), torch.sqrt(maps.var(dim=-1) + STD_FLOOR)], dim=1)


def _masked_stats(maps: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """:func:`_stats` over the first ``round(lengths * T)`` frames of each item (at least 2)."""
    frames = maps.shape[-1]
    counts = torch.clamp(torch.round(lengths.to(maps.dtype) * frames), min=min(2, frames), max=frames)
    mask = (torch.arange(frames, device=maps.device)[None, :] < counts[:, None]).to(maps.dtype)[:, None, :]
    mean = (maps * mask).sum(dim=-1) / counts[:, None]
    var = (((maps - mean[..., None]) * mask) ** 2).sum(dim=-1) / (counts[:, None] - 1)
    return torch.cat([mean, torch.sqrt(var + STD_FLOOR)], dim=1)


def wespeaker_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A WeSpeaker ResNet checkpoint's state dict with the keys :class:`ResNetSpeaker` loads.

    The names are the same; this drops a ``module.`` prefix (DataParallel), the training loss's
    ``projection.*`` weights, and turns averaged ``num_batches_tracked`` (stored as floats) back into integers.
    """
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if key.startswith("projection."):
            continue
        if key.endswith("num_batches_tracked"):
            value = value.round().to(torch.long)
        out[key] = value
    return out
