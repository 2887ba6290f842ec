"""The generic layouts: interactions, users and items tables with a header, as CSV or Parquet.

Why a module of its own: unlike MovieLens, a generic layout says what it holds only in its
headers, so its columns are read and checked from the files, unknown interaction columns are
kept by position and ignored, and the kind of each user attribute is inferred from the data
(`infer_kind`) unless config forces it. Parquet cells are turned into the strings a CSV would
hold (`parquet_fields`), so both formats parse identically from there on. Files are opened
through Beam's `FileSystems` (imported lazily, so the package imports without Beam).

    csv       interactions.csv (header user_id,item_id[,rating][,timestamp]; other columns are
              ignored), users.csv (header user_id,<attributes...>), optional items.csv; UTF-8
    parquet   the same tables as interactions.parquet, users.parquet, items.parquet
"""

from __future__ import annotations

import csv
import datetime
import math
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

from recsys_cvae.datasets.errors import InputError
from recsys_cvae.datasets.rows import INTERACTIONS, ITEMS, USERS, is_number
from recsys_cvae.spec import CATEGORICAL, NUMERIC

CSV = "csv"
PARQUET = "parquet"
ENCODING = "utf-8"

FILE_NAMES = {
    CSV: {INTERACTIONS: "interactions.csv", USERS: "users.csv", ITEMS: "items.csv"},
    PARQUET: {INTERACTIONS: "interactions.parquet", USERS: "users.parquet", ITEMS: "items.parquet"},
}
_KNOWN_INTERACTION_COLUMNS = frozenset({"user_id", "item_id", "rating", "timestamp"})


class Headers(NamedTuple):
    """The columns of each table of a generic layout, in file order (empty without the file).

    `interactions` names the columns rows are split into (for CSV, unknown ones get a
    placeholder name); `raw_interactions` is the CSV header as written (to spot it repeated).
    """

    interactions: tuple[str, ...]
    users: tuple[str, ...]
    items: tuple[str, ...]
    raw_interactions: tuple[str, ...]
    separators: dict[str, str]
    user_string_columns: tuple[str, ...] = ()  # Parquet: users columns typed as strings


def read_headers(
    name: str, paths: Mapping[str, str], compression: Mapping[str, str]
) -> Headers:
    """Reads and checks the header of every table of a `csv` or `parquet` layout.

    Args:
      name: `csv` or `parquet`.
      paths: role -> file path of the files present (`interactions` is always there).
      compression: role -> `gzip` or `uncompressed`, as sniffed from the bytes (CSV only).

    Raises:
      InputError: a header is unreadable or empty, repeats a column, lacks user_id/item_id,
        or the file has no row after it.
    """
    separators, strings = {}, {}
    tables = {}
    for role, path in paths.items():
        if name == PARQUET:
            tables[role], strings[role] = _parquet_columns(path)
        else:
            tables[role], separators[role] = _csv_columns(
                path, compression.get(role, "auto"), require_rows=role == INTERACTIONS
            )
    interactions = tables[INTERACTIONS]
    _check_interaction_columns(paths[INTERACTIONS], interactions)
    users = tables.get(USERS, ())
    items = tables.get(ITEMS, ())
    if users and "user_id" not in users:
        raise InputError(
            f"{paths[USERS]}: no user_id column; expected header user_id,<attributes...>, "
            f"got {','.join(users)}"
        )
    if items and "item_id" not in items:
        raise InputError(f"{paths[ITEMS]}: no item_id column; got {','.join(items)}")
    if name == CSV:
        return Headers(
            _keep_known(interactions), users, items, raw_interactions=interactions,
            separators=separators,
        )
    return Headers(interactions, users, items, raw_interactions=(), separators={},
                   user_string_columns=strings.get(USERS, ()))


def infer_kind(values_are_numeric: bool, any_value: bool) -> str:
    """A generic column is numeric when it has values and every non-empty one is a number
    (`is_quantity`).

    A column with no values at all stays categorical: there is no evidence it is a number.
    """
    return NUMERIC if values_are_numeric and any_value else CATEGORICAL


def is_quantity(text: str) -> bool:
    """True when `text` reads as a quantity, not a code written in digits.

    A finite number ("3", "-1.5", "2e3", "0.25") is a quantity, unless it is spelled the way
    codes are: a leading zero before another digit ("00501", a zip code; "0.5" is fine) or
    a leading "+" ("+4420...", a phone number). Such a column stays categorical, so its
    values keep their spelling end to end.
    """
    if not is_number(text):
        return False
    digits = text.lstrip("-")
    if text.startswith("+") or (len(digits) > 1 and digits[0] == "0" and digits[1].isdigit()):
        return False
    return True


def split_csv_line(line: str, separator: str = ",") -> list[str]:
    """The fields of one CSV line (quoted fields may hold separators, not line breaks)."""
    return next(csv.reader([line], delimiter=separator), [])


def parquet_fields(raw: Mapping[str, Any]) -> dict[str, str]:
    """One Parquet row as the named string fields a CSV row would give."""
    return {name: _parquet_text(value) for name, value in raw.items()}


def iter_parquet_rows(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yields (row number, row as a dict) for every row of a Parquet file, 1-based, in order."""
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(path, compression_type="uncompressed") as f:
        number = 0
        for batch in pq.ParquetFile(f).iter_batches(batch_size=8192):
            for row in batch.to_pylist():
                number += 1
                yield number, row


def _check_interaction_columns(path: str, columns: tuple[str, ...]) -> None:
    if len(set(columns)) != len(columns):
        raise InputError(f"{path}: header repeats a column: {','.join(columns)}")
    if "user_id" not in columns or "item_id" not in columns:
        raise InputError(
            f"{path}: header must name user_id and item_id (user_id,item_id[,rating][,timestamp]),"
            f" got {','.join(columns)}"
        )


def _keep_known(columns: tuple[str, ...]) -> tuple[str, ...]:
    """CSV rows are split by position, so unknown columns keep a placeholder name (ignored)."""
    return tuple(
        c if c in _KNOWN_INTERACTION_COLUMNS else f"_ignored_{i}" for i, c in enumerate(columns)
    )


def _csv_columns(
    path: str, compression: str, require_rows: bool
) -> tuple[tuple[str, ...], str]:
    """(columns, separator) of a CSV file's header; the separator is sniffed from it.

    An interactions file with a header and no row is refused here, by name: there is nothing
    to learn from, and later steps would fail on it with messages about something else.
    """
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(path, compression_type=compression) as f:
        first = f.readline()
        rest = f.readline()
        while rest and not rest.strip():
            rest = f.readline()
    try:
        text = first.decode("utf-8-sig").rstrip("\r\n")
    except UnicodeDecodeError:
        raise InputError(
            f"{path}: the header line is not UTF-8 text; expected a CSV header such as "
            "user_id,item_id (a compressed file? only gzip is recognised)"
        ) from None
    if not text.strip():
        raise InputError(f"{path}: empty file; expected a header line")
    separator = sniff_separator(text)
    columns = tuple(c.strip() for c in split_csv_line(text, separator))
    if len(set(columns)) != len(columns):
        raise InputError(f"{path}: header repeats a column: {text}")
    if require_rows and not rest:
        raise InputError(
            f"{path}: only a header line ({text}), no rows; expected at least one data row "
            "after it"
        )
    return columns, separator


SEPARATORS = (",", ";", "\t", "|")


def sniff_separator(header: str) -> str:
    """The separator of a CSV header: the first of `SEPARATORS` that splits it, else ",".

    A header that holds commas is comma-separated (a quoted name may hold the others).
    """
    for separator in SEPARATORS:
        if separator in header:
            return separator
    return ","


def _parquet_columns(path: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(columns, the columns typed as strings: categorical whatever their values)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems

    try:
        with FileSystems.open(path, compression_type="uncompressed") as f:
            parquet = pq.ParquetFile(f)
            schema, rows = parquet.schema_arrow, parquet.metadata.num_rows
    except Exception as error:  # pyarrow raises several types for a broken file
        raise InputError(f"{path}: not a readable Parquet file ({error})") from None
    names = tuple(schema.names)
    if rows == 0:
        raise InputError(
            f"{path}: no rows (columns {','.join(names)}); expected at least one row"
        )
    strings = tuple(
        field.name for field in schema
        if pa.types.is_string(field.type) or pa.types.is_large_string(field.type)
        or pa.types.is_dictionary(field.type) and pa.types.is_string(field.type.value_type)
    )  # fmt: skip
    return names, strings


def _parquet_text(value: Any) -> str:
    """Parquet cells as the strings a CSV would hold, so both layouts parse identically.

    Integral floats lose their ".0" (ids stored as float64 next to nulls stay "242"),
    datetimes become epoch seconds, nulls and NaN become "".
    """
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, datetime.datetime):
        return repr(value.timestamp())
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)
