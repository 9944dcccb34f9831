"""Pandera schemas for the tables cellseg reads and writes, one section per table.

Every table that crosses a file boundary is validated here, so a hand-edited or truncated CSV
fails with one line naming the file and the offending column instead of deep in training.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pandera.errors
import pandera.pandas as pa

from cellseg.errors import BadInputError

# --- manifest.csv (one row per stack of a Zarr store; written by ingest, read by Store) --------

_SHA256 = r"^[0-9a-f]{64}$"

MANIFEST_SCHEMA = pa.DataFrameSchema(
    {
        "id": pa.Column(str, pa.Check.str_length(min_value=1), unique=True),
        "key": pa.Column(str, pa.Check.str_matches(r"^\d{5,}$"), unique=True),
        "source": pa.Column(str),
        "height": pa.Column(int, pa.Check.gt(0)),
        "width": pa.Column(int, pa.Check.gt(0)),
        "channels": pa.Column(int, pa.Check.gt(0)),
        "layout": pa.Column(str, pa.Check.str_length(min_value=1)),
        "negative": pa.Column(bool),
        "foreground_fraction": pa.Column(float, pa.Check.in_range(0.0, 1.0)),
        "content_hash": pa.Column(str, pa.Check.str_matches(_SHA256)),
    },
    checks=pa.Check(
        lambda df: df["negative"] == (df["foreground_fraction"] == 0.0),
        error="negative must be true exactly when foreground_fraction is 0",
    ),
    strict=True,
    ordered=True,
    coerce=True,
    name="manifest",
)
MANIFEST_COLUMNS = list(MANIFEST_SCHEMA.columns)


# --- helpers ----------------------------------------------------------------------------------


def validate(df: pd.DataFrame, schema: pa.DataFrameSchema, where: str | Path) -> pd.DataFrame:
    """Validate ``df``; a failure becomes a one-line BadInputError naming ``where``."""
    try:
        return schema.validate(df, lazy=False)
    except (pandera.errors.SchemaError, pandera.errors.SchemaErrors) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadInputError(f"{where}: invalid {schema.name} table ({first})") from None


def _text_columns(schema: pa.DataFrameSchema) -> dict[str, type]:
    """Columns to read as text, so ids like "00012" keep their zeros."""
    return {name: str for name, col in schema.columns.items() if str(col.dtype).startswith("str")}


def read_csv(path: str | Path, schema: pa.DataFrameSchema) -> pd.DataFrame:
    """Read and validate a CSV table; missing or unparsable files are BadInputError."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{path}: {schema.name} table not found")
    try:
        df = pd.read_csv(path, dtype=_text_columns(schema), keep_default_na=False, na_values=[""])
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise BadInputError(f"{path}: cannot read {schema.name} table ({exc})") from None
    return validate(df, schema, path)
