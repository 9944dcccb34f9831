"""The README stays true to the code: its CLI reference is the app's, its commands exist."""

from pathlib import Path

from cellseg.cli.reference import current_block, render

README = Path(__file__).resolve().parents[1] / "README.md"


def test_cli_reference_matches_the_typer_app():
    block = current_block(README.read_text(encoding="utf-8"))
    assert block is not None, "README.md lacks the CLI reference markers"
    assert block == render(), "README CLI reference is stale: run python -m cellseg.cli.reference --write README.md"


def test_readme_starts_with_the_two_setup_commands():
    head = "\n".join(README.read_text(encoding="utf-8").splitlines()[:30])
    assert "make run" in head and "make test" in head


def test_ci_runs_the_readme_test_command():
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8")
    assert "make test" in ci
