"""The paper's U-Net: a timm encoder and a pixel-shuffle decoder wired like fastai's DynamicUnet.

The decoder is derived from the encoder's ``feature_info`` (channels per stage), so any timm
``features_only`` encoder works; with resnet34, 3 inputs and 2 classes the network has the same
layers and parameter count as ``fastai.vision.learner.unet_learner(resnet34, n_out=2)``.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn

from cellseg.errors import ConfigError
from cellseg.model.layers import Bridge, PixelShuffleICNR, ResBlock, UnetBlock, resize_to
from cellseg.model.weights import create_encoder


class UNet(nn.Module):
    """Encoder -> bridge -> one UnetBlock per skip -> upsample to input size -> last cross -> head."""

    def __init__(self, encoder: nn.Module, in_channels: int, num_classes: int):
        super().__init__()
        self.encoder = encoder
        channels = list(encoder.feature_info.channels())
        reductions = list(encoder.feature_info.reduction())
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.bridge = Bridge(channels[-1])
        width = channels[-1]
        skips = channels[-2::-1]
        blocks = []
        for i, skip_ch in enumerate(skips):
            block = UnetBlock(width, skip_ch, halve=i == len(skips) - 1)
            blocks.append(block)
            width = block.out_channels
        self.blocks = nn.ModuleList(blocks)
        # The shallowest skip is usually at 1/2 resolution: one more x2 pixel shuffle (any remaining
        # mismatch, e.g. an encoder whose first feature is at 1/4, is closed by a nearest resize).
        self.final_up = PixelShuffleICNR(width) if reductions[0] > 1 else nn.Identity()
        width += in_channels  # last cross: the raw input joins at full resolution
        self.tail = ResBlock(width)
        self.head = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.encoder(x)
        y = self.bridge(features[-1])
        for block, skip in zip(self.blocks, reversed(features[:-1])):
            y = block(y, skip)
        y = resize_to(self.final_up(y), x.shape[-2:])
        y = torch.cat([y, x], dim=1)
        return self.head(self.tail(y))

    def param_groups(self) -> list[list[nn.Parameter]]:
        """Three groups for discriminative learning rates: encoder early, encoder late, decoder+head.

        The encoder is cut after its middle feature stage (resnet: stem..layer2 | layer3..layer4,
        as fastai splits resnets).
        """
        names = self.encoder.feature_info.module_name()
        cut = names[len(names) // 2]
        prefixes = (cut + ".", cut.replace(".", "_") + ".")
        params = list(self.encoder.named_parameters())
        last_early = max(i for i, (n, _) in enumerate(params) if n.startswith(prefixes))
        encoder_ids = {id(p) for _, p in params}
        early = [p for _, p in params[: last_early + 1]]
        late = [p for _, p in params[last_early + 1 :]]
        rest = [p for p in self.parameters() if id(p) not in encoder_ids]
        return [early, late, rest]


def build_model(
    encoder: str = "resnet34",
    in_channels: int = 3,
    num_classes: int = 2,
    encoder_weights: str | Path | None = None,
) -> UNet:
    """The U-Net on a timm ``encoder``: random, or ``encoder_weights`` (a timm tag or a local file, see weights.py)."""
    if in_channels < 1 or num_classes < 1:
        raise ConfigError(f"model: in_channels={in_channels} and num_classes={num_classes} must be >= 1")
    if not timm.is_model(encoder):
        raise ConfigError(f"model.encoder: unknown timm model {encoder!r}")
    return UNet(create_encoder(encoder, in_channels, encoder_weights), in_channels, num_classes)
