"""Raw input layouts: find out what a data directory holds, and parse its rows strictly.

Why a module of its own: the Beam feature job, the tests and any quick look at a dataset need
the same answer to "what does this row mean?", and a row that means nothing must say why
(`BadRow.reason`, a stable short code that Beam counts and the dead letters carry) instead of
silently turning into a wrong id. This module is the entry point of the package: it detects
the layout, and `Layout.parse` sends each row through the reader of that layout (`movielens`,
`generic_tables`) and the checks every layout shares (`rows`). Importable without Beam; files
are opened through Beam's `FileSystems` (imported lazily) so `gs://` data directories work.

Layouts (ARCHITECTURE.md, "Input layouts"), detected from file names:

    ml-100k   u.data (user\\titem\\trating\\ttimestamp), u.user (user|age|gender|occupation|zip),
              u.item (item|title|date|video date|url|19 genre flags), latin-1
    ml-1m     ratings.dat, users.dat (UserID::Gender::Age::Occupation::Zip-code), movies.dat,
              `::`-separated, latin-1
    csv       interactions.csv (header user_id,item_id[,rating][,timestamp]; other columns are
              ignored), users.csv (header user_id,<attributes...>), optional items.csv; UTF-8
    parquet   the same tables as interactions.parquet, users.parquet, items.parquet

The users table is optional in every layout: without it there are no attributes and no
users without interactions. One row per line: CSV fields may be quoted, but not span lines.
A row's "line" is its 1-based line number in the file (the
header is line 1), or its 1-based row number in a Parquet file.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Mapping
from typing import Any

from recsys_cvae.datasets import generic_tables, movielens
from recsys_cvae.datasets.errors import BadRow, InputError
from recsys_cvae.datasets.file_detection import (
    check_movielens_file,
    find_files,
    sniff_compression,
)
from recsys_cvae.datasets.generic_tables import CSV, PARQUET, iter_parquet_rows
from recsys_cvae.datasets.movielens import ML_1M, ML_100K
from recsys_cvae.datasets.rows import (
    INTERACTIONS,
    ITEMS,
    USERS,
    Interaction,
    ItemRow,
    UserRow,
    check_attributes,
    decode_line,
    named_fields,
    parse_interaction,
)
from recsys_cvae.derivations import derive
from recsys_cvae.spec import CATEGORICAL, NUMERIC, RESERVED_NAMES

_ATTRIBUTE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Names the serving signatures use for their own inputs (`export.saved_model.HISTORY_INPUT`):
# an attribute input of the same name would collide with them.
SIGNATURE_INPUT_NAMES = frozenset({"item_ids"})


@dataclasses.dataclass(frozen=True)
class Layout:
    """What `detect_layout` found in a data directory, and how to parse each of its files.

    Attributes:
      name: `ml-100k`, `ml-1m`, `csv` or `parquet`.
      data_dir: the directory as given.
      paths: role (`interactions`, `users`, `items`) -> file path; absent roles are missing.
      interaction_columns: column names of the interactions file, in file order.
      user_columns: column names of the users file, in file order (empty without one).
      item_columns: column names of the items file, in file order (empty without one).
      attributes: user attribute names in the order of the spec (after `drop_attributes`;
        includes derived ones such as `zip_region`, whose serving input is their raw column).
      kinds: attribute -> kind, for the attributes whose kind does not depend on the data
        (fixed by the MovieLens layouts or forced by config); the rest are inferred.
      derived: derived attribute -> (raw users column, derivation name of
        `recsys_cvae.derivations`), e.g. MovieLens' zip_region -> ("zip_code",
        "first_char_upper"); `parse` applies them and the feature spec records them, so
        the serving signatures take the raw column.
      encoding: text encoding of the files (latin-1 for MovieLens, UTF-8 otherwise).
      raw_interaction_columns: the CSV interactions header as written (to spot it repeated).
      compression: role -> `gzip` or `uncompressed`, sniffed from each file's first bytes
        (so `interactions.csv` holding gzip bytes reads, and `.gz` is not trusted blindly).
      separators: role -> field separator of a CSV file, sniffed from its header.
      kind_sources: attribute -> why its kind is fixed (`features.categorical`, `its Parquet
        string column`, the MovieLens layout); attributes absent here are inferred.
    """

    name: str
    data_dir: str
    paths: Mapping[str, str]
    interaction_columns: tuple[str, ...]
    user_columns: tuple[str, ...] = ()
    item_columns: tuple[str, ...] = ()
    attributes: tuple[str, ...] = ()
    kinds: Mapping[str, str] = dataclasses.field(default_factory=dict)
    derived: Mapping[str, tuple[str, str]] = dataclasses.field(default_factory=dict)
    encoding: str = "utf-8"
    raw_interaction_columns: tuple[str, ...] = ()
    compression: Mapping[str, str] = dataclasses.field(default_factory=dict)
    separators: Mapping[str, str] = dataclasses.field(default_factory=dict)
    kind_sources: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @property
    def has_header(self) -> bool:
        return self.name == CSV

    @property
    def has_rating(self) -> bool:
        return "rating" in self.interaction_columns

    @property
    def has_timestamp(self) -> bool:
        return "timestamp" in self.interaction_columns

    def path(self, role: str) -> str | None:
        return self.paths.get(role)

    def separator(self, role: str) -> str:
        """The field separator of the `role` file."""
        if self.name == CSV:
            return self.separators.get(role, ",")
        return movielens.SEPARATORS[self.name][role] if self.name in movielens.SEPARATORS else ""

    def parse(self, role: str, raw: bytes | Mapping[str, Any]) -> Interaction | UserRow | ItemRow:
        """Parses one raw row of the `role` file (bytes of a text line, or a Parquet row dict).

        Raises:
          BadRow: the row cannot be used; the reason says why.
        """
        if role == INTERACTIONS:
            return parse_interaction(self._fields(role, raw))
        if role == USERS:
            return self._parse_user(self._fields(role, raw))
        if role == ITEMS:
            return self._parse_item(self._fields(role, raw))
        raise ValueError(f"unknown role {role!r}; expected one of {INTERACTIONS}, {USERS}, {ITEMS}")

    # ---- rows -> named fields ------------------------------------------------------------

    def _columns(self, role: str) -> tuple[str, ...]:
        return {
            INTERACTIONS: self.interaction_columns,
            USERS: self.user_columns,
            ITEMS: self.item_columns,
        }[role]

    def _fields(self, role: str, raw: bytes | Mapping[str, Any]) -> dict[str, str]:
        if self.name == PARQUET:
            return generic_tables.parquet_fields(raw)
        line = decode_line(raw, self.encoding)
        if self.name == CSV:
            values = generic_tables.split_csv_line(line, self.separator(role))
        else:
            values = line.split(self.separator(role))
        if self.name == CSV and [v.strip() for v in values] == list(self._header(role)):
            raise BadRow("repeated_header", "the header line again (files concatenated?)")
        return named_fields(self._columns(role), values)

    def _header(self, role: str) -> tuple[str, ...]:
        """The header as written: CSV interaction columns other than ours keep their place."""
        columns = self._columns(role)
        return tuple(self.raw_interaction_columns or columns) if role == INTERACTIONS else columns

    # ---- named fields -> records ---------------------------------------------------------

    def _parse_user(self, fields: dict[str, str]) -> UserRow:
        user_id = fields.get("user_id", "")
        if not user_id:
            raise BadRow("empty_user_id", "user_id is empty")
        if self.name == ML_100K:
            values = movielens.ml_100k_user(fields)
        elif self.name == ML_1M:
            values = movielens.ml_1m_user(fields)
        else:
            values = fields
        attributes = {}
        for name in self.attributes:
            if name in self.derived:
                column, derivation = self.derived[name]
                attributes[name] = derive(derivation, values.get(column, ""))
            else:
                attributes[name] = values.get(name, "")
        check_attributes(attributes, self.kinds)
        return UserRow(user_id, attributes)

    def _parse_item(self, fields: dict[str, str]) -> ItemRow:
        item_id = fields.get("item_id", "")
        if not item_id:
            raise BadRow("empty_item_id", "item_id is empty")
        if self.name == ML_100K:
            attributes = movielens.ml_100k_item(fields)
        elif self.name == ML_1M:
            attributes = movielens.ml_1m_item(fields)
        else:
            attributes = {k: v for k, v in fields.items() if k != "item_id"}
        return ItemRow(item_id, attributes)


# ---- detection ----------------------------------------------------------------------------


def detect_layout(
    data_dir: str,
    categorical: list[str] | tuple[str, ...] = (),
    numeric: list[str] | tuple[str, ...] = (),
    drop_attributes: list[str] | tuple[str, ...] = (),
) -> Layout:
    """Finds the layout of `data_dir` from its file names and reads the headers.

    Args:
      data_dir: local path or any Beam file-system URL (gs://...).
      categorical, numeric, drop_attributes: `FeaturesConfig` overrides of attribute kinds;
        every name must be an attribute of the layout.

    Raises:
      InputError: nothing recognisable, two layouts at once, a missing required column, or an
        override naming an unknown attribute; the message names the directory or file.
    """
    name, paths = find_files(data_dir)
    compression = {role: sniff_compression(path) for role, path in paths.items()}
    layout = _read_columns(name, data_dir, paths, compression)
    return _apply_overrides(layout, categorical, numeric, drop_attributes)


def _read_columns(
    name: str, data_dir: str, paths: dict[str, str], compression: dict[str, str]
) -> Layout:
    """The layout before config: every attribute its files hold, only the kinds it fixes."""
    if name in (ML_100K, ML_1M):
        columns = movielens.COLUMNS[name]
        for role, path in paths.items():
            check_movielens_file(
                path, compression[role], movielens.SEPARATORS[name][role], columns[role]
            )
        return Layout(
            name=name,
            data_dir=data_dir,
            paths=paths,
            interaction_columns=columns[INTERACTIONS],
            user_columns=columns[USERS] if USERS in paths else (),
            item_columns=columns[ITEMS] if ITEMS in paths else (),
            attributes=tuple(movielens.KINDS[name]) if USERS in paths else (),
            kinds=dict(movielens.KINDS[name]),
            derived=dict(movielens.DERIVED[name]),
            encoding=movielens.ENCODING,
            compression=compression,
            kind_sources={a: f"{name} layout" for a in movielens.KINDS[name]},
        )
    headers = generic_tables.read_headers(name, paths, compression)
    strings = headers.user_string_columns
    attributes = tuple(c for c in headers.users if c != "user_id")
    return Layout(
        name=name,
        data_dir=data_dir,
        paths=paths,
        interaction_columns=headers.interactions,
        user_columns=headers.users,
        item_columns=headers.items,
        attributes=attributes,
        kinds={a: CATEGORICAL for a in attributes if a in strings},
        encoding=generic_tables.ENCODING,
        raw_interaction_columns=headers.raw_interactions,
        compression=compression,
        separators=headers.separators,
        kind_sources={a: "its Parquet type (string)" for a in attributes if a in strings},
    )


def _apply_overrides(
    layout: Layout,
    categorical: list[str] | tuple[str, ...],
    numeric: list[str] | tuple[str, ...],
    drop_attributes: list[str] | tuple[str, ...],
) -> Layout:
    """Checks the `FeaturesConfig` overrides against the layout's attributes, then applies them."""
    available = layout.attributes
    where = layout.paths.get(USERS, layout.data_dir)
    for option, names in (
        ("categorical", categorical), ("numeric", numeric), ("drop_attributes", drop_attributes)
    ):
        unknown = sorted(set(names) - set(available))
        if unknown:
            raise InputError(
                f"{where}: features.{option} names {unknown}, which are not attributes of this "
                f"{layout.name} layout; attributes: {list(available)}"
            )
    both = sorted(set(categorical) & set(numeric))
    if both:
        raise InputError(f"features.categorical and features.numeric both name {both}")
    derived_numeric = sorted(set(numeric) & set(layout.derived))
    if derived_numeric:
        raise InputError(
            f"{where}: features.numeric names {derived_numeric}, derived from a column as "
            "strings (categorical only)"
        )
    attributes = tuple(a for a in available if a not in set(drop_attributes))
    _check_attribute_names(where, attributes)
    kinds = dict(layout.kinds)
    sources = dict(layout.kind_sources)
    kinds.update({a: CATEGORICAL for a in categorical})
    kinds.update({a: NUMERIC for a in numeric})
    sources.update({a: "features.categorical" for a in categorical})
    sources.update({a: "features.numeric" for a in numeric})
    kinds = {a: k for a, k in kinds.items() if a in attributes}
    sources = {a: why for a, why in sources.items() if a in attributes}
    derived = {a: how for a, how in layout.derived.items() if a in attributes}
    return dataclasses.replace(
        layout, attributes=attributes, kinds=kinds, derived=derived, kind_sources=sources
    )


def _check_attribute_names(where: str, attributes: tuple[str, ...]) -> None:
    reserved = sorted(RESERVED_NAMES | SIGNATURE_INPUT_NAMES)
    for attribute in attributes:
        if attribute in reserved:
            raise InputError(
                f"{where}: column {attribute!r} is a name the feature records or the serving "
                f"signatures use themselves (reserved: {', '.join(reserved)}); rename it or "
                "list it in features.drop_attributes"
            )
        if not _ATTRIBUTE_NAME.match(attribute):
            raise InputError(
                f"{where}: column {attribute!r} cannot be an attribute name (it must start with "
                "a letter or _ and hold only letters, digits and _); rename it or list it in "
                "features.drop_attributes"
            )


# ---- reading rows -------------------------------------------------------------------------


def iter_raw_rows(layout: Layout, role: str) -> Iterator[tuple[int, bytes | dict[str, Any]]]:
    """Yields (line, raw) for every data row of one file, sequentially.

    Text files: raw is the line's bytes without the line break; the CSV header and blank lines
    are skipped (a blank line holds no row). Parquet: raw is the row as a dict. Sequential on
    purpose: line numbers need it, and they are what makes a dead letter findable.
    """
    from apache_beam.io.filesystems import FileSystems

    path = layout.paths[role]
    if layout.name == PARQUET:
        yield from iter_parquet_rows(path)
        return
    with FileSystems.open(path, compression_type=layout.compression.get(role, "auto")) as f:
        for number, line in enumerate(iter(f.readline, b""), start=1):
            line = line.rstrip(b"\r\n")
            if number == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]
            if (number == 1 and layout.has_header) or not line.strip():
                continue
            yield number, line


def read_items(layout: Layout) -> dict[str, dict[str, str]]:
    """item_id -> descriptive columns (title, genres, ...) from the optional items file.

    Plain Python for reports and notebooks (the model itself has no item features). Bad rows
    are skipped; an absent items file gives {}.
    """
    if ITEMS not in layout.paths:
        return {}
    items = {}
    for _, raw in iter_raw_rows(layout, ITEMS):
        try:
            row = layout.parse(ITEMS, raw)
        except BadRow:
            continue
        items[row.item_id] = row.attributes
    return items
