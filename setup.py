"""Ship the top-level ``configs/`` tree inside the package as ``cellseg/_configs``.

``configs/`` stays the single source in the repo (the editable install reads it there, see
``cellseg/resources.py``); a wheel, ``pip install .`` or ``pip install git+…`` gets a copy made
at build time. The sdist carries ``configs/`` through ``MANIFEST.in``. Everything else is in
``pyproject.toml``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CONFIGS = Path(__file__).resolve().parent / "configs"
PACKAGED = Path("cellseg", "_configs")  # relative to the build's lib folder


class BuildPyWithConfigs(build_py):
    """build_py that also copies ``configs/*.yaml`` (recursively) into ``cellseg/_configs``."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # the editable install reads configs/ in place
        if not CONFIGS.is_dir():
            raise FileNotFoundError(f"{CONFIGS}: the shipped configuration is missing from the source tree")
        target = Path(self.build_lib) / PACKAGED
        for source in sorted(CONFIGS.rglob("*.yaml")):
            dest = target / source.relative_to(CONFIGS)
            self.mkpath(str(dest.parent))
            self.copy_file(str(source), str(dest))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = super().get_outputs(include_bytecode)
        if getattr(self, "editable_mode", False):
            return outputs
        target = Path(self.build_lib) / PACKAGED
        return [*outputs, *(str(target / p.relative_to(CONFIGS)) for p in sorted(CONFIGS.rglob("*.yaml")))]


setup(cmdclass={"build_py": BuildPyWithConfigs})
