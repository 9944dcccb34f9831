"""Progress of a fit on the terminal: a rich bar with the live batch loss and the last epoch's
metrics; on a non-terminal (a log file, CI, a batch job) one plain line per epoch instead."""

from __future__ import annotations

import math
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

REFRESH_S = 0.25  # reading the loss syncs the GPU: do it a few times a second, not every step


def epoch_line(record: dict[str, Any], total: int) -> str:
    def fmt(key: str) -> str:
        value = record.get(key, math.nan)
        return "nan" if value is None or not math.isfinite(value) else f"{value:.4f}"

    return (f"epoch {record['epoch']}/{total} (phase {record['phase']}) train_loss {fmt('train_loss')} "
            f"val_loss {fmt('val_loss')} accuracy {fmt('accuracy')} background {fmt('background_accuracy')} "
            f"cell {fmt('cell_accuracy')} dice {fmt('dice')} iou {fmt('iou')}")


class ProgressCallback:
    """Engine callback; pass ``console`` to redirect (default: stderr)."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.progress: Progress | None = None
        self._last = 0.0

    def on_fit_start(self, session) -> None:
        self.total = sum(c.epochs for c in session.cycles)
        self.steps = len(session.train_source)
        if not self.console.is_terminal:
            return
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
        line = epoch_line(metrics, self.total)
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
