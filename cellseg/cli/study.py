"""CLI: tune and compare commands (to be implemented)."""

import typer


def register(app: typer.Typer) -> None:
    """Attach this module's commands to the root app."""
