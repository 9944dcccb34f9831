"""Our results beside the paper's (Cameron et al. 2021): tables, and the comparisons the report's sentences state.

Every claim the report makes is a value computed here: rank agreement of the strategy ordering,
pairs in or out of the paper's order (a pair whose difference is within the combined replicate sd
counts as a tie, not as evidence either way), the position of the CE-weight peak, whether accuracy
rises to it and falls after it, and the direction of the wrong-pixel trade-off.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from cellseg.data.layouts import Layout, load_layout
from cellseg.errors import CellsegError
from cellseg.inference.transfer import meaning
from cellseg.reports.results import Results

# The paper's validation pixel accuracy on the trainer dataset, by strategy, and peak accuracy by the
# relative cross-entropy weight (read here as the cell weight relative to background, our w).
PAPER_ACCURACY = {"fluorescence": 0.975, "membrane": 0.969, "cytoplasm": 0.968, "random": 0.951,
                  "brightfield": 0.933, "mitochondria": 0.921, "all_black": 0.81}
PAPER_CE_PEAK = {0.01: 0.887, 0.1: 0.945, 1.0: 0.968, 10.0: 0.944, 100.0: 0.836}
# The paper's protocol (datasets, training), to say how a run differs from it.
PAPER_TRAINING = {"size": 400, "epochs-frozen": 5, "epochs": 100, "batch-size": 4, "precise-bn": False}
PAPER_DATA = {"trainer": (275, 175), "test": (96, 60), "external": (264, 122)}
LEARNED_NOTHING = 0.05  # final cell accuracy below this: the model predicts (almost) only background
BASELINE_MARGIN = 0.001  # "above the all-background accuracy" means by more than this


def strategy_table(results: Results) -> pd.DataFrame | None:
    """One row per strategy compared (the paper's first, in its order): our mean ± sd beside the paper."""
    if results.compare is None:
        return None
    ours = results.compare.set_index("strategy")
    order = [s for s in PAPER_ACCURACY if s in ours.index] + [s for s in ours.index if s not in PAPER_ACCURACY]
    rows = []
    for strategy in order:
        row = ours.loc[strategy]
        paper = PAPER_ACCURACY.get(strategy, math.nan)
        rows.append({"strategy": strategy, "n": int(row["n"]), "accuracy": float(row["accuracy_mean"]),
                     "sd": float(row["accuracy_sd"]), "cell_accuracy": float(row["cell_accuracy_mean"]),
                     "background_accuracy": float(row["background_accuracy_mean"]), "paper": paper,
                     "difference": float(row["accuracy_mean"]) - paper})
    table = pd.DataFrame(rows)
    table["rank"] = table["accuracy"].rank(ascending=False, method="min")
    table["paper_rank"] = table["paper"].rank(ascending=False, method="min")
    table["learned"] = table["cell_accuracy"] >= LEARNED_NOTHING
    return table


def threshold_reach(qc: pd.DataFrame, layout, strategies: list[str]) -> dict[str, float]:
    """Per strategy, the best Otsu Dice among its input channels (a channel drawn from several sources
    counts as their mean; a black channel reaches 0): how far a plain threshold gets on what the
    model sees — a property of the data's rendering, not of the network."""
    from cellseg.data.codes import load_strategies, record_codes

    otsu = qc.set_index("channel")["otsu_dice"].fillna(0.0)
    known = load_strategies()
    reach = {}
    for strategy in strategies:
        if strategy not in known:
            continue
        per_input = [float(otsu.reindex(list(r.channel_names)).fillna(0.0).mean()) if r.channel_names else 0.0
                     for r in record_codes(known[strategy], layout)]
        reach[strategy] = max(per_input, default=0.0)
    return reach


@dataclass
class Ordering:
    """Pairs of the paper's strategies: in the paper's order, reversed, or within replicate noise."""

    strategies: list[str]
    tau: float  # Kendall's tau between our means and the paper's
    agree: list[tuple[str, str]] = field(default_factory=list)
    reversed: list[tuple[str, str, float]] = field(default_factory=list)  # (paper's better, worse, our diff)
    tied: list[tuple[str, str, float]] = field(default_factory=list)

    @property
    def pairs(self) -> int:
        return len(self.agree) + len(self.reversed) + len(self.tied)


def ordering(table: pd.DataFrame) -> Ordering | None:
    from scipy.stats import kendalltau

    common = table[table["paper"].notna()].set_index("strategy")
    if len(common) < 2:
        return None
    tau = kendalltau(common["accuracy"], common["paper"]).statistic
    result = Ordering(list(common.index), float(tau))
    for a, b in itertools.combinations(common.index, 2):
        better, worse = (a, b) if common.loc[a, "paper"] >= common.loc[b, "paper"] else (b, a)
        diff = common.loc[better, "accuracy"] - common.loc[worse, "accuracy"]
        noise = math.sqrt(_zero(common.loc[better, "sd"]) ** 2 + _zero(common.loc[worse, "sd"]) ** 2)
        if abs(diff) <= noise:
            result.tied.append((better, worse, float(diff)))
        elif diff > 0:
            result.agree.append((better, worse))
        else:
            result.reversed.append((better, worse, float(diff)))
    return result


def ce_table(results: Results) -> pd.DataFrame | None:
    """One row per swept weight: peak and final accuracy, wrong-pixel fractions, the paper's peak."""
    if results.sweep is None:
        return None
    table = results.sweep.sort_values("weight")[["weight", "peak_accuracy", "accuracy", "wrong_background",
                                                  "wrong_cell", "wrong_overall"]].reset_index(drop=True)
    table["paper"] = [PAPER_CE_PEAK.get(_weight_key(w), math.nan) for w in table["weight"]]
    return table


@dataclass
class CeShape:
    peak_weights: list[float]  # the weights whose accuracy is within PEAK_TOLERANCE of the best
    rises_then_falls: bool  # one peak inside the range: non-decreasing up to it, non-increasing after
    rho_wrong_cell: float  # Spearman: weight vs wrong cell pixels (the paper's trade-off: negative)
    rho_wrong_background: float  # weight vs wrong background pixels (positive)
    high_end_lower: bool | None  # accuracy at the highest weight below that at the lowest (paper: yes)


PEAK_TOLERANCE = 0.001  # accuracies this close count as the same peak (a plateau)


def ce_shape(table: pd.DataFrame, column: str = "peak_accuracy") -> CeShape | None:
    from scipy.stats import spearmanr

    values = table[column].tolist()
    if len(values) < 3 or any(not math.isfinite(v) for v in values):
        return None
    best = max(values)
    at_peak = [i for i, v in enumerate(values) if v >= best - PEAK_TOLERANCE]
    first, last = at_peak[0], at_peak[-1]
    inside = first > 0 and last < len(values) - 1
    rising = all(values[i] <= values[i + 1] for i in range(first))
    falling = all(values[i] >= values[i + 1] for i in range(last, len(values) - 1))
    return CeShape(
        peak_weights=[float(table["weight"].iloc[i]) for i in at_peak],
        rises_then_falls=inside and rising and falling,
        rho_wrong_cell=_spearman(spearmanr, table["weight"], table["wrong_cell"]),
        rho_wrong_background=_spearman(spearmanr, table["weight"], table["wrong_background"]),
        high_end_lower=values[-1] < values[0] if inside else None,
    )


def paper_ce_shape() -> CeShape:
    """The same measures for the paper's peak accuracies (it gives no wrong-pixel fractions: NaN)."""
    nan = [math.nan] * len(PAPER_CE_PEAK)
    return ce_shape(pd.DataFrame({"weight": list(PAPER_CE_PEAK), "peak_accuracy": list(PAPER_CE_PEAK.values()),
                                  "wrong_cell": nan, "wrong_background": nan}))


def generalisation_table(results: Results, test_layout: Layout | None,
                         baselines: dict[str, float | None]) -> pd.DataFrame | None:
    """One row per evaluated model: its trainer validation accuracy, test (as is) and external (mapped)."""
    if not results.generalisation:
        return None
    rows = []
    for model, scored in results.generalisation.items():
        test, external = scored.get("test"), scored.get("external")
        record = (external.transfer if external else None) or {}
        codes = record.get("source_codes")
        relabelled = _relabelled(codes, record.get("source_layout"), test_layout)
        rows.append({
            "model": model,
            "codes": codes,
            "trainer_val": _trainer_metric(results, model, "accuracy"),
            "trainer_cell_accuracy": _trainer_metric(results, model, "cell_accuracy"),
            "test": test.accuracy if test else math.nan,
            "test_cell_accuracy": _cell(test),
            "relabelled": relabelled,
            "external": external.accuracy if external and external.summary else math.nan,
            "external_cell_accuracy": _cell(external),
            "external_codes": record.get("target_codes"),
            "external_reason": record.get("reason"),
        })
    table = pd.DataFrame(rows)
    table["test_change"] = table["test"] - table["trainer_val"]
    table["learned"] = table["trainer_cell_accuracy"] >= LEARNED_NOTHING
    for name in ("test", "external"):
        floor = baselines.get(name)
        table[f"beats_{name}_baseline"] = table[name] > (math.nan if floor is None else floor + BASELINE_MARGIN)
    return table


def _trainer_metric(results: Results, model: str, key: str) -> float:
    """The model's final validation value of ``key`` on the trainer split it was trained with."""
    if model == "best" and results.best_history:
        value = results.best_history[-1].get(key)
        return float(value) if isinstance(value, (int, float)) else math.nan
    runs = results.compare_runs
    if runs is None or key not in runs:
        return math.nan
    mine = runs[(runs["strategy"] == model) & (runs["replicate"] == 1)].sort_values("epoch")
    return float(mine[key].iloc[-1]) if len(mine) else math.nan


def _relabelled(codes: list[int] | None, layout_name: str | None, test: Layout | None) -> list[str] | None:
    """Channels the model reads whose meaning differs in the test layout (there: cytoplasm -> ER)."""
    from cellseg.data.codes import resolve_codes

    if codes is None or layout_name is None or test is None:
        return None
    try:
        source = load_layout(layout_name)
        plan = resolve_codes(codes, source, channel_dropout=0.0, merge_dropout=0.0)
    except CellsegError:
        return None
    used = sorted({c for r in plan.recipes for c in r.sources})
    return [source.channels[c].name for c in used
            if c >= test.n_channels or meaning(source.channels[c]) != meaning(test.channels[c])]


def _cell(scored) -> float:
    if scored is None or scored.summary is None:
        return math.nan
    value = scored.summary.get("cell_accuracy")
    return float(value) if isinstance(value, (int, float)) else math.nan


def _zero(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else 0.0


def _spearman(spearmanr, x, y) -> float:
    if pd.Series(y).isna().any() or pd.Series(y).nunique() < 2:
        return math.nan
    return float(spearmanr(x, y).statistic)


def _weight_key(weight: float) -> float:
    """The paper's weight this one is (1e-2 == 0.01 despite float formatting)."""
    return next((w for w in PAPER_CE_PEAK if math.isclose(w, weight, rel_tol=1e-6)), weight)
