"""Data: layouts, synthetic stacks, ingest to Zarr, stores, loading codes, datasets, subimages."""

from importlib import import_module

# Public names, imported on first use so that `import cellseg.data.layouts` (CLI start-up) stays light.
_LAZY = {
    "open_dataset": "cellseg.data.dataset",
    "resolve_codes": "cellseg.data.codes",
    "load_strategies": "cellseg.data.codes",
    "make_split": "cellseg.data.split",
    "Split": "cellseg.data.split",
    "make_batch_source": "cellseg.data.batches",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cellseg.data' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
