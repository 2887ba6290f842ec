"""Reading raw logs in parallel chunks: strict parsing, dead letters, rows bucketed by user.

Why a module of its own: per-row Python in Beam costs tens of microseconds per element per
step, which at 20M interactions is most of an hour. So files are cut into byte ranges that end
on a line break (`plan_chunks`, one sequential pass that only counts line breaks, so every row
keeps its true line number), each range is parsed as a whole with pyarrow compute (split,
trim, number checks), and only the rows the vectorised check does not accept go through the
strict per-row parser of `recsys_cvae.datasets.layouts` — which decides, and names the reason.
The vectorised path accepts a strict subset of what the strict parser accepts and produces the
same values, so the output does not depend on which path a row took.

Parsed rows leave a chunk as one Arrow table per user bucket (`user_bucket`), so grouping by
user costs a few hundred elements instead of one per row.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, NamedTuple

import apache_beam as beam
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.pvalue import TaggedOutput

from recsys_cvae.datasets import layouts as L
from recsys_cvae.datasets.rows import MAX_ID_CHARS, MAX_LINE_CHARS

DEAD = "dead_letters"
COUNTS = "counts"
CHUNK_BYTES = 16 << 20  # ~700k interaction rows: big enough to vectorise, small to spread
RAW_CHARS = 500
INTERACTION_SCHEMA = pa.schema([
    ("user", pa.string()), ("item", pa.string()),
    ("rating", pa.float64()), ("timestamp", pa.float64()),
])  # fmt: skip
_NUMBER = r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?$"
_SUSPICIOUS = r"[\x00-\x08\x0b-\x1f\x7f\x{feff}]"


class Chunk(NamedTuple):
    """A piece of one file: bytes [start, end) whose first row is line `first_line`.

    Compressed text cannot be seeked, so its chunks carry their bytes in `data`; a Parquet
    chunk is row group number `start` (first_line = its first row number).
    """

    source: str
    first_line: int
    start: int
    end: int
    data: bytes | None = None


def dead_letter(source: str, line: int, reason: str, detail: str, raw: Any) -> dict:
    """One dead letter as ARCHITECTURE.md specifies (`detail` adds the parser's explanation)."""
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", errors="replace")
    elif not isinstance(raw, str):
        raw = json.dumps(raw, default=str, sort_keys=True)
    return {"source": source, "line": line, "reason": reason, "detail": detail,
            "raw": raw[:RAW_CHARS]}  # fmt: skip


def user_bucket(user_ids: Any, num_buckets: int) -> np.ndarray:
    """[n] user ids -> [n] int64 buckets; pandas' SipHash with its fixed key: same everywhere."""
    values = np.asarray(user_ids, dtype=object)
    return (pd.util.hash_array(values) % np.uint64(num_buckets)).astype(np.int64)


def plan_chunks(layout: L.Layout, role: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[Chunk]:
    """Cuts one file into chunks that end on a line break, counting lines on the way."""
    path = layout.paths[role]
    if layout.name == L.PARQUET:
        import pyarrow.parquet as pq

        with FileSystems.open(path, compression_type="uncompressed") as f:
            metadata = pq.ParquetFile(f).metadata
        first = 1
        for group in range(metadata.num_row_groups):
            yield Chunk(path, first, group, group + 1)
            first += metadata.row_group(group).num_rows
        return
    compression = layout.compression.get(role) or CompressionTypes.detect_compression_type(path)
    compressed = compression != CompressionTypes.UNCOMPRESSED
    with FileSystems.open(path, compression_type=compression) as f:
        start, line, carry = 0, 1, b""
        while True:
            block = f.read(chunk_bytes)
            data = carry + block
            cut = data.rfind(b"\n") + 1 if block else len(data)
            if cut == 0 and block:  # no line break in a whole block: keep reading
                carry = data
                continue
            piece, carry = data[:cut], data[cut:]
            if piece:
                yield Chunk(path, line, start, start + cut, piece if compressed else None)
            start, line = start + cut, line + piece.count(b"\n")
            if not block:
                return


def read_chunk(chunk: Chunk) -> bytes:
    if chunk.data is not None:
        return chunk.data
    with FileSystems.open(chunk.source, compression_type="uncompressed") as f:
        f.seek(chunk.start)
        return f.read(chunk.end - chunk.start)


def chunk_lines(
    layout: L.Layout, chunk: Chunk, data: bytes
) -> tuple[np.ndarray, pa.StringArray, list[tuple[int, bytes]]]:
    """(line numbers [n], lines [n] without line breaks, undecodable (line, bytes) pairs).

    Blank lines hold no row and are left out; so is the CSV header (line 1).
    """
    try:
        texts = data.decode(layout.encoding).split("\n")
        undecodable = []
    except UnicodeDecodeError:
        texts, undecodable = [], []
        for offset, raw in enumerate(data.split(b"\n")):
            try:
                texts.append(raw.decode(layout.encoding))
            except UnicodeDecodeError:
                texts.append("")
                undecodable.append((chunk.first_line + offset, raw.rstrip(b"\r")))
    if chunk.first_line == 1 and texts:
        texts[0] = texts[0].removeprefix("\ufeff")
        if layout.has_header:
            texts[0] = ""
    lines = pc.utf8_rtrim(pa.array(texts, pa.string()), characters="\r")
    keep = pc.not_equal(pc.utf8_trim_whitespace(lines), "").to_numpy(zero_copy_only=False)
    numbers = np.arange(chunk.first_line, chunk.first_line + len(texts), dtype=np.int64)
    return numbers[keep], lines.filter(pa.array(keep)), undecodable


def _vectorised_interactions(layout: L.Layout, lines: pa.StringArray):
    """(accepted mask [n], table of accepted rows): rows the strict parser would take as is."""
    columns = layout.interaction_columns
    suspicious = pc.match_substring_regex(lines, _SUSPICIOUS)
    if layout.name == L.CSV:
        suspicious = pc.or_(suspicious, pc.match_substring(lines, '"'))
    suspicious = pc.or_(suspicious, pc.greater(pc.utf8_length(lines), MAX_LINE_CHARS))
    parts = pc.split_pattern(lines, layout.separator(L.INTERACTIONS))
    ok = pc.and_(pc.equal(pc.list_value_length(parts), len(columns)), pc.invert(suspicious))
    ok_np = ok.to_numpy(zero_copy_only=False)
    parts = parts.filter(ok)
    fields = {
        name: pc.utf8_trim_whitespace(pc.list_element(parts, i))
        for i, name in enumerate(columns)
        if not name.startswith("_ignored_")
    }
    user, item = fields["user_id"], fields["item_id"]
    good = pc.and_(
        pc.and_(pc.greater(pc.utf8_length(user), 0), pc.greater(pc.utf8_length(item), 0)),
        pc.and_(
            pc.less_equal(pc.utf8_length(user), MAX_ID_CHARS),
            pc.less_equal(pc.utf8_length(item), MAX_ID_CHARS),
        ),
    )
    if layout.name == L.CSV:  # the header repeated: let the strict parser name it
        header = pc.and_(pc.equal(user, "user_id"), pc.equal(item, "item_id"))
        good = pc.and_(good, pc.invert(header))
    numbers = {}
    for name in ("rating", "timestamp"):
        if name in fields:
            valid = pc.match_substring_regex(fields[name], _NUMBER)
            values = pc.cast(pc.if_else(valid, fields[name], "nan"), pa.float64())
            good = pc.and_(good, pc.and_(valid, pc.is_finite(values)))
            numbers[name] = values
        else:
            numbers[name] = pa.nulls(len(user), pa.float64()).fill_null(np.nan)
    table = pa.table(
        [user, item, numbers["rating"], numbers["timestamp"]], schema=INTERACTION_SCHEMA
    ).filter(good)
    good_np = good.to_numpy(zero_copy_only=False)
    accepted = ok_np.copy()
    accepted[np.flatnonzero(ok_np)[~good_np]] = False
    return accepted, table


class ParsedChunk(NamedTuple):
    """What one chunk yields: rows (a table or a list of records), dead letters, rows read."""

    rows: Any
    dead_letters: list[dict]
    rows_read: int


def parse_interactions(layout: L.Layout, chunk: Chunk, data: bytes) -> ParsedChunk:
    """One chunk of the interactions file -> an INTERACTION_SCHEMA table (NaN = no value)."""
    numbers, lines, undecodable = chunk_lines(layout, chunk, data)
    dead = [
        dead_letter(chunk.source, n, "undecodable", f"not valid {layout.encoding}", raw)
        for n, raw in undecodable
    ]
    accepted, table = _vectorised_interactions(layout, lines)
    strict = []
    for index in np.flatnonzero(~accepted):
        line = lines[int(index)].as_py()
        raw = line.encode(layout.encoding, errors="replace")
        try:
            strict.append(layout.parse(L.INTERACTIONS, raw))
        except L.BadRow as bad:
            dead.append(dead_letter(chunk.source, int(numbers[index]), bad.reason, bad.detail, raw))
    if strict:
        table = pa.concat_tables([table, interactions_table(strict)]).combine_chunks()
    return ParsedChunk(table, dead, len(lines) + len(undecodable))


def parse_users(layout: L.Layout, chunk: Chunk, data: bytes | None) -> ParsedChunk:
    """One chunk of the users file -> [(source, line, raw, UserRow)], strictly, row by row."""
    if layout.name == L.PARQUET:
        numbered = _parquet_rows(chunk)
        undecodable = []
    else:
        numbers, lines, undecodable = chunk_lines(layout, chunk, data)
        numbered = [
            (int(n), line.encode(layout.encoding, errors="replace"))
            for n, line in zip(numbers, lines.to_pylist())
        ]
    rows, dead = [], [
        dead_letter(chunk.source, n, "undecodable", f"not valid {layout.encoding}", raw)
        for n, raw in undecodable
    ]
    for line, raw in numbered:
        try:
            rows.append((chunk.source, line, raw, layout.parse(L.USERS, raw)))
        except L.BadRow as bad:
            dead.append(dead_letter(chunk.source, line, bad.reason, bad.detail, raw))
    return ParsedChunk(rows, dead, len(numbered) + len(undecodable))


def _parquet_rows(chunk: Chunk) -> list[tuple[int, dict]]:
    import pyarrow.parquet as pq

    with FileSystems.open(chunk.source, compression_type="uncompressed") as f:
        rows = pq.ParquetFile(f).read_row_group(chunk.start).to_pylist()
    return list(enumerate(rows, start=chunk.first_line))


def parse_parquet_interactions(layout: L.Layout, chunk: Chunk) -> ParsedChunk:
    records, dead = [], []
    rows = _parquet_rows(chunk)
    for line, raw in rows:
        try:
            records.append(layout.parse(L.INTERACTIONS, raw))
        except L.BadRow as bad:
            dead.append(dead_letter(chunk.source, line, bad.reason, bad.detail, raw))
    return ParsedChunk(interactions_table(records), dead, len(rows))


def interactions_table(records: list[L.Interaction]) -> pa.Table:
    """Strictly parsed interactions as a table of INTERACTION_SCHEMA (missing numbers: NaN)."""
    return pa.table(
        {
            "user": [r.user_id for r in records],
            "item": [r.item_id for r in records],
            "rating": [np.nan if r.rating is None else r.rating for r in records],
            "timestamp": [np.nan if r.timestamp is None else r.timestamp for r in records],
        },
        schema=INTERACTION_SCHEMA,
    )


class _ParseChunkFn(beam.DoFn):
    """Chunk -> (bucket, rows of that bucket) + dead letters + (source, (read, valid, dead))."""

    def __init__(self, layout: L.Layout, role: str, num_buckets: int) -> None:
        self.layout, self.role, self.num_buckets = layout, role, num_buckets
        self.counters: dict[str, Any] = {}

    def process(self, chunk: Chunk):
        if self.role == L.INTERACTIONS:
            if self.layout.name == L.PARQUET:
                parsed = parse_parquet_interactions(self.layout, chunk)
            else:
                parsed = parse_interactions(self.layout, chunk, read_chunk(chunk))
            table = parsed.rows
            buckets = user_bucket(table.column("user").to_numpy(zero_copy_only=False),
                                  self.num_buckets)  # fmt: skip
            order = np.argsort(buckets, kind="stable")
            bounds = np.searchsorted(buckets[order], np.arange(self.num_buckets + 1))
            for bucket in range(self.num_buckets):
                if bounds[bucket + 1] > bounds[bucket]:
                    indices = pa.array(order[bounds[bucket]:bounds[bucket + 1]])
                    yield bucket, table.take(indices)
            valid = table.num_rows
        else:
            data = None if self.layout.name == L.PARQUET else read_chunk(chunk)
            parsed = parse_users(self.layout, chunk, data)
            rows = parsed.rows
            buckets = user_bucket([r[3].user_id for r in rows], self.num_buckets) if rows else []
            grouped: dict[int, list] = {}
            for bucket, row in zip(buckets, rows):
                grouped.setdefault(int(bucket), []).append(row)
            yield from sorted(grouped.items())
            valid = len(rows)
        for letter in parsed.dead_letters:
            reason = letter["reason"]
            if reason not in self.counters:
                self.counters[reason] = Metrics.counter("features", f"bad_rows_{reason}")
            self.counters[reason].inc()
            yield TaggedOutput(DEAD, letter)
        yield TaggedOutput(
            COUNTS, (chunk.source, (parsed.rows_read, valid, len(parsed.dead_letters)))
        )


class ReadLog(beam.PTransform):
    """One file -> {"rows": (bucket, rows), "dead_letters": dicts, "counts": per chunk}.

    Interactions come as INTERACTION_SCHEMA tables, users as lists of
    (source, line, raw, UserRow). The chunks are planned on one worker (a line count), then
    spread with a Reshuffle and parsed in parallel.
    """

    def __init__(
        self, layout: L.Layout, role: str, num_buckets: int, chunk_bytes: int = CHUNK_BYTES
    ) -> None:
        super().__init__()
        self.layout, self.role = layout, role
        self.num_buckets, self.chunk_bytes = num_buckets, chunk_bytes

    def expand(self, pbegin):
        parsed = (
            pbegin
            | "FilePath" >> beam.Create([self.layout.paths[self.role]])
            | "PlanChunks" >> beam.FlatMap(
                lambda _, layout, role, size: plan_chunks(layout, role, size),
                self.layout, self.role, self.chunk_bytes,
            )  # fmt: skip
            | "Spread" >> beam.Reshuffle()
            | "ParseChunks"
            >> beam.ParDo(_ParseChunkFn(self.layout, self.role, self.num_buckets)).with_outputs(
                DEAD, COUNTS, main="rows"
            )
        )
        return {"rows": parsed.rows, DEAD: parsed[DEAD], COUNTS: parsed[COUNTS]}

