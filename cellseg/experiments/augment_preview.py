"""The transformation explorer: a grid of the augmented training samples the model would be shown.

The samples come from the engine itself — ``TrainingSession.train_batches``, i.e. the training
split's batch source (loading codes drawn as in training) followed by the engine's augmentation —
for the same config and seed that ``cellseg train`` would use, so what is drawn is what a run sees
in its first epochs. The true mask's outline is drawn on each sample (green), after the same
geometric transform, so a misaligned mask would show.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cellseg.config import Config, strategy_label
from cellseg.engine.session import TrainingSession
from cellseg.errors import ConfigError


@dataclass
class AugmentPreview:
    png: Path
    images: list[np.ndarray]  # uint8 RGB (size, size, 3) with the mask outline
    titles: list[str]
    run_id: str | None = None


def augmented_samples(session: TrainingSession, n: int) -> tuple[list[np.ndarray], list[str]]:
    """``n`` overlays (input as RGB, mask outline) from the session's first training epochs."""
    from cellseg.visualize import overlay

    if len(session.train_source) == 0:
        raise ConfigError(f"{session.config.data.store}: fewer training stacks than one batch "
                          f"(--batch-size {session.config.train.batch_size})")
    images, titles = [], []
    epoch = 0
    while len(images) < n:
        for batch, (x, y) in enumerate(session.train_batches(epoch)):
            for i in range(len(x)):
                if len(images) == n:
                    return images, titles
                images.append(overlay(x[i], None, y[i]))
                titles.append(f"epoch {epoch + 1} · batch {batch + 1} · #{i + 1}")
        epoch += 1
    return images, titles


def augment_preview(config: Config, out: str | Path, n: int = 16, columns: int | None = None,
                    track: bool = True) -> AugmentPreview:
    """Write the grid of ``n`` augmented samples to ``out`` (PNG) and log it to MLflow."""
    from cellseg.plots import image_grid, save_figure

    if n < 1:
        raise ConfigError(f"--n {n}: need at least one sample")
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ConfigError(f"--out {out}: the grid is written as a PNG file (name it *.png)")
    session = TrainingSession(config, out.parent)
    images, titles = augmented_samples(session, n)
    columns = columns or math.ceil(math.sqrt(n))
    fig = image_grid(images, titles, columns=columns)
    what = "augmentation on" if config.augment.enabled else "augmentation OFF (augment.enabled: false)"
    fig.suptitle(f"{strategy_label(session.plan.strategy)} · codes {','.join(map(str, session.plan.codes))} · "
                 f"{config.data.size} px · {what}", fontsize=10, y=1.01)
    png = save_figure(fig, out)
    run_id = None
    if track:
        from cellseg.tracking.studies import tracked_run

        with tracked_run("augment-preview", "augment-preview", config.tracking.uri, config.tracking.experiment,
                         tags={"strategy": strategy_label(session.plan.strategy)}) as run:
            run.log_params(config.flat())  # the whole config: how the picture was made
            run.log_artifacts([png])
            run_id = run.run_id
    return AugmentPreview(png, images, titles, run_id)

