"""CAM++ (Wang et al., Interspeech 2023): a 2-D residual front module, densely connected TDNN blocks
with context-aware masking, and statistics pooling.

One class serves the two published families: WeSpeaker's ``CAMPPlus`` and 3D-Speaker's ``CAMPPlus``
have the same state-dict keys and shapes, which are the keys of :class:`CAMPPlus` here, so either
state dict loads by identity. They differ only in the standard deviation of the statistics pooling,
the ``std_mode`` setting: ``"sqrt_var_eps"`` (WeSpeaker, ``sqrt(var + 1e-7)``, finite gradients on a
constant channel) or ``"std"`` (3D-Speaker, the plain unbiased standard deviation).

The forward follows SpeechBrain's ECAPA-TDNN: features ``[B, T, F]`` and optional relative lengths
``[B]`` in, ``[B, 1, D]`` out. Relative lengths mask the time averages (the context of each masking
layer and the statistics pooling); convolutions still see the padding, as in ECAPA. Without lengths
(or with all lengths 1) the output is the references' output.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

STD_MODES = ("sqrt_var_eps", "std")
VAR_EPS = 1e-7  # WeSpeaker's TSTP pooling
SEGMENT_FRAMES = 100  # segment length of the context pooling in each masking layer
BLOCK_LAYERS = (12, 24, 16)  # layers of the three dense blocks (paper size)
BLOCK_KERNELS = ((3, 1), (3, 2), (3, 2))  # (kernel size, dilation) of each block


def _bn_relu(channels: int) -> nn.Sequential:
    """BatchNorm then ReLU, named ``batchnorm`` / ``relu`` (the references' ``nonlinear`` layout)."""
    return nn.Sequential(OrderedDict(batchnorm=nn.BatchNorm1d(channels), relu=nn.ReLU()))


class _ResBlock2d(nn.Module):
    """Two 3x3 convolutions with a residual path; ``stride`` subsamples frequency only."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=(stride, 1), padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=(stride, 1), bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + self.shortcut(x))


class FrequencyHead(nn.Module):
    """The 2-D front module (FCM): ``[B, F, T]`` -> ``[B, channels * ceil(F / 8), T]``."""

    def __init__(self, feat_dim: int, channels: int = 32, blocks: tuple[int, int] = (2, 2)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.layer1 = nn.Sequential(*[_ResBlock2d(channels, channels, 2 if i == 0 else 1) for i in range(blocks[0])])
        self.layer2 = nn.Sequential(*[_ResBlock2d(channels, channels, 2 if i == 0 else 1) for i in range(blocks[1])])
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=(2, 1), padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        bins = feat_dim
        for _ in range(3):  # three frequency subsamplings by 2 (kernel 3, padding 1)
            bins = (bins + 1) // 2
        self.out_channels = channels * bins

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x.unsqueeze(1))))
        out = F.relu(self.bn2(self.conv2(self.layer2(self.layer1(out)))))
        return out.flatten(1, 2)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Time average ``[B, C, 1]`` of ``x`` ``[B, C, T]`` over the frames where ``mask`` ``[B, 1, T]`` is 1."""
    if mask is None:
        return x.mean(-1, keepdim=True)
    return (x * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp_min(1.0)


class ContextMask(nn.Module):
    """Context-aware masking (CAM): a local convolution gated by utterance- and segment-level context."""

    def __init__(self, bn_channels: int, out_channels: int, kernel_size: int, dilation: int) -> None:
        super().__init__()
        padding = (kernel_size - 1) // 2 * dilation
        self.linear_local = nn.Conv1d(
            bn_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False
        )
        self.linear1 = nn.Conv1d(bn_channels, bn_channels // 2, 1)
        self.linear2 = nn.Conv1d(bn_channels // 2, out_channels, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        context = _masked_mean(x, mask) + self._segment_means(x, mask)
        gate = torch.sigmoid(self.linear2(F.relu(self.linear1(context))))
        return self.linear_local(x) * gate

    @staticmethod
    def _segment_means(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Each frame's mean over its segment of ``SEGMENT_FRAMES`` frames (the last segment may be shorter)."""
        means = F.avg_pool1d(x if mask is None else x * mask, SEGMENT_FRAMES, SEGMENT_FRAMES, ceil_mode=True)
        if mask is not None:
            means = means / F.avg_pool1d(mask, SEGMENT_FRAMES, SEGMENT_FRAMES, ceil_mode=True).clamp_min(1e-6)
        return means.repeat_interleave(SEGMENT_FRAMES, dim=-1)[..., : x.shape[-1]]


class DenseTDNNLayer(nn.Module):
    """BN-ReLU, 1x1 bottleneck to ``bn_channels``, BN-ReLU, context-masked TDNN to ``growth_rate`` channels."""

    def __init__(self, in_channels: int, growth_rate: int, bn_channels: int, kernel_size: int, dilation: int) -> None:
        super().__init__()
        self.nonlinear1 = _bn_relu(in_channels)
        self.linear1 = nn.Conv1d(in_channels, bn_channels, 1, bias=False)
        self.nonlinear2 = _bn_relu(bn_channels)
        self.cam_layer = ContextMask(bn_channels, growth_rate, kernel_size, dilation)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.cam_layer(self.nonlinear2(self.linear1(self.nonlinear1(x))), mask)


class DenseTDNNBlock(nn.Module):
    """Layers ``tdnnd1..n``, each appending its ``growth_rate`` new channels to its input."""

    def __init__(
        self, layers: int, in_channels: int, growth_rate: int, bn_channels: int, kernel_size: int, dilation: int
    ):
        super().__init__()
        for i in range(layers):
            layer = DenseTDNNLayer(in_channels + i * growth_rate, growth_rate, bn_channels, kernel_size, dilation)
            self.add_module(f"tdnnd{i + 1}", layer)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.children():
            x = torch.cat([x, layer(x, mask)], dim=1)
        return x


class StatsPool(nn.Module):
    """Mean and standard deviation over time, ``[B, C, T]`` -> ``[B, 2C]``; ``std_mode`` picks the deviation."""

    def __init__(self, std_mode: str = "sqrt_var_eps") -> None:
        super().__init__()
        if std_mode not in STD_MODES:
            raise ValueError(f"std_mode must be one of {STD_MODES}, got {std_mode!r}")
        self.std_mode = std_mode

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None:
            mean, var = x.mean(-1), x.var(-1)
        else:
            frames = mask.sum(-1)
            mean = (x * mask).sum(-1) / frames.clamp_min(1.0)
            var = ((x - mean.unsqueeze(-1)) ** 2 * mask).sum(-1) / (frames - 1).clamp_min(1.0)
        std = torch.sqrt(var + VAR_EPS) if self.std_mode == "sqrt_var_eps" else torch.sqrt(var)
        return torch.cat([mean, std], dim=1)

    def extra_repr(self) -> str:
        return f"std_mode={self.std_mode!r}"


class _ConvBN(nn.Module):
    """``linear`` (a convolution) then ``nonlinear`` (BN, optionally ReLU): the references' TDNN / dense layout."""

    def __init__(self, linear: nn.Conv1d, nonlinear: nn.Sequential) -> None:
        super().__init__()
        self.linear = linear
        self.nonlinear = nonlinear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nonlinear(self.linear(x))


class _Transit(nn.Module):
    """BN-ReLU then a 1x1 convolution halving the channels."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.nonlinear = _bn_relu(in_channels)
        self.linear = nn.Conv1d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.nonlinear(x))


class CAMPPlus(nn.Module):
    """CAM++ speaker embedding network; paper size (the defaults, 80 features): 7,176,224 parameters.

    ``growth_rate``, ``bn_size`` (bottleneck = ``bn_size * growth_rate``), ``init_channels`` and
    ``head_channels`` set the width, ``block_layers`` the depth of the three dense blocks (a smaller depth
    for CPU demos); ``std_mode`` the statistics pooling (see the module docstring).
    """

    def __init__(
        self,
        feat_dim: int = 80,
        embedding_dim: int = 512,
        growth_rate: int = 32,
        bn_size: int = 4,
        init_channels: int = 128,
        head_channels: int = 32,
        std_mode: str = "sqrt_var_eps",
        block_layers: tuple[int, ...] | list[int] = BLOCK_LAYERS,
    ) -> None:
        super().__init__()
        self.head = FrequencyHead(feat_dim, head_channels)
        tdnn = nn.Conv1d(self.head.out_channels, init_channels, 5, stride=2, padding=2, bias=False)
        self.xvector = nn.ModuleDict({"tdnn": _ConvBN(tdnn, _bn_relu(init_channels))})
        channels = init_channels
        if len(block_layers) != len(BLOCK_KERNELS):
            raise ValueError(f"block_layers must have {len(BLOCK_KERNELS)} entries, got {list(block_layers)}")
        for i, (layers, (kernel_size, dilation)) in enumerate(zip(block_layers, BLOCK_KERNELS), start=1):
            self.xvector[f"block{i}"] = DenseTDNNBlock(
                layers, channels, growth_rate, bn_size * growth_rate, kernel_size, dilation
            )
            channels += layers * growth_rate
            self.xvector[f"transit{i}"] = _Transit(channels, channels // 2)
            channels //= 2
        self.xvector["out_nonlinear"] = _bn_relu(channels)
        self.xvector["stats"] = StatsPool(std_mode)
        dense = nn.Conv1d(2 * channels, embedding_dim, 1, bias=False)
        self.xvector["dense"] = _ConvBN(
            dense, nn.Sequential(OrderedDict(batchnorm=nn.BatchNorm1d(embedding_dim, affine=False)))
        )
        for module in self.modules():
            if isinstance(module, nn.Conv1d):
                nn.init.kaiming_normal_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings ``[B, 1, D]`` of features ``[B, T, F]``; ``lengths``: relative lengths ``[B]`` or None."""
        x = self.head(features.transpose(1, 2))
        mask = None
        for name, layer in self.xvector.items():
            if name == "tdnn":
                x = layer(x)
                mask = _frame_mask(lengths, x.shape[-1], x)
            elif name.startswith("block"):
                x = layer(x, mask)
            elif name == "stats":
                x = layer(x, mask).unsqueeze(-1)
            else:
                x = layer(x)
        return x.transpose(1, 2)


def _frame_mask(lengths: torch.Tensor | None, frames: int, like: torch.Tensor) -> torch.Tensor | None:
    """``[B, 1, frames]`` float mask of the valid frames from relative lengths; None when there are none."""
    if lengths is None:
        return None
    valid = torch.round(lengths.to(like.dtype) * frames).clamp_min(1.0)
    return (torch.arange(frames, device=like.device, dtype=like.dtype) < valid.unsqueeze(1)).unsqueeze(1).to(like.dtype)
