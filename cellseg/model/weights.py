"""Load a local encoder weights file (e.g. ImageNet resnet34) into a timm features_only encoder.

Never downloads. Accepts a plain state dict (timm or torchvision naming; classifier tensors are
ignored) saved by ``torch.save`` or as ``.safetensors`` (timm's cached hub files), or a checkpoint
holding one under ``state_dict``/``model``. An input convolution trained on
3 channels is adapted to the model's channel count.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from cellseg.errors import ConfigError


def adapt_first_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Cycle the source filters over ``in_channels`` inputs and rescale them (fold them when fewer).

    Either way the response to an input that is equal in every channel is kept (exactly when
    ``in_channels`` is a multiple of, or smaller than, the source count).
    """
    src = weight.shape[1]
    if in_channels < src:
        out = weight.new_zeros(weight.shape[0], in_channels, *weight.shape[2:])
        return out.index_add_(1, torch.arange(src) % in_channels, weight)
    return weight[:, torch.arange(in_channels) % src] * (src / in_channels)


def _key(name: str) -> str:
    # timm's feature wrappers rename top-level "stem.0" to "stem_0"; compare names modulo that.
    return name.replace("_", ".")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path, device="cpu")
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise ConfigError(f"encoder weights {path}: not a PyTorch weights file ({type(exc).__name__})") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"encoder weights {path}: does not hold a state dict of tensors")
    return obj


def load_encoder_weights(encoder: nn.Module, path: str | Path) -> None:
    """Copy every encoder tensor from ``path``; ConfigError (one line) if any is missing or misshapen."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"encoder weights {path}: file not found")
    source = {_key(k): v for k, v in _read_state_dict(path).items()}
    target = encoder.state_dict()
    first_conv = next(k for k, v in target.items() if v.ndim == 4)
    loaded, missing = {}, []
    for name, want in target.items():
        have = source.get(_key(name))
        if have is None:
            missing.append(name)
            continue
        if name == first_conv and have.ndim == 4 and have.shape[1] != want.shape[1]:
            have = adapt_first_conv(have, want.shape[1])
        if have.shape != want.shape:
            raise ConfigError(
                f"encoder weights {path}: {name} has shape {tuple(have.shape)}, the encoder needs {tuple(want.shape)}"
            )
        loaded[name] = have
    if missing:
        raise ConfigError(
            f"encoder weights {path}: lacks {len(missing)} of {len(target)} encoder tensors "
            f"(first: {missing[0]}); is it for this encoder?"
        )
    encoder.load_state_dict(loaded)
