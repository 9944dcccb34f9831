"""Progress of an experiment made of parts (the fits of tune, compare and sweep-ce; the sweeps of
lr-find): one line per finished part, always, and on a terminal a rich bar over the parts plus one
over the steps of the part in progress. It is also the engine callback moving that second bar over
a fit's epochs (one live display at a time: the fits get this, not the engine's per-fit
``ProgressCallback``)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class RunsProgress:
    """``with RunsProgress(total, "trials") as progress: fit(..., callbacks=[progress]); progress.done(line)``;
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
            self.parts_task = self.progress.add_task(self.what, total=self.total, info="")
            self.steps_task = self.progress.add_task("", total=None, info="")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def start_part(self, description: str, steps: int, completed: int = 0) -> None:
        """A part of ``steps`` steps begins (``completed`` of them done before, e.g. a resumed fit)."""
        if self.progress is not None:
            self.progress.reset(self.steps_task, total=steps, completed=completed, description=description, info="")

    def step(self, completed: int, info: str = "") -> None:
        if self.progress is not None:
            self.progress.update(self.steps_task, completed=completed, info=info)

    def done(self, line: str) -> None:
        """A part finished (or was pruned or failed): print its line and advance the bar."""
        if self.progress is None:
            if self.enabled:
                print(line, file=self.console.file, flush=True)
            return
        self.progress.console.print(line)
        self.progress.advance(self.parts_task)

    # engine callback: the steps of a fit are its epochs
    def on_fit_start(self, session) -> None:
        self.start_part(f"epochs ({session.run_dir.name})", sum(c.epochs for c in session.cycles),
                        session.start_epoch)

    def on_epoch_end(self, session, epoch: int, metrics: dict[str, Any]) -> None:
        self.step(epoch, f"val accuracy {metrics.get('accuracy', float('nan')):.4f}")
