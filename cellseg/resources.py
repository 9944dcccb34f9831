"""Where the shipped configuration files live (``configs/`` in the repo, packaged copy otherwise)."""

from __future__ import annotations

from pathlib import Path

_REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
_PACKAGED_CONFIGS = Path(__file__).resolve().parent / "_configs"


def configs_dir() -> Path:
    """The folder holding default.yaml, codes.yaml, strategies.yaml, layouts/ and profiles/."""
    return _REPO_CONFIGS if _REPO_CONFIGS.is_dir() else _PACKAGED_CONFIGS


def config_file(*parts: str) -> Path:
    return configs_dir().joinpath(*parts)
