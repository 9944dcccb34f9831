"""The timm ``features_only`` encoder, with random weights, timm's pretrained weights or a local file.

``model.encoder_weights`` is ``None`` (random), a timm pretrained tag (``imagenet`` = timm's default
tag for the encoder, or an explicit one such as ``a1_in1k``), or a local weights file or folder.
Every case loads through timm's own ``create_model(pretrained=True)``, so the classifier is dropped and
the input convolution is adapted to any channel count exactly as timm does it (``adapt_input_conv``).
Tags use timm's Hugging Face hub cache; when the weights are not cached and the hub cannot be
reached, the error is one line saying what to do, quickly, never a traceback or random weights.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from urllib.error import URLError
from urllib.parse import urlsplit

import timm
import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled
from timm.models import get_pretrained_cfg, load_state_dict
from torch import nn

from cellseg.errors import ConfigError

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
_HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # what a timm/HF hub folder holds


def weights_path(value: str | os.PathLike) -> Path | None:
    """The local file or folder ``value`` names, or None when it is a timm pretrained tag.

    A path is an existing one, a ``Path``, or a string with a '/' or a weights suffix (a missing one is
    'file not found', not an unknown tag); anything else (``imagenet``, ``a1_in1k``) is a tag.
    """
    text = os.fspath(value)
    path = Path(text).expanduser()
    if not (isinstance(value, os.PathLike) or path.exists() or "/" in text or text.endswith(WEIGHT_SUFFIXES)):
        return None
    if not path.exists():
        raise ConfigError(f"model.encoder_weights {text}: file not found")
    return path


def pretrained_name(encoder: str, tag: str) -> str:
    """timm's ``encoder.tag`` for ``tag``; ``imagenet`` means timm's default pretrained tag of the encoder."""
    tags = [name.partition(".")[2] for name in timm.list_pretrained(f"{encoder}.*")]
    if not tags:
        raise ConfigError(f"model.encoder_weights {tag}: timm has no pretrained weights for {encoder}")
    if tag == "imagenet":
        tag = get_pretrained_cfg(encoder).tag
    if tag not in tags:
        more = ", ..." if len(tags) > 6 else ""
        raise ConfigError(
            f"model.encoder_weights {tag}: not a pretrained tag of {encoder} (timm has {', '.join(tags[:6])}{more}; "
            "'imagenet' picks its default), nor an existing file"
        )
    return f"{encoder}.{tag}"


def describe_encoder_weights(encoder: str, encoder_weights: str | os.PathLike | None) -> str:
    """What initialised the encoder, for a run's metadata: 'random', 'timm resnet34.a1_in1k' or 'file /abs/w.pth'."""
    if encoder_weights is None:
        return "random"
    path = weights_path(encoder_weights)
    if path is None:
        return f"timm {pretrained_name(encoder, os.fspath(encoder_weights))}"
    return f"file {_weights_file(path).resolve()}"


def create_encoder(encoder: str, in_channels: int, encoder_weights: str | os.PathLike | None = None) -> nn.Module:
    """The timm ``features_only`` encoder for ``in_channels`` inputs, initialised as ``encoder_weights`` says."""
    if encoder_weights is None:
        return _create(encoder, in_channels)
    path = weights_path(encoder_weights)
    if path is None:
        value = os.fspath(encoder_weights)
        return _from_hub(pretrained_name(encoder, value), in_channels, value)
    return _from_file(encoder, _weights_file(path), in_channels)


def _create(name: str, in_channels: int, source: str = "", **pretrained) -> nn.Module:
    """``timm.create_model``; a checkpoint that does not fit the model, or no features_only form, is one line."""
    try:
        return timm.create_model(name, features_only=True, in_chans=in_channels, **pretrained)
    except (RuntimeError, ValueError, TypeError, AttributeError) as exc:
        text = str(exc).strip()
        if pretrained and ("state_dict" in text or text.startswith("Pretrained")):
            # torch: "Error(s) in loading state_dict for ResNet:\n\tsize mismatch for ...": keep the first detail
            detail = (text.splitlines()[1:] or [text])[0].strip()
            raise ConfigError(f"model.encoder_weights {source}: {detail} (is it for {name}?)") from None
        raise ConfigError(f"model.encoder: {name!r} has no features_only form ({exc})") from None


def _weights_file(path: Path) -> Path:
    """``path`` itself, or in a folder its ``model.safetensors``/``pytorch_model.bin`` or its one weights file."""
    if not path.is_dir():
        return path
    for name in _HUB_FILES:
        if (path / name).is_file():
            return path / name
    found = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if len(found) != 1:
        raise ConfigError(
            f"model.encoder_weights {path}: a weights folder needs {' or '.join(_HUB_FILES)} or exactly one "
            f"{'/'.join(WEIGHT_SUFFIXES)} file ({len(found)} found)"
        )
    return found[0]


def _key(name: str) -> str:
    # timm's feature wrappers rename top-level "stem.0" to "stem_0"; compare names modulo that.
    return name.replace("_", ".")


def _from_file(encoder: str, path: Path, in_channels: int) -> nn.Module:
    """A local state dict in timm's (or torchvision's, for resnets) naming, loaded by timm.

    timm's ``load_state_dict`` reads ``torch.save`` files and ``.safetensors`` and unwraps checkpoints
    (``state_dict``/``model``/EMA, DDP prefixes). timm loads non-strictly once it drops the classifier,
    so tensors the file lacks are checked here: a file for another encoder must not leave random ones.
    """
    try:
        state = load_state_dict(str(path))
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise ConfigError(f"model.encoder_weights {path}: not a PyTorch weights file ({type(exc).__name__})") from None
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"model.encoder_weights {path}: does not hold a state dict of tensors")
    enc = _create(encoder, in_channels, str(path), pretrained=True, pretrained_cfg_overlay={"state_dict": state})
    have = {_key(k) for k in state}
    target = list(enc.state_dict())
    missing = [k for k in target if _key(k) not in have]
    if missing:
        raise ConfigError(
            f"model.encoder_weights {path}: lacks {len(missing)} of {len(target)} encoder tensors "
            f"(first: {missing[0]}); is it for {encoder}?"
        )
    return enc


@contextmanager
def _hub_cache_only():
    """``HF_HUB_OFFLINE=1`` for this block (huggingface_hub reads the variable once, at import)."""
    saved = hf_constants.HF_HUB_OFFLINE
    hf_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hf_constants.HF_HUB_OFFLINE = saved


def _reachable(url: str) -> bool:
    """One HEAD request through huggingface_hub's client (its proxies, offline switch), without retries.

    Asking huggingface_hub directly when the hub is unreachable and nothing is cached takes about 50 s
    (measured): it retries each lookup 5 times with backoff, and timm looks up two file names. A hub
    that never answers costs the timeout here: 5 s, or ``HF_HUB_ETAG_TIMEOUT`` when that is set.
    """
    from huggingface_hub.utils import get_session

    timeout = hf_constants.HF_HUB_ETAG_TIMEOUT if "HF_HUB_ETAG_TIMEOUT" in os.environ else 5
    try:  # a server error (5xx, e.g. a proxy's 502) is one huggingface_hub would retry for as long
        return get_session().head(url, timeout=timeout).status_code < 500
    except Exception:  # noqa: BLE001 - any failure means: no usable connection
        return False


def _from_hub(name: str, in_channels: int, value: str) -> nn.Module:
    """timm's pretrained ``name``: from the local cache without touching the network, else downloaded into it."""
    cfg = get_pretrained_cfg(name)
    try:
        with _hub_cache_only():
            return _create(name, in_channels, value, pretrained=True)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, URLError):
        pass  # not cached (URLError: the few timm weights hosted at a plain URL, in torch's hub cache)
    source = hf_constants.ENDPOINT if cfg.hf_hub_id else cfg.url
    offline = hf_constants.is_offline_mode()
    if offline or not _reachable(source):
        cache = hf_constants.HF_HUB_CACHE if cfg.hf_hub_id else os.path.join(torch.hub.get_dir(), "checkpoints")
        why = "HF_HUB_OFFLINE is set" if offline else f"{urlsplit(source).netloc} cannot be reached"
        raise ConfigError(
            f"model.encoder_weights {value}: {cfg.architecture}'s pretrained weights (timm {name}) are not in the "
            f"local cache ({cache}) and {why}; run once on a machine with network access, copy the cache, "
            "or pass a local weights file"
        )
    try:
        return _create(name, in_channels, value, pretrained=True)
    except OSError as exc:  # the download broke off, the disk is full, ...
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"model.encoder_weights {value}: downloading timm {name} failed ({detail})") from None
