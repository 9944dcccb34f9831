"""Where the shipped configuration files live.

In a source checkout (the editable install) that is the top-level ``configs/`` folder, the single
source; a wheel, ``pip install .`` or ``pip install git+…`` carries a copy as ``cellseg/_configs``,
made at build time by ``setup.py``.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
_CHECKOUT = _PACKAGE.parent
_PACKAGED_CONFIGS = _PACKAGE / "_configs"


def _repo_configs() -> Path | None:
    """``configs/`` beside the package, only in a source checkout (never a stray folder in site-packages)."""
    configs = _CHECKOUT / "configs"
    return configs if (_CHECKOUT / "pyproject.toml").is_file() and configs.is_dir() else None


def configs_dir() -> Path:
    """The folder holding default.yaml, codes.yaml, strategies.yaml, layouts/ and profiles/."""
    return _repo_configs() or _PACKAGED_CONFIGS


def config_file(*parts: str) -> Path:
    return configs_dir().joinpath(*parts)
