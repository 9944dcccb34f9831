"""Apply a model to data with another channel layout (the paper's generalisation to ``external``).

A model's loading codes index the layout it was trained on; another layout numbers its channels
differently (``external``: cytoplasm, nucleus, a brightfield z-series). Mapping by index would feed
brightfield planes into an input trained on a membrane label without a word. So a model applies to
another layout only when each of its inputs can be built there *from channels of the same meaning*
(same kind, label, polarisation and focal plane; channels of kind ``other`` by name): ``map_recipe``
moves every entry of the model's recorded input recipe (codes.py) onto the target layout — the same
operation and dropout over the mapped channels, so no codes file is consulted — or says, in one line,
which input has no counterpart (e.g. the trainer's ``fluorescence`` [0, 3, 6] on ``external``, which
has no membrane or mitochondria label). Evaluation itself is ``cellseg.inference.evaluate``, unchanged.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cellseg.data.codes import DROPOUT_OFFSET, MAX_CHANNEL_CODE, CodeRecord
from cellseg.data.layouts import Channel, Layout
from cellseg.errors import ConfigError
from cellseg.fileio import read_json, write_text
from cellseg.inference.predict import recorded_inputs

RECORD_NAME = "transfer.json"


class NotApplicable(ConfigError):
    """The model needs a channel the target layout does not have (the message says which)."""


@dataclass
class Transfer:
    source_layout: str
    target_layout: str
    source_codes: list[int]
    target_codes: list[int] | None  # None: not applicable
    reason: str | None = None  # why not applicable
    target_recipe: list[dict[str, Any]] | None = None  # the inputs built on the target (CodeRecord dumps)

    @property
    def applicable(self) -> bool:
        return self.target_codes is not None


def meaning(channel: Channel) -> tuple[Any, ...]:
    """What a channel shows, independent of its position and name (its name for kind ``other``)."""
    if channel.kind == "other":
        return ("other", channel.name)
    return (channel.kind, channel.label, channel.polarisation, channel.z_um)


def _describe(channel: Channel) -> str:
    parts = [channel.kind, channel.label, channel.polarisation,
             None if channel.z_um is None else f"z {channel.z_um:g} µm"]
    return f"{channel.name} ({', '.join(p for p in parts if p)})"


def map_recipe(records: tuple[CodeRecord, ...], source: Layout, target: Layout) -> tuple[CodeRecord, ...]:
    """The model's inputs (``records`` on ``source``) built on ``target`` from same-meaning channels;
    ``NotApplicable`` names the first input that has no counterpart."""
    counterpart = {}
    for index, channel in enumerate(target.channels):
        counterpart.setdefault(meaning(channel), index)
    mapped = []
    for position, record in enumerate(records):
        channels = []
        for c in record.channels:
            found = counterpart.get(meaning(source.channels[c]))
            if found is None:
                raise NotApplicable(
                    f"input {position} (code {record.code}) reads {_describe(source.channels[c])}, "
                    f"which layout '{target.name}' does not have"
                )
            channels.append(found)
        mapped.append(record.model_copy(update={
            "code": _target_code(record, channels),
            "channels": tuple(channels),
            "channel_names": tuple(target.channel_names[c] for c in channels),
        }))
    return tuple(mapped)


def _target_code(record: CodeRecord, channels: list[int]) -> int:
    """The input's code number on the target, a label only: a plain channel code names its new channel
    (plus 200 for dropout); any other keeps its number, its operation travelling in the recipe."""
    plain = record.op == "channel" and record.channel_dropout is False
    if plain and channels[0] <= MAX_CHANNEL_CODE:
        return channels[0] + (DROPOUT_OFFSET if record.dropout_code else 0)
    return record.code


def plan_transfer(metadata: dict[str, Any], target: Layout) -> Transfer:
    """The mapping of a model (its logged metadata) onto ``target``, or the reason there is none."""
    source = Layout.model_validate(metadata["layout"])
    records = recorded_inputs(metadata, source, f"model of layout '{source.name}'")
    codes = [r.code for r in records]
    try:
        mapped = map_recipe(records, source, target)
    except NotApplicable as exc:
        return Transfer(source.name, target.name, codes, None, str(exc))
    return Transfer(source.name, target.name, codes, [r.code for r in mapped],
                    target_recipe=[r.model_dump(mode="json") for r in mapped])


def retarget(trained, target: Layout, transfer: Transfer):
    """The same network, described as reading ``transfer``'s inputs of ``target``: what ``evaluate`` and
    ``predict`` need to read a store of that layout."""
    metadata = {**trained.metadata, "layout": target.model_dump(mode="json"), "codes": list(transfer.target_codes),
                "recipe": transfer.target_recipe}
    return dataclasses.replace(trained, metadata=metadata)


def write_record(transfer: Transfer, out: str | Path, model: str) -> Path:
    record = {"model": model, "applicable": transfer.applicable, **dataclasses.asdict(transfer)}
    return write_text(Path(out) / RECORD_NAME, json.dumps(record, indent=2) + "\n")


def read_record(folder: str | Path) -> dict[str, Any] | None:
    return read_json(Path(folder) / RECORD_NAME)
