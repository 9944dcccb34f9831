"""Options shared by every command that trains (train, lr-find, tune, compare, sweep-ce).

Each group of options is a dataclass whose fields carry their Typer declaration; ``with_options``
adds a group's options to a command and hands the command one object. So the five commands take
the same spellings, help and config mapping without repeating them::

    @app.command()
    @with_options(TrainingOptions, "options")
    def lr_find(options: TrainingOptions, out: Path = ...):
        config = options.load()
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from cellseg.config import Config, load_config
from cellseg.errors import ConfigError
from cellseg.resources import config_file

TRAINING = "Training"
TRACKING = "Tracking"


def _opt(*names: str, help: str, panel: str = TRAINING) -> typer.models.OptionInfo:  # noqa: A002
    return typer.Option(*names, help=help, rich_help_panel=panel, show_default=False)


@dataclass
class TrainingOptions:
    """Data, config file/profile and single-key overrides of the training configuration."""

    data: Annotated[Path | None, _opt("--data", help="Zarr store from `cellseg data ingest`.")] = None
    config: Annotated[Path | None, _opt("--config", help="YAML config merged over the defaults (a profile first).")] = None
    profile: Annotated[str | None, _opt("--profile", help="Named profile from configs/profiles: quick (CPU minutes, synthetic), paper, scratch (real images, random weights, CPU).")] = None
    strategy: Annotated[str | None, _opt("--strategy", help="Named loading-code strategy, e.g. fluorescence.")] = None
    codes: Annotated[str | None, _opt("--codes", help="Loading codes, e.g. 0,3,6 (instead of --strategy).")] = None
    size: Annotated[int | None, _opt("--size", help="Network input side in pixels (>= 32): the resized stack, "
                                                    "or the crop / sliding window.")] = None
    resize: Annotated[str | None, _opt("--resize", help="stack: whole stacks resized to --size (the paper's); "
                                                        "none: native pixels (x --scale), random crops.")] = None
    scale: Annotated[float | None, _opt("--scale", help="With --resize none: rescale every stack by this factor "
                                                        "(e.g. 0.5 shows the network twice the field of view).")] = None
    normalize: Annotated[str | None, _opt("--normalize", help="max (the paper's) or percentile (1st-99.8th, "
                                                              "clipped; robust to hot pixels).")] = None
    encoder_weights: Annotated[str | None, _opt("--encoder-weights", help="Encoder start: a timm pretrained tag "
                                                                         "(imagenet, a1_in1k, …) or a local "
                                                                         "weights file/folder; default random.")] = None
    epochs_frozen: Annotated[int | None, _opt("--epochs-frozen", help="Phase 1 epochs (encoder frozen).")] = None
    epochs: Annotated[int | None, _opt("--epochs", help="Phase 2 epochs (unfrozen); raise it with --resume to extend.")] = None
    batch_size: Annotated[int | None, _opt("--batch-size", help="Images per batch.")] = None
    lr: Annotated[float | None, _opt("--lr", help="Peak learning rate.")] = None
    ce_weights: Annotated[str | None, _opt("--ce-weights", help="Cross-entropy weight per class, e.g. 1,1.")] = None
    channel_dropout: Annotated[float | None, _opt("--channel-dropout", help="P(black) for codes >= 200.")] = None
    merge_dropout: Annotated[float | None, _opt("--merge-dropout", help="P(leave out) per merged channel.")] = None
    precise_bn: Annotated[bool | None, _opt("--precise-bn/--no-precise-bn",
                                            help="Re-estimate BatchNorm statistics over the training set before "
                                                 "each validation (short runs, small datasets).")] = None
    checkpoint_every: Annotated[int | None, _opt("--checkpoint-every", help="Write the resumable checkpoint every N "
                                                                          "epochs (and at the end of each phase).")] = None
    device: Annotated[str | None, _opt("--device", help="auto, cpu or cuda.")] = None
    seed: Annotated[int | None, _opt("--seed", help="Seed for split, weights, draws and augmentation.")] = None

    def overrides(self) -> dict[str, Any]:
        """Dotted config keys for the options given (None = not given)."""
        return {
            "data.store": self.data,
            "data.strategy": self.strategy,
            "data.codes": _parse_codes(self.codes) if self.codes is not None else None,
            "data.size": self.size,
            "data.resize": self.resize,
            "data.scale": self.scale,
            "data.normalize": self.normalize,
            "model.encoder_weights": self.encoder_weights,
            "data.channel_dropout": self.channel_dropout,
            "data.merge_dropout": self.merge_dropout,
            "train.epochs_frozen": self.epochs_frozen,
            "train.epochs": self.epochs,
            "train.batch_size": self.batch_size,
            "train.lr": self.lr,
            "train.ce_weights": _floats("--ce-weights", self.ce_weights) if self.ce_weights is not None else None,
            "train.precise_bn": self.precise_bn,
            "train.checkpoint_every": self.checkpoint_every,
            "train.device": self.device,
            "seed": self.seed,
        }

    def load(self, base: Path | None = None) -> Config:
        """Defaults < profile < ``base`` (a run's own config.yaml, on resume) < --config < options."""
        if base is not None and self.profile is not None:
            raise ConfigError("--profile cannot be combined with --resume (the run keeps its own config)")
        if self.strategy is not None and self.codes is not None:
            raise ConfigError(f"--strategy {self.strategy} and --codes {self.codes}: give one of them")
        files = [profile_path(self.profile)] if self.profile else []
        files += [p for p in (base, self.config) if p is not None]
        config = load_config(files, self.overrides())
        if self.strategy is not None and self.codes is None:
            config.data.codes = None  # a strategy given on the command line beats codes from a file
        elif self.codes is not None:
            config.data.strategy = None
        return config


@dataclass
class TrackingOptions:
    """Where runs are logged."""

    tracking_uri: Annotated[str | None, _opt("--tracking-uri", panel=TRACKING,
                                             help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db).")] = None
    experiment: Annotated[str | None, _opt("--experiment", panel=TRACKING, help="MLflow experiment name.")] = None

    def apply(self, config: Config) -> Config:
        """The config with these options recorded in its ``tracking`` section (so they are logged too)."""
        return config.with_overrides({"tracking.uri": self.tracking_uri, "tracking.experiment": self.experiment})


def profile_path(name: str) -> Path:
    path = config_file("profiles", f"{name}.yaml")
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ConfigError(f"--profile {name}: unknown profile (known: {', '.join(known)})")
    return path


def _parse_codes(text: str) -> list[int]:
    from cellseg.data.codes import parse_codes

    return parse_codes(text)


def _floats(option: str, text: str) -> list[float]:
    try:
        return [float(part) for part in text.replace(" ", "").split(",")]
    except ValueError:
        raise ConfigError(f"{option} '{text}': expected numbers separated by commas, e.g. 1,1") from None


def with_options(group: type, name: str):
    """Decorator: add the options of dataclass ``group`` to a Typer command as keyword ``name``."""
    hints = typing.get_type_hints(group, include_extras=True)
    fields = dataclasses.fields(group)
    added = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=hints[f.name], default=f.default)
             for f in fields]

    def decorate(command):
        signature = inspect.signature(command, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name != name]

        @functools.wraps(command)
        def wrapper(**kwargs):
            values = {f.name: kwargs.pop(f.name) for f in fields}
            return command(**kwargs, **{name: group(**values)})

        wrapper.__signature__ = signature.replace(parameters=[*own, *added])
        wrapper.__annotations__ = {p.name: p.annotation for p in wrapper.__signature__.parameters.values()}
        return wrapper

    return decorate
