"""User-facing errors.

Anything a user can cause (bad file, bad option, unreachable server) is raised as a
``CellsegError`` with a one-line message that names the file or option and what is wrong.
The CLI prints that line and exits non-zero, without a traceback (``--debug`` shows one).
"""

import contextlib
from collections.abc import Iterator


class CellsegError(Exception):
    """Base class: an error the user can fix; its message is shown as is."""

    exit_code = 1


class BadInputError(CellsegError):
    """A data file or folder is missing, unreadable or inconsistent."""


class ConfigError(CellsegError):
    """A config file, option, loading code or strategy is invalid."""


class TrackingError(CellsegError):
    """The MLflow tracking server or model registry cannot be used."""


def validation_message(exc) -> str:
    """A pydantic ``ValidationError`` as one line: the first error's dotted location and message."""
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    return f"{loc}: {first['msg']}" if loc else first["msg"]


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type when empty): what a one-line error shows."""
    text = str(getattr(exc, "message", None) or exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


@contextlib.contextmanager
def tracking_errors(what: str) -> Iterator[None]:
    """Turn MLflow/database/OS errors into a one-line TrackingError prefixed with ``what``."""
    try:
        yield
    except TrackingError:
        raise
    except Exception as exc:  # noqa: BLE001 — MLflow raises many kinds; the user needs one line
        raise TrackingError(f"{what}: {one_line(exc)}") from None
