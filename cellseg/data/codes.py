"""Loading codes (the paper's labelling strategies are lists of them): how each model input channel is built from a hyper-labeled stack.

Codes 0–50 load that channel, 51–199 are defined declaratively in ``configs/codes.yaml`` (plus
user files named by ``CELLSEG_CODES``), and ``code + 200`` adds channel dropout to ``code``.
``resolve_codes`` checks a list of codes (or a strategy) against a layout once, before any
training, and returns a ``CodePlan``; ``CodePlan.apply`` then builds whole batches as tensor ops
on whatever device the data lives on, drawing all randomness from the generator it is given.
A plan keeps each code resolved as a ``CodeRecord`` (operation, channel indices and names,
dropout settings): a trained model stores these, and ``plan_from_records`` rebuilds its inputs from
them alone, whatever the codes files say later.

Every output channel is expressed the same way: a weighted sum of up to ``M`` gathered input
channels, with weights drawn per sample (one-hot for channel/random, ``keep/len`` for a merge,
all zero for black or a dropped channel). So the per-sample dataset, the resident batch path and
``codes render`` all share one definition, and a channel that is loaded is copied exactly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cellseg.data.intensity import apply_ranges, range_scale
from cellseg.data.layouts import Layout, load_layout
from cellseg.errors import ConfigError, validation_message
from cellseg.resources import config_file
from cellseg.yamlio import read_yaml

MAX_CHANNEL_CODE = 50
DROPOUT_OFFSET = 200
CODES_ENV = "CELLSEG_CODES"
STRATEGIES_ENV = "CELLSEG_STRATEGIES"
INDEXED_LAYOUT = "indexed"  # a store ingested without --layout accepts any code whose channels exist

Op = Literal["channel", "random", "merge", "black"]
Probability = bool | float  # True: the run's setting, False: never, a number: that fixed probability


def _check_probability(value: Probability) -> Probability:
    if not isinstance(value, bool) and not 0.0 <= value <= 1.0:
        raise ValueError("a probability must be true, false or a number in [0, 1]")
    return value


class CodeDef(BaseModel):
    """One user-definable loading code (an entry of codes.yaml)."""

    model_config = ConfigDict(extra="forbid")

    op: Op
    channels: list[int | str] = Field(default_factory=list)
    merge_dropout: Probability = False
    channel_dropout: Probability = False
    layouts: list[str] | None = None
    description: str = ""

    _probabilities = field_validator("merge_dropout", "channel_dropout")(_check_probability)

    @model_validator(mode="after")
    def _channels_fit_op(self) -> CodeDef:
        n = len(self.channels)
        if self.op == "black" and n:
            raise ValueError("a black code takes no channels")
        if self.op == "channel" and n != 1:
            raise ValueError("a channel code takes exactly one channel")
        if self.op in ("random", "merge") and n == 0:
            raise ValueError(f"a {self.op} code needs at least one channel")
        if self.op != "merge" and self.merge_dropout is not False:
            raise ValueError("merge_dropout applies to merge codes only")
        return self


class StrategyDef(BaseModel):
    """A named list of codes (an entry of strategies.yaml)."""

    model_config = ConfigDict(extra="forbid")

    codes: list[int] = Field(min_length=1)
    layouts: list[str] | None = None
    description: str = ""


def _env_paths(variable: str) -> list[Path]:
    return [Path(p) for p in os.environ.get(variable, "").split(os.pathsep) if p]


def _read_section(path: Path, section: str) -> dict:
    raw = read_yaml(path) or {}
    if not isinstance(raw, dict) or not isinstance(raw.get(section, {}), dict):
        raise ConfigError(f"{path}: expected a mapping '{section}:' of entries")
    return raw.get(section) or {}


def load_codebook(paths: list[Path] | None = None) -> dict[int, CodeDef]:
    """Codes 51–199: the shipped codes.yaml, then each user file (``CELLSEG_CODES`` by default)."""
    book: dict[int, CodeDef] = {}
    for path in [config_file("codes.yaml"), *(_env_paths(CODES_ENV) if paths is None else paths)]:
        for key, entry in _read_section(Path(path), "codes").items():
            if not isinstance(key, int) or not MAX_CHANNEL_CODE < key < DROPOUT_OFFSET:
                raise ConfigError(f"{path}: loading code '{key}' must be an integer in 51–199")
            try:
                book[key] = CodeDef.model_validate(entry)
            except ValidationError as exc:
                raise ConfigError(f"{path}: invalid loading code {key} ({validation_message(exc)})") from None
    return book


def load_strategy_defs(paths: list[Path] | None = None) -> dict[str, StrategyDef]:
    """Named strategies: the shipped strategies.yaml, then user files (``CELLSEG_STRATEGIES``)."""
    book: dict[str, StrategyDef] = {}
    for path in [config_file("strategies.yaml"), *(_env_paths(STRATEGIES_ENV) if paths is None else paths)]:
        for name, entry in _read_section(Path(path), "strategies").items():
            try:
                book[str(name)] = StrategyDef.model_validate(entry)
            except ValidationError as exc:
                raise ConfigError(f"{path}: invalid strategy '{name}' ({validation_message(exc)})") from None
    return book


def load_strategies() -> dict[str, list[int]]:
    return {name: s.codes for name, s in load_strategy_defs().items()}


def parse_codes(text: str) -> list[int]:
    """``"100,12,103"`` -> ``[100, 12, 103]``; ConfigError naming the text otherwise."""
    try:
        codes = [int(part) for part in text.replace(" ", "").split(",")]
    except ValueError:
        raise ConfigError(f"codes '{text}': expected integers separated by commas, e.g. 100,12,103") from None
    return codes


class CodeRecord(BaseModel):
    """One input channel's code resolved against the training layout, as a model records it: its
    inputs then never depend on the codes files of the shell that uses it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    code: int
    op: Op
    channels: tuple[int, ...] = ()  # stack channel indices in the layout
    channel_names: tuple[str, ...] = ()  # their names there
    merge_dropout: Probability = False  # as in codes.yaml: true = the run's setting
    channel_dropout: Probability = False  # the definition's own
    dropout_code: bool = False  # code >= 200: also black with the run's channel_dropout

    _probabilities = field_validator("merge_dropout", "channel_dropout")(_check_probability)

    @model_validator(mode="after")
    def _one_name_per_channel(self) -> CodeRecord:
        if len(self.channels) != len(self.channel_names):
            raise ValueError("channels and channel_names differ in length")
        return self


@dataclass(frozen=True)
class ChannelRecipe:
    """How one input channel is built: ``op`` over stack channels ``sources``."""

    code: int
    op: Op
    sources: tuple[int, ...]
    merge_p: float = 0.0
    drop_p: float = 0.0


@dataclass(frozen=True)
class CodePlan:
    """Codes checked against a layout: what to read from a stack and how to combine it."""

    records: tuple[CodeRecord, ...]
    recipes: tuple[ChannelRecipe, ...]
    layout: Layout
    strategy: str | None = None
    needed_channels: list[int] = field(init=False)

    def __post_init__(self) -> None:
        # An all-black plan still reads channel 0: it gives every path the image size for free.
        needed = sorted({c for r in self.recipes for c in r.sources}) or [0]
        object.__setattr__(self, "needed_channels", needed)

    @property
    def codes(self) -> list[int]:
        return [r.code for r in self.records]

    @property
    def in_channels(self) -> int:
        return len(self.records)

    @cached_property
    def _sources(self) -> list[np.ndarray]:
        """Each recipe's source channels as positions in ``needed_channels``."""
        local = {c: k for k, c in enumerate(self.needed_channels)}
        return [np.array([local[c] for c in r.sources], dtype=np.int64) for r in self.recipes]

    @cached_property
    def _slots(self) -> int:
        """M: the most source channels any one input channel sums over (a random pick counts 1)."""
        return max([len(r.sources) if r.op == "merge" else 1 for r in self.recipes])

    def describe(self) -> list[str]:
        """One line per input channel, in the layout's channel names."""
        names = self.layout.channel_names
        lines = []
        for r in self.recipes:
            text = r.op if r.op == "black" else f"{r.op} {', '.join(names[c] for c in r.sources)}"
            if r.merge_p:
                text += f" (merge dropout {r.merge_p:g})"
            if r.drop_p:
                text += f" (channel dropout {r.drop_p:g})"
            lines.append(f"{r.code}: {text}")
        return lines

    def uniforms(self, batch: int, generator: torch.Generator | None = None) -> np.ndarray:
        """All random numbers one draw needs, (B, J, M + 2), from one ``torch.rand`` of fixed shape.

        The fixed shape makes a sample's draw depend only on its generator, whatever its codes do.
        """
        device = generator.device if generator is not None else torch.device("cpu")
        shape = (batch, self.in_channels, self._slots + 2)
        return torch.rand(shape, generator=generator, device=device).cpu().numpy()

    def choices(self, u: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Uniforms -> positions in ``needed_channels`` (B, J, M) int64 and weights (B, J, M) float32."""
        batch, j_count, m_count = u.shape[0], self.in_channels, self._slots
        u_pick, u_drop, u_merge = u[..., 0], u[..., 1], u[..., 2:]
        index = np.zeros((batch, j_count, m_count), dtype=np.int64)
        weight = np.zeros((batch, j_count, m_count), dtype=np.float32)
        for j, (r, sources) in enumerate(zip(self.recipes, self._sources)):
            n = len(sources)
            if r.op == "channel":
                index[:, j, 0], weight[:, j, 0] = sources[0], 1.0
            elif r.op == "random":
                index[:, j, 0], weight[:, j, 0] = sources[np.minimum((u_pick[:, j] * n).astype(np.int64), n - 1)], 1.0
            elif r.op == "merge":
                index[:, j, :n] = sources
                weight[:, j, :n] = (u_merge[:, j, :n] >= r.merge_p) / np.float32(n)
            weight[:, j] *= u_drop[:, j, None] >= r.drop_p
        return torch.from_numpy(index), torch.from_numpy(weight)

    def draw(self, batch: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One random draw for ``batch`` samples: (index, weight) for ``combine``."""
        return self.choices(self.uniforms(batch, generator))

    @cached_property
    def _terms(self) -> list[int]:
        """How many gathered channels each input channel sums: all of a merge's, none for black, else 1."""
        return [len(r.sources) if r.op == "merge" else 0 if r.op == "black" else 1 for r in self.recipes]

    def combine(
        self,
        x: torch.Tensor,
        index: torch.Tensor,
        weight: torch.Tensor,
        ranges: torch.Tensor | None = None,
        clip: bool = True,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Drawn choices applied to channels ``x`` (N, K, H, W) -> (B, J, H, W) float32 on x's device.

        ``x`` holds normalised floats, or raw intensities (uint16) together with their intensity
        ``ranges`` (B, K, 2) (intensity.py): each plane a draw uses is then normalised as it is
        gathered, so planes no draw uses are never converted. ``clip`` False says the ranges hold every
        value from 0 (maxima): the division is then folded into the weights, one pass less per plane.
        ``rows`` (B,) picks the batch's samples from ``x`` (default: x is the batch).
        Input channel j = sum over its terms m of weight[b, j, m] · x[rows[b], index[b, j, m]].
        """
        n, k, h, w = x.shape
        device = x.device
        index, weight = index.to(device), weight.to(device, torch.float32)
        batch = index.shape[0]
        if ranges is not None:
            ranges = ranges.to(device, torch.float32).gather(1, index.flatten(1)[..., None].expand(-1, -1, 2))
            ranges = ranges.view(*index.shape, 2)
            if not clip:
                weight = weight * range_scale(ranges)
        rows = torch.arange(batch, device=device) if rows is None else rows.to(device)
        planes = x.reshape(n * k, h, w)
        first = rows * k
        out = torch.zeros(batch, self.in_channels, h, w, device=device)
        for j, terms in enumerate(self._terms):
            for m in range(terms):
                plane = planes.index_select(0, first + index[:, j, m])
                if ranges is not None and clip:
                    plane = apply_ranges(plane, ranges[:, j, m])
                out[:, j].addcmul_(plane.to(torch.float32), weight[:, j, m, None, None])
        return out

    def apply(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, len(needed_channels), H, W) normalised -> (B, in_channels, H, W), on x's device."""
        if x.ndim != 4 or x.shape[1] != len(self.needed_channels):
            raise ValueError(f"expected (B, {len(self.needed_channels)}, H, W), got {tuple(x.shape)}")
        return self.combine(x, *self.draw(x.shape[0], generator))


def _probability(setting: Probability, run_value: float) -> float:
    if setting is True:
        return run_value
    return 0.0 if setting is False else float(setting)


def _check_layout(kind: str, name: str | int, allowed: list[str] | None, layout: Layout) -> None:
    if allowed is not None and layout.name != INDEXED_LAYOUT and layout.name not in allowed:
        raise ConfigError(
            f"{kind} {name} is defined for layouts {', '.join(allowed)}, not for layout '{layout.name}'"
        )


def record_code(code: int, layout: Layout, book: dict[int, CodeDef]) -> CodeRecord:
    """``code`` resolved against ``layout`` with the definitions in ``book``; ConfigError names a bad code."""
    base = code - DROPOUT_OFFSET if DROPOUT_OFFSET <= code < 2 * DROPOUT_OFFSET else code
    if 0 <= base <= MAX_CHANNEL_CODE:
        definition = CodeDef(op="channel", channels=[base])
    elif base in book:
        definition = book[base]
    else:
        raise ConfigError(
            f"unknown loading code {code}: 0–50 load a channel, 51–199 must be defined in "
            f"{config_file('codes.yaml')} (or ${CODES_ENV}), 200+ is channel dropout of code − 200"
        )
    _check_layout("loading code", code, definition.layouts, layout)
    try:
        sources = tuple(layout.index_of(c) for c in definition.channels)
    except ConfigError as exc:
        raise ConfigError(f"loading code {code} cannot be used: {exc}") from None
    return CodeRecord(code=code, op=definition.op, channels=sources,
                      channel_names=tuple(layout.channel_names[c] for c in sources),
                      merge_dropout=definition.merge_dropout, channel_dropout=definition.channel_dropout,
                      dropout_code=base != code)


def record_codes(codes: list[int], layout: Layout) -> tuple[CodeRecord, ...]:
    """``codes`` resolved against ``layout`` with today's definitions (codes.yaml and ``CELLSEG_CODES``)."""
    book = load_codebook()
    return tuple(record_code(c, layout, book) for c in codes)


def load_records(raw: object, layout: Layout, source: str) -> tuple[CodeRecord, ...]:
    """A recorded recipe (``CodeRecord`` dumps) checked against ``layout``; ConfigError names ``source``."""
    if not isinstance(raw, list):
        raise ConfigError(f"{source}: input recipe is not a list of loading codes")
    try:
        records = tuple(CodeRecord.model_validate(entry) for entry in raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: invalid input recipe ({validation_message(exc)})") from None
    names = layout.channel_names
    for record in records:
        if any(not 0 <= c < len(names) or names[c] != n for c, n in zip(record.channels, record.channel_names)):
            raise ConfigError(f"{source}: input recipe of code {record.code} names channels "
                              f"{', '.join(record.channel_names)} that layout '{layout.name}' does not have there")
    return records


def _recipe(record: CodeRecord, channel_dropout: float, merge_dropout: float) -> ChannelRecipe:
    run_drop = channel_dropout if record.dropout_code else 0.0
    own_drop = _probability(record.channel_dropout, channel_dropout)
    return ChannelRecipe(
        code=record.code,
        op=record.op,
        sources=record.channels,
        merge_p=_probability(record.merge_dropout, merge_dropout),
        drop_p=1.0 - (1.0 - run_drop) * (1.0 - own_drop),
    )


def plan_from_records(
    records: tuple[CodeRecord, ...],
    layout: Layout,
    channel_dropout: float,
    merge_dropout: float,
    strategy: str | None = None,
) -> CodePlan:
    """The plan of resolved codes at the given run-level dropout (0 at inference)."""
    for name, p in (("channel_dropout", channel_dropout), ("merge_dropout", merge_dropout)):
        if not 0.0 <= p <= 1.0:
            raise ConfigError(f"{name} must be in [0, 1], got {p}")
    if not records:
        raise ConfigError("no loading codes given: a model needs at least one input channel")
    recipes = tuple(_recipe(r, channel_dropout, merge_dropout) for r in records)
    return CodePlan(records=tuple(records), recipes=recipes, layout=layout, strategy=strategy)


def resolve_codes(
    codes_or_strategy: str | list[int] | tuple[int, ...],
    layout: Layout | str,
    channel_dropout: float = 0.5,
    merge_dropout: float = 0.5,
) -> CodePlan:
    """Check codes (a list, ``"100,12,103"`` or a strategy name) against a layout; ConfigError names the bad code."""
    if isinstance(layout, str):
        layout = load_layout(layout)
    strategy = None
    if isinstance(codes_or_strategy, str):
        strategies = load_strategy_defs()
        if codes_or_strategy in strategies:
            strategy = codes_or_strategy
            _check_layout("strategy", strategy, strategies[strategy].layouts, layout)
            codes = list(strategies[strategy].codes)
        elif codes_or_strategy.replace(",", "").replace(" ", "").isdigit():
            codes = parse_codes(codes_or_strategy)
        else:
            raise ConfigError(
                f"unknown strategy '{codes_or_strategy}': use one of {', '.join(strategies)} or codes like 100,12,103"
            )
    else:
        codes = [int(c) for c in codes_or_strategy]
    return plan_from_records(record_codes(codes, layout), layout, channel_dropout, merge_dropout, strategy)
