"""The README and docs/ stay true to the code: the CLI reference is the app's, the commands exist, links resolve."""

import re
from pathlib import Path

from cellseg.cli.reference import current_block, render

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CLI_REFERENCE = ROOT / "docs" / "cli.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def test_cli_reference_matches_the_typer_app():
    block = current_block(CLI_REFERENCE.read_text(encoding="utf-8"))
    assert block is not None, "docs/cli.md lacks the CLI reference markers"
    assert block == render(), "docs/cli.md is stale: run python -m cellseg.cli.reference --write docs/cli.md"


def test_readme_starts_with_the_two_setup_commands():
    head = "\n".join(README.read_text(encoding="utf-8").splitlines()[:30])
    assert "make run" in head and "make test" in head


def test_ci_runs_the_readme_test_command():
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8")
    assert "make test" in ci


def test_readme_is_short():
    assert len(README.read_text(encoding="utf-8")) <= 12_000, "README.md over 12,000 characters: move detail to docs/"


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens (fenced code skipped)."""
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    found = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *$", text, flags=re.M):
        found.add(re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-"))
    return found


def test_relative_links_in_readme_and_docs_resolve():
    broken = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
        for target in LINK.findall(text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)
