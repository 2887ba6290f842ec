"""Reading raw logs in chunks: a malformed-input corpus, and the vectorised parser agreeing with
the strict one row for row."""

from __future__ import annotations

import glob
import json
import os
import random

import pandas as pd
import pytest

from beam_jobs import feature_reading as R
from beam_jobs import features as job
from recsys_cvae import spec as S
from recsys_cvae import user_records as UR
from recsys_cvae.config import FeaturesConfig
from recsys_cvae.datasets import layouts as L

# (bytes of one line, the reason it is dead-lettered or None when it is a good row)
CORPUS = [
    (b"\xef\xbb\xbfuser_id,item_id,rating,timestamp\r\n", "header"),  # BOM + CRLF header
    (b"u1,i1,5,100\r\n", None),  # CRLF
    (b"u1,i2,4\n", "wrong_field_count"),  # a missing field
    (b"u1,i3,4,101,x\n", "wrong_field_count"),  # an extra field
    (b",i4,4,102\n", "empty_user_id"),
    (b"u1, ,4,103\n", "empty_item_id"),
    (b"u1,i5,five,104\n", "bad_rating"),
    (b"u1,i6,NaN,105\n", "bad_rating"),
    (b"u1,i7,4,nan\n", "bad_timestamp"),
    (b"u1,i8,4,yesterday\n", "bad_timestamp"),
    (b"u" + b"x" * 300 + b",i9,4,106\n", "field_too_long"),  # an absurd id
    (b"u1,i10,4,1e999\n", "bad_timestamp"),  # infinite
    (b"\x00\x01\x02garbage,\x03,4,1\n", "binary_garbage"),
    (b"\xff\xfe\xfd,i1,4,1\n", "undecodable"),
    (b"u1;i11;4;107\n", "wrong_field_count"),  # the wrong delimiter
    (b"user_id,item_id,rating,timestamp\n", "repeated_header"),  # files concatenated
    (b"\xef\xbb\xbfu2,i1,3,108\n", None),  # ... with the second file's BOM
    (b"\n", "blank"),  # not a row at all
    (b'"u2","i2",3,109\n', None),  # quoted fields
    (b"u2,i3, 4 ,110\n", None),  # spaces around a value
    (b"u3,i1,2.5,111\n", None),
    (b"u3," + b"y" * 70_000 + b",4,1\n", "field_too_long"),  # an absurd row
    (b"u3,i2,4,112", None),  # no line break at the end of the file
]


def write_corpus(directory) -> str:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "interactions.csv"), "wb") as f:
        f.write(b"".join(line for line, _ in CORPUS))
    return str(directory)


def run_job(data: str, out: str, chunk_bytes: int | None = None) -> S.FeatureSpec:
    config = FeaturesConfig(max_bad_fraction=0.9, min_user_interactions=1)
    return job.build_features(data, out, config, save_main_session=False, quiet=True,
                              chunk_bytes=chunk_bytes)  # fmt: skip


def outputs(out: str) -> dict[str, bytes]:
    files = [p for p in glob.glob(os.path.join(out, "**", "*"), recursive=True)
             if os.path.isfile(p) and f"{os.sep}dead_letters{os.sep}" not in p]  # fmt: skip
    return {os.path.relpath(p, out): open(p, "rb").read() for p in files}


def test_malformed_corpus_every_case_dead_lettered_and_good_rows_kept(tmp_path):
    data = write_corpus(tmp_path / "raw")
    out = str(tmp_path / "features")
    spec = run_job(data, out)

    letters = [json.loads(line) for path in glob.glob(os.path.join(out, "dead_letters", "*"))
               for line in open(path)]  # fmt: skip
    found = {d["line"]: d["reason"] for d in letters}
    expected = {n: reason for n, (_, reason) in enumerate(CORPUS, start=1)
                if reason not in (None, "header", "blank")}  # fmt: skip
    assert found == expected
    assert all(len(d["raw"]) <= R.RAW_CHARS and d["source"].endswith("interactions.csv")
               for d in letters)  # fmt: skip
    counts = spec.counts
    good = sum(reason is None for _, reason in CORPUS)
    assert (counts["rows_read"], counts["rows_valid"], counts["rows_dead_lettered"]) == (
        good + len(expected), good, len(expected)
    )
    assert counts["rows_read"] == counts["rows_valid"] + counts["rows_dead_lettered"]
    file_reasons = counts["files"][os.path.join(data, "interactions.csv")]["reasons"]
    assert file_reasons["wrong_field_count"] == 3 and file_reasons["bad_timestamp"] == 3

    items = {}
    for split in spec.splits:
        for path in glob.glob(spec.split_pattern(split)):
            import tensorflow as tf

            for serialized in tf.data.TFRecordDataset(path, compression_type="GZIP"):
                r = UR.decode_user_example(serialized.numpy(), spec.attributes)
                if split in ("train", "validation", "test", "cold"):
                    items[r["user_id"]] = sorted(r["history_item_ids"] + r["target_item_ids"])
    assert items == {"u1": ["i1"], "u2": ["i1", "i2", "i3"], "u3": ["i1", "i2"]}

    # Chunks of a few bytes (every line its own chunk, line numbers counted across them)
    # give the same features and the same dead letters.
    small = str(tmp_path / "small")
    run_job(data, small, chunk_bytes=7)
    assert outputs(small) == outputs(out)
    small_letters = [json.loads(line) for path in glob.glob(os.path.join(small, "dead_letters",
                     "*")) for line in open(path)]  # fmt: skip
    assert sorted(map(json.dumps, small_letters)) == sorted(map(json.dumps, letters))


def test_vectorised_parse_agrees_with_the_strict_parser(tmp_path):
    rng = random.Random(0)
    pieces = ["u1", "i2", "4", "4.5", "-1e3", " 7 ", "", "x", "nan", "inf", ".5", "5.", "1_0",
              "\u00e9", "\u2003", '"q"', "user_id", "item_id", "1e400", "+3"]  # fmt: skip
    lines = [",".join(rng.choice(pieces) for _ in range(rng.choice([3, 4, 4, 4, 5])))
             for _ in range(3000)]  # fmt: skip
    (tmp_path / "interactions.csv").write_text(
        "user_id,item_id,rating,timestamp\n" + "\n".join(lines) + "\n", encoding="utf-8"
    )
    layout = L.detect_layout(str(tmp_path))
    expected_rows, expected_dead = [], []
    for line, raw in L.iter_raw_rows(layout, L.INTERACTIONS):
        try:
            r = layout.parse(L.INTERACTIONS, raw)
            expected_rows.append((r.user_id, r.item_id, r.rating, r.timestamp))
        except L.BadRow as bad:
            expected_dead.append((line, bad.reason))
    rows, dead = [], []
    for chunk in R.plan_chunks(layout, L.INTERACTIONS, chunk_bytes=4096):
        parsed = R.parse_interactions(layout, chunk, R.read_chunk(chunk))
        rows += [tuple(r.values()) for r in parsed.rows.to_pylist()]
        dead += [(d["line"], d["reason"]) for d in parsed.dead_letters]
    assert sorted(dead) == sorted(expected_dead) and len(dead) > 100
    assert sorted(rows) == sorted(expected_rows) and len(rows) > 100


def test_other_layouts_read_in_chunks(tmp_path):
    # MovieLens-100K is latin-1: any byte decodes, so garbage is caught as control characters.
    (tmp_path / "u.data").write_bytes(b"1\t10\t4\t100\n1\t\x00\x01\t4\t1\n2\t10\t5\t200\n")
    layout = L.detect_layout(str(tmp_path))
    (chunk,) = R.plan_chunks(layout, L.INTERACTIONS)
    parsed = R.parse_interactions(layout, chunk, R.read_chunk(chunk))
    assert parsed.rows.to_pylist() == [
        {"user": "1", "item": "10", "rating": 4.0, "timestamp": 100.0},
        {"user": "2", "item": "10", "rating": 5.0, "timestamp": 200.0},
    ]
    assert [(d["line"], d["reason"]) for d in parsed.dead_letters] == [(2, "binary_garbage")]

    parquet = tmp_path / "pq"
    parquet.mkdir()
    pd.DataFrame({"user_id": ["a", None], "item_id": ["x", "y"]}).to_parquet(
        parquet / "interactions.parquet"
    )
    layout = L.detect_layout(str(parquet))
    (chunk,) = R.plan_chunks(layout, L.INTERACTIONS)
    parsed = R.parse_parquet_interactions(layout, chunk)
    assert [r["user"] for r in parsed.rows.to_pylist()] == ["a"]
    assert [(d["line"], d["reason"]) for d in parsed.dead_letters] == [(2, "empty_user_id")]


@pytest.mark.parametrize("compressed", [False, True])
def test_plan_chunks_counts_lines_across_chunks(tmp_path, compressed):
    import gzip

    text = b"user_id,item_id\n" + b"".join(b"u%d,i%d\n" % (n, n) for n in range(1, 50))
    path = tmp_path / ("interactions.csv.gz" if compressed else "interactions.csv")
    path.write_bytes(gzip.compress(text) if compressed else text)
    layout = L.Layout("csv", str(tmp_path), {L.INTERACTIONS: str(path)},
                      ("user_id", "item_id"))  # fmt: skip
    chunks = list(R.plan_chunks(layout, L.INTERACTIONS, chunk_bytes=40))
    assert len(chunks) > 5 and b"".join(R.read_chunk(c) for c in chunks) == text
    for chunk in chunks:
        numbers, lines, _ = R.chunk_lines(layout, chunk, R.read_chunk(chunk))
        for number, line in zip(numbers, lines.to_pylist()):
            assert line == f"u{number - 1},i{number - 1}"  # line n holds u(n-1): header is 1
