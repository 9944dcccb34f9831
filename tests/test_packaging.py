"""A built wheel carries the shipped configuration (``configs/`` → ``cellseg/_configs``) and works installed.

The wheel is built offline (``--no-build-isolation --no-deps``, setuptools from the test environment)
from a copy of the sources, so the repo's ``build/`` folder is neither used nor touched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ["pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "cellseg", "configs"]
SHIPPED = ["default.yaml", "codes.yaml", "strategies.yaml", "layouts/trainer.yaml", "layouts/test.yaml",
           "layouts/external.yaml", "profiles/quick.yaml", "profiles/paper.yaml", "profiles/scratch.yaml"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELLSEG_", "PYTHONPATH"))}
    return {**env, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", **extra}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("packaging")
    src = root / "src"
    src.mkdir()
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "_configs"))
        else:
            shutil.copy2(path, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    str(src), "-w", str(root / "dist")], check=True, env=_env(), cwd=root, timeout=300)
    (found,) = (root / "dist").glob("cellseg-*.whl")
    return found


def test_wheel_carries_the_shipped_configuration(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [f"cellseg/_configs/{name}" for name in SHIPPED if f"cellseg/_configs/{name}" not in names]
    assert not missing, f"{wheel.name} lacks {missing}"
    # every YAML of configs/ is shipped, and nothing is shipped that configs/ does not have
    shipped = {n.removeprefix("cellseg/_configs/") for n in names if n.startswith("cellseg/_configs/")}
    assert shipped == {p.relative_to(REPO / "configs").as_posix() for p in (REPO / "configs").rglob("*.yaml")}


def test_installed_wheel_reads_every_shipped_config(wheel, tmp_path):
    """Installed (not editable), the package finds its configs inside itself: codes, strategies, layouts, profiles."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, env=_env(), cwd=tmp_path, timeout=300)
    script = (
        "import cellseg, cellseg.resources as r\n"
        "from cellseg.config import load_config\n"
        "from cellseg.cli.options import profile_path\n"
        "from cellseg.data.codes import load_codebook, load_strategies\n"
        "from cellseg.data.layouts import builtin_layouts, load_layout\n"
        "print(cellseg.__file__)\n"
        "print(r.configs_dir())\n"
        "assert load_codebook() and load_strategies()\n"
        "print(','.join(builtin_layouts()))\n"
        "[load_layout(n) for n in builtin_layouts()]\n"
        "[load_config(profile_path(p)) for p in ('quick', 'paper', 'scratch')]\n"
    )
    # the installed copy comes first on sys.path (the dev venv's editable finder only answers after it);
    # its dependencies are the test environment's
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                         env=_env(PYTHONPATH=str(target)), timeout=300)
    assert run.returncode == 0, run.stderr
    package_file, configs, layouts = run.stdout.split()
    assert Path(package_file).is_relative_to(target)
    assert Path(configs) == target / "cellseg" / "_configs"
    assert layouts == "external,test,trainer"
    # and the command the issue reported broken
    codes = subprocess.run([sys.executable, "-m", "cellseg", "codes", "list"], capture_output=True, text=True,
                           cwd=tmp_path, env=_env(PYTHONPATH=str(target), COLUMNS="200"), timeout=300)
    assert codes.returncode == 0, codes.stdout + codes.stderr
    assert "merge of the three fluorescence totals" in codes.stdout
