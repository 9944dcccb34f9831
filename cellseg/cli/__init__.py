"""Command-line interface (Typer). Modules here are thin: parse options, call the library, report."""
