"""The one training engine (train, lr-find, tune, compare and sweep-ce all use it).

``fit``, ``FitResult``, ``Callback`` (loop.py) and ``TrainingSession`` (session.py) are imported on
first use, so light submodules (checkpoint, schedule) stay cheap to import on their own.
"""

_EXPORTS = {"fit": "loop", "FitResult": "loop", "Callback": "loop", "TrainingSession": "session"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"cellseg.engine.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'cellseg.engine' has no attribute {name!r}")
