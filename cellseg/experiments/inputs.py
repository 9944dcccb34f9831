"""Up-front input checks for experiments that run many fits or sweeps: a missing store or an unknown
strategy fails in seconds with one line, before any training starts or any MLflow run is opened."""

from __future__ import annotations

from collections.abc import Sequence

from cellseg.config import Config
from cellseg.data.codes import resolve_codes
from cellseg.data.store import Store, open_store
from cellseg.errors import ConfigError


def check_inputs(configs: Sequence[Config]) -> Store:
    """The (one) store of ``configs``, after resolving every config's loading codes against its layout."""
    stores = {str(c.data.store) for c in configs}
    if any(c.data.store is None for c in configs):
        raise ConfigError("no training data: pass --data STORE (or set data.store in the config)")
    if len(stores) != 1:
        raise ConfigError(f"data.store: one store per experiment, got {', '.join(sorted(stores))}")
    store = open_store(configs[0].data.store)
    for config in configs:
        data = config.data
        resolve_codes(data.codes if data.codes is not None else (data.strategy or ""), store.layout)
    return store
