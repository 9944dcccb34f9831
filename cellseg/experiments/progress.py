"""Progress of an experiment made of many fits (tune trials, compare runs): one line per finished
fit, always, and on a terminal a rich bar over the fits plus one over the epochs of the fit in
progress. (One live display at a time: the fits themselves get ``epochs()``, not the engine's
per-fit ``ProgressCallback``.)"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class RunsProgress:
    """``with RunsProgress(total, "trials") as progress: fit(..., callbacks=[progress.epochs()]); progress.done(line)``;
    ``enabled=False`` shows nothing (a notebook or test that wants silence)."""

    def __init__(self, total: int, what: str, console: Console | None = None, enabled: bool = True):
        self.total, self.what, self.enabled = total, what, enabled
        self.console = console or Console(stderr=True)
        self.progress: Progress | None = None

    def __enter__(self) -> RunsProgress:
        if self.enabled and self.console.is_terminal:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=self.console,
            )
            self.progress.start()
            self.runs_task = self.progress.add_task(self.what, total=self.total, info="")
            self.epochs_task = self.progress.add_task("epochs", total=None, info="")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def done(self, line: str) -> None:
        """A fit finished (or was pruned or failed): print its line and advance the bar."""
        if self.progress is None:
            if self.enabled:
                print(line, file=self.console.file, flush=True)
            return
        self.progress.console.print(line)
        self.progress.advance(self.runs_task)

    def epochs(self) -> _EpochsCallback:
        """Engine callback moving the epoch bar of the fit in progress."""
        return _EpochsCallback(self)


class _EpochsCallback:
    def __init__(self, owner: RunsProgress):
        self.owner = owner

    def on_fit_start(self, session) -> None:
        if self.owner.progress is not None:
            total = sum(c.epochs for c in session.cycles)
            self.owner.progress.reset(self.owner.epochs_task, total=total, completed=session.start_epoch,
                                      description=f"epochs ({session.run_dir.name})", info="")

    def on_epoch_end(self, session, epoch: int, metrics: dict[str, Any]) -> None:
        if self.owner.progress is not None:
            self.owner.progress.update(self.owner.epochs_task, completed=epoch,
                                       info=f"val accuracy {metrics.get('accuracy', float('nan')):.4f}")
