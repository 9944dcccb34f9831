"""Progress of a fit on the terminal: a rich bar with the live batch loss and the last epoch's
metrics; on a non-terminal (a log file, CI, a batch job) one plain line per epoch instead."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

REFRESH_S = 0.25  # reading the loss syncs the GPU: do it a few times a second, not every step


def epoch_line(record: dict[str, Any], total: int, cycles: Sequence[Any] = ()) -> str:
    """One epoch's metrics. ``total`` counts the epochs of every phase (frozen + unfrozen), so
    ``--epochs-frozen 1 --epochs 6`` shows ``epoch 2/7``; given the run's ``cycles`` the line also says
    where the epoch is within its phase: ``epoch 2/7 (phase 2) unfrozen 1/6 · train_loss …``."""
    def fmt(key: str) -> str:
        value = record.get(key, math.nan)
        return "nan" if value is None or not math.isfinite(value) else f"{value:.4f}"

    within = _within_phase(record["epoch"], cycles)
    return (f"epoch {record['epoch']}/{total} (phase {record['phase']}){within} train_loss {fmt('train_loss')} "
            f"val_loss {fmt('val_loss')} accuracy {fmt('accuracy')} background {fmt('background_accuracy')} "
            f"cell {fmt('cell_accuracy')} dice {fmt('dice')} iou {fmt('iou')}")


def schedule_line(cycles: Sequence[Any], start_epoch: int = 0) -> str:
    """What the epoch count of the lines below adds up: ``7 epochs = phase 1: 1 with the encoder frozen
    (--epochs-frozen) + phase 2: 6 unfrozen (--epochs)``, and where a resumed fit starts."""
    parts = []
    for cycle in cycles:
        if cycle.phase == 1:
            parts.append(f"phase 1: {cycle.epochs} with the encoder frozen (--epochs-frozen)")
        elif cycle.phase == 2:
            parts.append(f"phase 2: {cycle.epochs} unfrozen (--epochs)")
        else:
            parts.append(f"phase {cycle.phase}: {cycle.epochs} unfrozen (--epochs raised on resume)")
    total = sum(c.epochs for c in cycles)
    line = f"{total} epoch{'s' if total != 1 else ''} = " + " + ".join(parts)
    return line + (f"; resuming after epoch {start_epoch}" if start_epoch else "")


def _within_phase(epoch: int, cycles: Sequence[Any]) -> str:
    """`` frozen 1/1 ·`` / `` unfrozen 3/6 ·``: the (1-based) ``epoch``'s place in its phase."""
    first = 1
    for cycle in cycles:
        if first <= epoch < first + cycle.epochs:
            return f" {'frozen' if cycle.frozen else 'unfrozen'} {epoch - first + 1}/{cycle.epochs} ·"
        first += cycle.epochs
    return ""


class ProgressCallback:
    """Engine callback; pass ``console`` to redirect (default: stderr)."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.progress: Progress | None = None
        self._last = 0.0

    def on_fit_start(self, session) -> None:
        self.cycles = list(session.cycles)
        self.total = sum(c.epochs for c in self.cycles)
        self.steps = len(session.train_source)
        header = schedule_line(self.cycles, session.start_epoch)
        if not self.console.is_terminal:
            print(header, file=self.console.file, flush=True)
            return
        self.console.print(header, highlight=False)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=self.console, transient=False,
        )
        self.progress.start()
        self.epochs_task = self.progress.add_task("epochs", total=self.total, completed=session.start_epoch, info="")
        self.batch_task = self.progress.add_task("batches", total=self.steps, info="")

    def on_train_batch_end(self, session, step: int, loss) -> None:
        if self.progress is None:
            return
        done = step % self.steps + 1
        now = time.monotonic()
        if now - self._last >= REFRESH_S or done == self.steps:
            self._last = now
            self.progress.update(self.batch_task, completed=done, info=f"loss {float(loss):.4f}")

    def on_epoch_end(self, session, epoch: int, metrics: dict[str, Any]) -> None:
        line = epoch_line(metrics, self.total, self.cycles)
        if self.progress is None:
            print(line, file=self.console.file, flush=True)
            return
        self.progress.console.print(line)
        self.progress.update(self.epochs_task, completed=epoch)
        self.progress.reset(self.batch_task, total=self.steps, info="")

    def on_fit_end(self, session, result) -> None:
        self._stop()

    def on_fit_error(self, session, exc: BaseException) -> None:
        self._stop()

    def _stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
