"""Which files a data folder holds and how they are written: the layout's files (plain or
`.gz`), their compression from the bytes, and a MovieLens file's separator.

Why apart from `layouts`: these read the first bytes of files on any Beam file system before
a layout exists; `layouts` turns what they found into a `Layout` and parses rows.
"""

from __future__ import annotations

import os
import posixpath

from recsys_cvae.datasets import generic_tables, movielens
from recsys_cvae.datasets.errors import InputError
from recsys_cvae.datasets.generic_tables import PARQUET
from recsys_cvae.datasets.rows import INTERACTIONS

# Detection looks for the interactions file of each layout, in this order; every text file
# may also be gzipped under its name + ".gz".
FILE_NAMES = {**movielens.FILE_NAMES, **generic_tables.FILE_NAMES}
_GZIP_MAGIC = b"\x1f\x8b"


def sniff_compression(path: str) -> str:
    """`gzip` when the file starts with gzip's magic bytes, else `uncompressed`.

    Parquet files compress inside (their own pages), so they always read as `uncompressed`.
    """
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(path, compression_type="uncompressed") as f:
        return "gzip" if f.read(2) == _GZIP_MAGIC else "uncompressed"


def find_files(data_dir: str) -> tuple[str, dict[str, str]]:
    """The one layout whose interactions file `data_dir` holds, and its files that exist.

    Each file may be plain or gzipped under its name + ".gz" (`interactions.csv.gz`); a
    Parquet file under its own name only.
    """
    from apache_beam.io.filesystems import FileSystems

    if not FileSystems.exists(data_dir):
        raise InputError(f"{data_dir}: data directory not found")
    if "://" not in data_dir and not os.path.isdir(data_dir):
        raise InputError(f"{data_dir}: not a folder; expected the folder that holds the files")
    found = {
        name: {role: _variant(data_dir, name, f) for role, f in files.items()}
        for name, files in FILE_NAMES.items()
    }
    present = {name: files for name, files in found.items() if files[INTERACTIONS]}
    if not present:
        raise InputError(
            f"{data_dir}: no input layout recognised; expected u.data (MovieLens-100K), "
            "ratings.dat (MovieLens-1M), interactions.csv or interactions.parquet (generic), "
            "or a text one gzipped as <name>.gz"
        )
    if len(present) > 1:
        names = ", ".join(posixpath.basename(files[INTERACTIONS]) for files in present.values())
        raise InputError(f"{data_dir}: holds {names}; keep the files of one layout only")
    (name, candidates), = present.items()
    return name, {role: path for role, path in candidates.items() if path}


def _variant(data_dir: str, layout: str, file_name: str) -> str:
    """The path of `file_name` or `file_name.gz` in `data_dir`, "" when neither exists."""
    from apache_beam.io.filesystems import FileSystems

    names = [file_name] if layout == PARQUET else [file_name, file_name + ".gz"]
    existing = [join_path(data_dir, n) for n in names if FileSystems.exists(join_path(data_dir, n))]
    if len(existing) > 1:
        raise InputError(f"{data_dir}: holds both {file_name} and {file_name}.gz; keep one")
    return existing[0] if existing else ""


def check_movielens_file(path: str, compression: str, separator: str, columns) -> None:
    """A MovieLens file has no header: its first line must split into its columns.

    Raises:
      InputError: the file is empty, or its first line is split by another separator (a
        u.data rewritten with commas).
    """
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(path, compression_type=compression) as f:
        first = f.readline()
        while first and not first.strip():
            first = f.readline()
    text = first.decode(movielens.ENCODING).rstrip("\r\n").removeprefix("\ufeff")
    expected = f"{len(columns)} fields separated by {separator!r} ({', '.join(columns)})"
    if not text.strip():
        raise InputError(f"{path}: empty file; expected rows of {expected}")
    if len(text.split(separator)) == len(columns):
        return
    for other in (*generic_tables.SEPARATORS, "::"):
        if other != separator and len(text.split(other)) == len(columns):
            raise InputError(
                f"{path}: line 1 is separated by {other!r} ({text[:80]!r}); expected {expected}, "
                "as MovieLens writes it"
            )
    # Other mismatches are per-row problems: the dead letters name them line by line.


def join_path(directory: str, name: str) -> str:
    """`directory/name` on a local disk or any Beam file system (gs://...)."""
    from apache_beam.io.filesystems import FileSystems

    return FileSystems.join(directory, name) if "://" in directory else posixpath.join(
        directory, name
    )
