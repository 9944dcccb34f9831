"""Layouts: the channel map of a hyper-labeled stack (which label or focal plane each channel is).

Layouts are data, one YAML file each (``configs/layouts/*.yaml``); a user passes a layout name or
the path of their own YAML file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from cellseg.errors import ConfigError, validation_message
from cellseg.resources import config_file
from cellseg.yamlio import read_yaml


class Channel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    kind: Literal["fluorescence", "brightfield", "other"] = "other"
    label: str | None = None
    polarisation: Literal["total", "parallel", "perpendicular"] | None = None
    z_um: float | None = None


class Layout(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    channels: list[Channel]

    @field_validator("channels")
    @classmethod
    def _unique_names(cls, channels: list[Channel]) -> list[Channel]:
        names = [c.name for c in channels]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate channel names {dupes}")
        if not channels:
            raise ValueError("a layout needs at least one channel")
        return channels

    @property
    def channel_names(self) -> list[str]:
        return [c.name for c in self.channels]

    @property
    def n_channels(self) -> int:
        return len(self.channels)

    def index_of(self, channel: int | str) -> int:
        """Resolve a channel given by index or by name; raises ConfigError if absent."""
        if isinstance(channel, int):
            if 0 <= channel < self.n_channels:
                return channel
            raise ConfigError(f"layout '{self.name}' has no channel {channel} (it has {self.n_channels})")
        try:
            return self.channel_names.index(channel)
        except ValueError:
            raise ConfigError(f"layout '{self.name}' has no channel named '{channel}'") from None


def indexed_layout(n_channels: int) -> Layout:
    """The layout used when none is given: channels named by their index."""
    return Layout(name="indexed", channels=[Channel(name=str(i)) for i in range(n_channels)])


def builtin_layouts() -> list[str]:
    return sorted(p.stem for p in config_file("layouts").glob("*.yaml"))


def load_layout(name_or_path: str | Path) -> Layout:
    """A built-in layout by name (``trainer``, ``test``, ``external``) or a layout YAML file."""
    candidate = Path(name_or_path)
    if candidate.suffix in {".yaml", ".yml"} or candidate.is_file():
        path = candidate
    else:
        path = config_file("layouts", f"{name_or_path}.yaml")
        if not path.exists():
            raise ConfigError(
                f"unknown layout '{name_or_path}': use one of {', '.join(builtin_layouts())} or a YAML file"
            )
    raw = read_yaml(path)
    try:
        return Layout.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: invalid layout ({validation_message(exc)})") from None
