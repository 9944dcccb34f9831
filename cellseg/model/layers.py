"""Decoder building blocks of the pixel-shuffle U-Net (fastai DynamicUnet topology).

Every decoder convolution has a bias and no BatchNorm (fastai's default ``norm_type=None``);
BatchNorm appears only on the encoder output and on each skip connection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvReLU(nn.Sequential):
    """3x3 (or ``kernel``) convolution with bias, then in-place ReLU."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 3):
        super().__init__(nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2), nn.ReLU(inplace=True))
        nn.init.kaiming_normal_(self[0].weight, nonlinearity="relu")
        nn.init.zeros_(self[0].bias)


def icnr_(weight: torch.Tensor, scale: int = 2) -> torch.Tensor:
    """ICNR initialisation (Aitken et al. 2017) of a conv feeding ``PixelShuffle(scale)``.

    The ``scale**2`` output channels that the shuffle places into one pixel block get the same
    kernel, so at initialisation the upsampler equals conv + nearest-neighbour upsampling and
    produces no checkerboard artefacts.
    """
    out_ch, in_ch, kh, kw = weight.shape
    sub = scale * scale
    if out_ch % sub:
        raise ValueError(f"ICNR: {out_ch} output channels are not a multiple of scale**2={sub}")
    base = torch.empty(out_ch // sub, in_ch, kh, kw, dtype=weight.dtype, device=weight.device)
    nn.init.kaiming_normal_(base, nonlinearity="relu")
    with torch.no_grad():
        # PixelShuffle maps channel c*sub + k to sub-pixel k of output channel c.
        weight.copy_(base.repeat_interleave(sub, dim=0))
    return weight


class PixelShuffleICNR(nn.Sequential):
    """Learned ``scale``x upsampling: 1x1 conv to ``out_ch * scale**2`` channels, ReLU, PixelShuffle."""

    def __init__(self, in_ch: int, out_ch: int | None = None, scale: int = 2):
        out_ch = in_ch if out_ch is None else out_ch
        super().__init__(
            nn.Conv2d(in_ch, out_ch * scale * scale, 1),
            nn.ReLU(inplace=True),
            nn.PixelShuffle(scale),
        )
        icnr_(self[0].weight, scale)
        nn.init.zeros_(self[0].bias)


def resize_to(x: torch.Tensor, size: torch.Size | tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize to ``size`` (a no-op when it already matches)."""
    if x.shape[-2:] == size:
        return x
    return F.interpolate(x, size=tuple(size), mode="nearest")


class UnetBlock(nn.Module):
    """Upsample ``x`` x2, join the batch-normalised skip, then two 3x3 conv+ReLU.

    Channels: ``up_ch // 2 + skip_ch`` after the concatenation; the convs keep that width, or halve
    it in the last block (``halve=True``), as fastai does.
    """

    def __init__(self, up_ch: int, skip_ch: int, halve: bool = False):
        super().__init__()
        self.shuf = PixelShuffleICNR(up_ch, up_ch // 2)
        self.bn = nn.BatchNorm2d(skip_ch)
        cat_ch = up_ch // 2 + skip_ch
        out_ch = cat_ch // 2 if halve else cat_ch
        self.conv1 = ConvReLU(cat_ch, out_ch)
        self.conv2 = ConvReLU(out_ch, out_ch)
        self.out_channels = out_ch

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = resize_to(self.shuf(x), skip.shape[-2:])
        # ReLU(cat(up, bn(skip))) == cat(up, ReLU(bn(skip))): ``up`` leaves a ReLU already.
        joined = torch.cat([up, F.relu(self.bn(skip), inplace=True)], dim=1)
        return self.conv2(self.conv1(joined))


class Bridge(nn.Sequential):
    """Middle of the U: BatchNorm + ReLU on the deepest features, then ``ch -> 2ch -> ch`` conv+ReLU."""

    def __init__(self, ch: int):
        super().__init__(nn.BatchNorm2d(ch), nn.ReLU(inplace=True), ConvReLU(ch, 2 * ch), ConvReLU(2 * ch, ch))


class ResBlock(nn.Module):
    """Residual block at full resolution: ``relu(x + conv(relu(conv(x))))`` with identity shortcut."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv1 = ConvReLU(ch, ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)
        nn.init.kaiming_normal_(self.conv2.weight, nonlinearity="relu")
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(self.conv1(x)).add_(x), inplace=True)
