"""The one typed configuration of a training run (and of everything built on the engine).

Defaults live in ``configs/default.yaml``; a user file (``--config``) is merged over them and CLI
options override single keys (``train.lr`` …). The resolved config is logged whole with every run,
and ``Config.to_yaml`` writes a file that ``--config`` accepts again.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cellseg.data.geometry import Geometry, Resize
from cellseg.data.intensity import Method, Normalisation
from cellseg.errors import ConfigError, validation_message
from cellseg.resources import config_file
from cellseg.yamlio import read_yaml


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def strategy_label(strategy: str | None) -> str:
    """A run's inputs in one word, for folders, run names, registry names and tables: the strategy's
    name, or ``custom`` when explicit codes replaced it."""
    return strategy or "custom"


class DataConfig(_Section):
    store: Path | None = Field(None, description="Zarr store written by `cellseg data ingest`.")
    strategy: str | None = Field("fluorescence", description="Named strategy (configs/strategies.yaml).")
    codes: list[int] | None = Field(None, description="Loading codes; override the strategy when set.")
    size: int = Field(400, ge=32, description="Network input side in pixels (the encoder needs >= 32): the "
                                              "resized stack, or the crop / sliding window.")
    resize: Resize = Field("none", description="stack: whole stacks resized to size (the paper's subimages); "
                                               "none: native pixels x scale, random crops of size.")
    keep_aspect: bool = Field(True, description="resize stack: keep the aspect ratio (zero-pad), else squash.")
    scale: float = Field(1.0, gt=0, description="resize none: rescale factor applied to every stack.")
    normalize: Method = Field("percentile", description="max: divide each channel by its maximum (the paper's); "
                                                        "percentile: map the percentiles to 0-1, clipped.")
    percentiles: tuple[float, float] = Field((1.0, 99.8), description="normalize percentile: (low, high).")
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    channel_dropout: float = Field(0.5, ge=0.0, le=1.0, description="P(black) for codes >= 200.")
    merge_dropout: float = Field(0.5, ge=0.0, le=1.0, description="P(leave out) per merged channel.")
    residency: Literal["auto", "ram", "device", "stream"] = Field(
        "auto", description="Hold the store in RAM / on the training device, or stream from Zarr."
    )
    num_workers: int = Field(0, ge=0, description="DataLoader workers for the streaming path.")

    @property
    def label(self) -> str:
        """``strategy_label`` of this run: explicit codes make it ``custom``."""
        return strategy_label(self.strategy if self.codes is None else None)

    @field_validator("percentiles")
    @classmethod
    def _ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 <= value[0] < value[1] <= 100.0:
            raise ValueError("percentiles must be (low, high) with 0 <= low < high <= 100")
        return value

    def geometry(self) -> Geometry:
        return Geometry(self.resize, self.size, self.scale, self.keep_aspect)

    def normalisation(self) -> Normalisation:
        return Normalisation(self.normalize, *self.percentiles)


class ModelConfig(_Section):
    encoder: str = "resnet34"
    encoder_weights: str | None = Field(
        None,
        description="null = random; a timm pretrained tag (imagenet = timm's default for the encoder, or e.g. "
        "a1_in1k; from timm's Hugging Face cache, downloaded when the hub is reachable); or a local weights "
        "file or folder (a value with '/' or a .pth/.pt/.bin/.safetensors suffix).",
    )
    num_classes: int = Field(2, ge=2)

    @field_validator("encoder_weights", mode="before")
    @classmethod
    def _path_as_text(cls, value: Any) -> Any:
        """Accept a ``Path`` (the field's former type) as its text; weights.py tells paths from tags."""
        return str(value) if isinstance(value, Path) else value


class AugmentConfig(_Section):
    enabled: bool = True
    hflip: float = Field(0.5, ge=0, le=1)
    vflip: float = Field(0.5, ge=0, le=1)
    rot90: float = Field(0.5, ge=0, le=1, description="P(rotate by a random multiple of 90 degrees).")
    affine: float = Field(0.5, ge=0, le=1)
    degrees: float = 10.0
    scale: tuple[float, float] = (0.9, 1.1)
    shear: float = 5.0
    crop_scale: tuple[float, float] = Field((0.75, 1.0), description="Random resized crop area range.")
    lighting: float = Field(0.5, ge=0, le=1)
    brightness: float = 0.1
    contrast: float = 0.1
    gamma: tuple[float, float] = (0.9, 1.1)
    noise: float = Field(0.2, ge=0, le=1)
    noise_std: float = 0.01
    blur: float = Field(0.1, ge=0, le=1)
    blur_sigma: tuple[float, float] = (0.1, 1.0)


class TrainConfig(_Section):
    epochs_frozen: int = Field(5, ge=0, description="Phase 1: encoder frozen, one-cycle.")
    epochs: int = Field(100, ge=0, description="Phase 2: unfrozen, one-cycle, discriminative LRs.")
    batch_size: int = Field(4, gt=0)
    lr: float = Field(1e-3, gt=0)
    lr_div_first: float = Field(100.0, gt=0, description="Phase 2: first layers train at lr / this.")
    lr_div_head: float = Field(2.0, gt=0, description="Phase 2: head trains at lr / this.")
    weight_decay: float = Field(1e-2, ge=0)
    ce_weights: list[float] = Field([1.0, 1.0], description="Cross-entropy weight per class.")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    checkpoint_every: int = Field(1, ge=1)
    instance_metrics_every: int = Field(1, ge=1, description="val_ap_50 every N epochs and at each phase's end "
                                                             "(stores with true cells: a whole-image inference "
                                                             "per validation stack).")
    precise_bn: bool = Field(False, description="Before each validation, BatchNorm statistics re-estimated "
                                                "over the epoch's training batches (short runs, small data).")

    @field_validator("ce_weights")
    @classmethod
    def _positive(cls, weights: list[float]) -> list[float]:
        if any(w <= 0 for w in weights):
            raise ValueError("cross-entropy weights must be positive")
        return weights


class TrackingConfig(_Section):
    uri: str | None = Field(None, description="MLflow tracking URI; default sqlite:///mlflow.db.")
    experiment: str = "cellseg"
    register_as: str | None = Field(None, description="Registered model name; default from strategy.")


class Config(_Section):
    seed: int = 0
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    augment: AugmentConfig = AugmentConfig()
    tracking: TrackingConfig = TrackingConfig()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """Dotted keys (``train.lr``) for MLflow params."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for key, sub in value.items():
                    walk(f"{prefix}.{key}" if prefix else key, sub)
            else:
                out[prefix] = value

        walk("", self.to_dict())
        return out

    def with_overrides(self, overrides: dict[str, Any]) -> Config:
        """A copy with dotted keys replaced (None values are ignored: "option not given")."""
        return _validate(_merge(self.to_dict(), _nest(overrides)), "overrides")


def _nest(dotted: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in dotted.items():
        if value is None:
            continue
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _validate(raw: dict[str, Any], source: str) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: invalid value ({validation_message(exc)})") from None


def default_config_path() -> Path:
    return config_file("default.yaml")


def load_config(
    path: str | Path | Sequence[str | Path] | None = None, overrides: dict[str, Any] | None = None
) -> Config:
    """Defaults, then the user's YAML file(s) in order (e.g. a profile, then --config), then dotted-key overrides."""
    raw = read_yaml(default_config_path()) or {}
    source = str(default_config_path())
    paths = [] if path is None else [path] if isinstance(path, (str, Path)) else list(path)
    for path in paths:
        user = read_yaml(path)
        if user is None:
            user = {}
        if not isinstance(user, dict):
            raise ConfigError(f"{path}: a config file must be a mapping of sections (data, train, …)")
        raw = _merge(raw, user)
        source = str(path)
    config = _validate(raw, source)
    return config.with_overrides(overrides or {}) if overrides else config
