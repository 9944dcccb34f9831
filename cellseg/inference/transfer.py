"""Apply a model to data with another channel layout (the paper's generalisation to ``external``).

A model's loading codes index the layout it was trained on; another layout numbers its channels
differently (``external``: cytoplasm, nucleus, a brightfield z-series). Mapping by index would feed
brightfield planes into an input trained on a membrane label without a word. So a model applies to
another layout only when each of its inputs can be built there *from channels of the same meaning*
(same kind, label, polarisation and focal plane; channels of kind ``other`` by name): ``map_codes``
translates every code into the target layout — a plain channel code, a black code, or a
user-definable code with the same operation over the mapped channels — or says, in one line, which
input has no counterpart (e.g. the trainer's ``fluorescence`` [0, 3, 6] on ``external``, which has
no membrane or mitochondria label). Evaluation itself is ``cellseg.inference.evaluate``, unchanged.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cellseg.data.codes import (
    DROPOUT_OFFSET,
    MAX_CHANNEL_CODE,
    ChannelRecipe,
    load_codebook,
    resolve_codes,
)
from cellseg.data.layouts import Channel, Layout
from cellseg.errors import ConfigError
from cellseg.fileio import read_json, write_text

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


def map_codes(codes: list[int], source: Layout, target: Layout) -> list[int]:
    """The model's ``codes`` (on ``source``) as codes on ``target`` building the same inputs from
    same-meaning channels; ``NotApplicable`` names the first input that has no counterpart."""
    counterpart = {}
    for index, channel in enumerate(target.channels):
        counterpart.setdefault(meaning(channel), index)
    plan = resolve_codes(list(codes), source, channel_dropout=0.0, merge_dropout=0.0)
    mapped = []
    for position, recipe in enumerate(plan.recipes):
        sources = []
        for c in recipe.sources:
            found = counterpart.get(meaning(source.channels[c]))
            if found is None:
                raise NotApplicable(
                    f"input {position} (code {recipe.code}) reads {_describe(source.channels[c])}, "
                    f"which layout '{target.name}' does not have"
                )
            sources.append(found)
        mapped.append(_target_code(recipe, tuple(sources), target))
    return mapped


def _target_code(recipe: ChannelRecipe, sources: tuple[int, ...], target: Layout) -> int:
    """A code on ``target`` doing ``recipe``'s operation over ``sources`` (channel dropout kept)."""
    dropout = recipe.code >= DROPOUT_OFFSET
    if recipe.op == "channel" and sources[0] <= MAX_CHANNEL_CODE:
        return sources[0] + (DROPOUT_OFFSET if dropout else 0)
    base = recipe.code - DROPOUT_OFFSET if dropout else recipe.code
    book = load_codebook()
    wanted = _shape(recipe, sources, book.get(base))
    for code, definition in sorted(book.items()):
        if definition.layouts is not None and target.name not in definition.layouts:
            continue
        try:
            candidate = resolve_codes([code], target, channel_dropout=0.0, merge_dropout=0.0).recipes[0]
        except ConfigError:
            continue
        if _shape(candidate, candidate.sources, definition) == wanted:
            return code + (DROPOUT_OFFSET if dropout else 0)
    raise NotApplicable(
        f"code {recipe.code} ({recipe.op} of {len(sources)} channel(s)) has no equivalent code for layout "
        f"'{target.name}' (define one in a codes file: see configs/codes.yaml)"
    )


def _shape(recipe: ChannelRecipe, sources: tuple[int, ...], definition) -> tuple[Any, ...]:
    """What a code does, for equality: operation, source set (order matters only for nothing here),
    and its own dropout settings."""
    settings = (definition.merge_dropout, definition.channel_dropout) if definition is not None else (False, False)
    return (recipe.op, tuple(sorted(sources)), settings)


def plan_transfer(metadata: dict[str, Any], target: Layout) -> Transfer:
    """The mapping of a model (its logged metadata) onto ``target``, or the reason there is none."""
    source = Layout.model_validate(metadata["layout"])
    codes = [int(c) for c in metadata["codes"]]
    try:
        mapped = map_codes(codes, source, target)
    except NotApplicable as exc:
        return Transfer(source.name, target.name, codes, None, str(exc))
    return Transfer(source.name, target.name, codes, mapped)


def retarget(trained, target: Layout, codes: list[int]):
    """The same network, described as reading ``codes`` of ``target``: what ``evaluate`` and ``predict``
    need to read a store of that layout."""
    metadata = {**trained.metadata, "layout": target.model_dump(mode="json"), "codes": list(codes)}
    return dataclasses.replace(trained, metadata=metadata)


def write_record(transfer: Transfer, out: str | Path, model: str) -> Path:
    record = {"model": model, "applicable": transfer.applicable, **dataclasses.asdict(transfer)}
    return write_text(Path(out) / RECORD_NAME, json.dumps(record, indent=2) + "\n")


def read_record(folder: str | Path) -> dict[str, Any] | None:
    return read_json(Path(folder) / RECORD_NAME)
