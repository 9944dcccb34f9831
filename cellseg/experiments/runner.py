"""The one runner of the experiments made of many fits (tune, compare, sweep-ce), so they agree on:

- **checks first**: every fit's store and codes, the epochs, the split and the tracking server fail
  with one line (``plan``) before a file is written or an MLflow run opened;
- **one split** for every fit, kept as ``FOLDER/split.json``: made (seeded by ``config.seed``) the
  first time, re-read when the experiment is run again, and refused once the store's content hash
  differs from the one it was made of;
- **one parent MLflow run**, found again by its ``cellseg.kind`` tag and the experiment's naming tag
  (``study``, ``comparison``, ``sweep``), so a re-run or a second worker continues it; it gets the
  split and the store's content hash;
- **child runs**: each fit a child of the parent, tagged with the experiment's name;
- **resume**: running the same experiment again continues it — a fit whose run folder holds a
  checkpoint resumes from it (a finished one only re-reads its result, an interrupted one trains
  on, in the same child run); one without starts;
- **progress**: one ``RunsProgress`` over the fits and the epochs of the fit in progress.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cellseg.config import Config
from cellseg.data.split import Split, make_split
from cellseg.data.store import Store
from cellseg.engine.checkpoint import checkpoint_path
from cellseg.errors import BadInputError
from cellseg.experiments.inputs import check_inputs
from cellseg.experiments.progress import RunsProgress
from cellseg.run_folder import SPLIT_NAME
from cellseg.tracking.runs import check_tracking_uri, resolve_tracking_uri


@dataclass
class Plan:
    """What ``plan`` checked: the experiment's base config, store and split (not saved yet)."""

    config: Config
    store: Store
    split: Split
    split_path: Path


def plan(configs: Sequence[Config], folder: str | Path, start_over: str) -> Plan:
    """Check every fit's config (the first gives seed, epochs, validation fraction and tracking) and
    find the split, writing nothing. ``start_over`` tells how to start the experiment afresh, for the
    refusal of a split made of other data (e.g. "use a new --out")."""
    from cellseg.engine.loop import check_epochs, check_split

    config = configs[0]
    store = check_inputs(configs)
    check_epochs(config)
    path = Path(folder) / SPLIT_NAME
    if path.is_file():
        split = Split.load(path)
        if split.content_hash not in (None, store.content_hash):
            raise BadInputError(f"{path}: made for another version of the data than {config.data.store} "
                                f"(content hash differs); {start_over}")
    else:
        split = make_split(store, config.data.val_fraction, config.seed)
    check_split(split, config)
    check_tracking_uri(resolve_tracking_uri(config.tracking.uri))  # an unreachable server: fail now
    return Plan(config, store, split, path)


def default_name(folder: str | Path) -> str:
    """``<folder name>-<6 hex of its absolute path>``: re-running into the same folder continues the
    same MLflow parent run, and two folders both called ``compare`` do not share one."""
    folder = Path(folder).resolve()
    return f"{re.sub(r'[^A-Za-z0-9._-]+', '-', folder.name)}-{hashlib.sha1(str(folder).encode()).hexdigest()[:6]}"


@dataclass
class Runner:
    """The open experiment: its parent run, its progress display and the split every fit gets."""

    parent: Any  # cellseg.tracking.studies.TrackedRun
    progress: RunsProgress
    split: Split
    tag: dict[str, str]  # {naming tag: name}, on the parent and every child

    def child(self, run_name: str, tags: dict[str, Any], log_model: bool = False):
        """The MLflow callback making a fit a child run (``run_id`` is set once the fit starts)."""
        return self.parent.child_callback({**self.tag, **tags}, run_name=run_name, register=False,
                                          log_model=log_model)

    def fit(self, config: Config, run_dir: Path, child, callbacks: Sequence[Any] = ()):
        """``fit`` on the experiment's split, resumed when ``run_dir`` holds a checkpoint (module doc)."""
        from cellseg.engine.loop import fit

        return fit(config, run_dir, resume=checkpoint_path(run_dir).is_file(), split=self.split,
                   callbacks=[child, self.progress, *callbacks])

    def done(self, line: str) -> None:
        """A fit ended: its line, and the bar moves on."""
        self.progress.done(line)


@contextlib.contextmanager
def experiment(planned: Plan, kind: str, tag: str, name: str, total: int, what: str,
               params: dict[str, Any] | None = None, tags: dict[str, Any] | None = None,
               show_progress: bool = True) -> Iterator[Runner]:
    """Open (or continue) the parent run tagged ``cellseg.kind=kind`` and ``tag=name``, save the split
    and log it with ``params`` and ``tags``; yields the ``Runner`` of ``total`` fits (``what``: "trials" …).
    The parent ends FINISHED, or FAILED/KILLED with the error re-raised."""
    from cellseg.tracking.studies import shared_run_id, tracked_run

    config = planned.config
    uri, mlflow_experiment = config.tracking.uri, config.tracking.experiment
    parent_id = shared_run_id(name, kind, tag, uri, mlflow_experiment)
    with tracked_run(name, kind, uri, mlflow_experiment, run_id=parent_id) as parent:
        if not planned.split_path.is_file():
            planned.split.save(planned.split_path)
        if tags:
            parent.set_tags(tags)
        parent.log_params({**(params or {}), "store.content_hash": planned.store.content_hash,
                           "split.train": len(planned.split.train), "split.val": len(planned.split.val)})
        parent.log_artifacts([planned.split_path])
        with RunsProgress(total, what, enabled=show_progress) as progress:
            yield Runner(parent, progress, planned.split, {tag: name})
