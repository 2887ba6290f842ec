"""What a parsed row is, and the checks every layout applies before a row counts as data.

Why a module of its own: MovieLens and generic tables split their lines differently, but once a
row has named fields the rules are the same everywhere: an id is never empty nor absurdly long,
a rating or timestamp is a finite number, an attribute value holds no line break. Keeping those
rules in one place means a row means the same thing whatever layout it came from, and a row
that means nothing raises `BadRow` with the same reason code (which the Beam feature job counts
and its vectorised fast path mirrors with `MAX_ID_CHARS` and `MAX_LINE_CHARS`).

A row's three tables are named by role: `interactions`, `users` and the optional `items`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from recsys_cvae.datasets.errors import BadRow
from recsys_cvae.spec import NUMERIC

INTERACTIONS = "interactions"
USERS = "users"
ITEMS = "items"

# Control characters other than tab: a text row holding one is binary garbage, not data.
CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
MAX_ID_CHARS = 256  # a longer user or item id is a broken row, not an id
MAX_VALUE_CHARS = 1024  # the same for one attribute value
MAX_LINE_CHARS = 65536  # and for a whole row


class Interaction(NamedTuple):
    """One (user, item) event; rating and timestamp are None when the layout has none."""

    user_id: str
    item_id: str
    rating: float | None
    timestamp: float | None


class UserRow(NamedTuple):
    """One users-table row: raw attribute strings ("" = unknown), in `Layout.attributes` order.

    Strings, not numbers: whether a generic column is numeric is decided over the whole
    table (`infer_kind`), after parsing.
    """

    user_id: str
    attributes: dict[str, str]


class ItemRow(NamedTuple):
    """One items-table row: descriptive columns (title, genres, ...) as strings."""

    item_id: str
    attributes: dict[str, str]


def decode_line(raw: bytes, encoding: str) -> str:
    """The text of one line of a text file, refused when it cannot be a row of data.

    Raises:
      BadRow: undecodable, longer than `MAX_LINE_CHARS`, or holding control characters.
    """
    try:
        line = raw.decode(encoding)
    except UnicodeDecodeError as error:
        raise BadRow("undecodable", f"not valid {encoding}: {error.reason}") from None
    line = line.removeprefix("\ufeff")  # a BOM where files were concatenated
    if len(line) > MAX_LINE_CHARS:
        raise BadRow("field_too_long", f"row of {len(line)} characters (max {MAX_LINE_CHARS})")
    if CONTROL_CHARACTERS.search(line):
        raise BadRow("binary_garbage", "control characters in a text row")
    return line


def named_fields(columns: Sequence[str], values: Sequence[str]) -> dict[str, str]:
    """Pairs a split line with its column names, values stripped.

    Raises:
      BadRow: the line has more or fewer fields than the file has columns.
    """
    if len(values) != len(columns):
        raise BadRow(
            "wrong_field_count",
            f"expected {len(columns)} fields ({','.join(columns)}), got {len(values)}",
        )
    return {name: value.strip() for name, value in zip(columns, values)}


def parse_interaction(fields: Mapping[str, str]) -> Interaction:
    """Validates one interaction's named fields (every layout ends here).

    Raises:
      BadRow: an id is empty, or a rating/timestamp present in the layout is not a finite number.
    """
    user_id = fields["user_id"]
    item_id = fields["item_id"]
    if not user_id:
        raise BadRow("empty_user_id", "user_id is empty")
    if not item_id:
        raise BadRow("empty_item_id", "item_id is empty")
    for name, value in (("user_id", user_id), ("item_id", item_id)):
        if len(value) > MAX_ID_CHARS:
            raise BadRow("field_too_long", f"{name} has {len(value)} chars, max {MAX_ID_CHARS}")
    rating = timestamp = None
    if "rating" in fields:
        rating = finite_number(fields["rating"])
        if rating is None:
            raise BadRow("bad_rating", f"rating {fields['rating']!r} is not a number")
    if "timestamp" in fields:
        timestamp = finite_number(fields["timestamp"])
        if timestamp is None:
            raise BadRow("bad_timestamp", f"timestamp {fields['timestamp']!r} is not a number")
    return Interaction(user_id, item_id, rating, timestamp)


def check_attributes(attributes: Mapping[str, str], kinds: Mapping[str, str]) -> None:
    """Refuses a users row whose attribute values cannot be features.

    Raises:
      BadRow: a value of a numeric attribute is not a number, a value holds a line break, or
        a value is longer than `MAX_VALUE_CHARS`.
    """
    for name, value in attributes.items():
        if value and kinds.get(name) == NUMERIC and not is_number(value):
            raise BadRow("bad_attribute", f"{name} {value!r} is not a number")
        if "\n" in value or "\r" in value:
            raise BadRow("bad_attribute", f"{name} {value!r} contains a line break")
        if len(value) > MAX_VALUE_CHARS:
            raise BadRow("field_too_long", f"{name} has {len(value)} characters")


def is_number(text: str) -> bool:
    """True for finite numbers ("3", "-1.5e3"); False for "", "nan", "inf" and words."""
    return finite_number(text) is not None


def finite_number(text: str) -> float | None:
    """The value of `text` when it is a finite number, else None."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None
