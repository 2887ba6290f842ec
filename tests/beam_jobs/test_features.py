"""The Beam feature job: its PTransforms on hand-made rows, then whole runs on tiny folders."""

from __future__ import annotations

import dataclasses
import glob
import json
import os

import apache_beam as beam
import pyarrow as pa
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from beam_jobs import feature_reading
from beam_jobs import feature_stats as F
from beam_jobs import features as job
from beam_jobs import splits as P
from beam_jobs.example_encoding import ExampleEncoder
from beam_jobs.feature_buckets import prepare_bucket
from beam_jobs.feature_reading import DEAD, INTERACTION_SCHEMA, ReadLog
from recsys_cvae import spec as S
from recsys_cvae import user_records as UR
from recsys_cvae.config import ConfigError, FeaturesConfig
from recsys_cvae.datasets import layouts as L
from recsys_cvae.datasets.synthetic import write_synthetic
from tests.builders import read_feature_split


def write_csv_folder(directory, interactions: str, users: str | None = None) -> str:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "interactions.csv"), "w") as f:
        f.write(interactions)
    if users is not None:
        with open(os.path.join(directory, "users.csv"), "w") as f:
            f.write(users)
    return str(directory)


# ---- hashing, splits, hold-out ----------------------------------------------------------------


def test_split_assignment_is_deterministic_and_follows_the_fractions():
    config = FeaturesConfig(validation_fraction=0.2, test_fraction=0.2, cold_fraction=0.1,
                            min_user_interactions=1)  # fmt: skip
    users = [f"u{i}" for i in range(4000)]
    splits = [P.assign_split(u, 10, config) for u in users]
    assert splits == [P.assign_split(u, 10, config) for u in users]
    share = {name: splits.count(name) / len(users) for name in S.SPLITS}
    # Expected 0.5 / 0.2 / 0.2 / 0.1; 4000 users keep each share within ~0.02 (3 sigma).
    assert share[S.TRAIN] == pytest.approx(0.5, abs=0.03)
    assert share[S.VALIDATION] == pytest.approx(0.2, abs=0.03)
    assert share[S.TEST] == pytest.approx(0.2, abs=0.03)
    assert share[S.COLD] == pytest.approx(0.1, abs=0.03)
    # Another seed reshuffles the users.
    other = [P.assign_split(u, 10, dataclasses.replace(config, seed=7)) for u in users]
    assert other != splits


def test_split_rules_for_light_users():
    config = FeaturesConfig(validation_fraction=0.9, test_fraction=0.0, cold_fraction=0.0,
                            min_user_interactions=3)  # fmt: skip
    users = [f"u{i}" for i in range(50)]
    assert {P.assign_split(u, 0, config) for u in users} == {S.COLD}  # no items at all
    assert {P.assign_split(u, 2, config) for u in users} == {S.COLD}  # below the minimum
    # An evaluation user needs a fold-in and a target item: with one item -> train.
    single = dataclasses.replace(config, min_user_interactions=1)
    assert {P.assign_split(u, 1, single) for u in users} == {S.TRAIN}
    assert {P.assign_split(u, 3, single) for u in users} == {S.TRAIN, S.VALIDATION}


def test_hold_out_keeps_one_of_each_and_the_order():
    config = FeaturesConfig(target_fraction=0.2)
    items = [f"i{n}" for n in range(1000)]
    history, targets = P.hold_out("u1", items, config)
    assert sorted(history + targets) == sorted(items) and not set(history) & set(targets)
    assert history == [i for i in items if i in set(history)]  # order preserved
    assert len(targets) == pytest.approx(200, abs=45)  # binomial(1000, 0.2): sd ~13
    assert P.hold_out("u1", items, config) == (history, targets)
    for n in (2, 3):  # whatever the hashes say, one target and one fold-in item at least
        for user in ("a", "b", "c", "d"):
            h, t = P.hold_out(user, items[:n], dataclasses.replace(config, target_fraction=0.99))
            assert len(h) >= 1 and len(t) >= 1 and len(h) + len(t) == n


# ---- PTransforms on a TestPipeline ------------------------------------------------------------


def interaction_table(rows) -> pa.Table:
    return pa.table(
        {name: list(column) for name, column in zip(INTERACTION_SCHEMA.names, zip(*rows))},
        schema=INTERACTION_SCHEMA,
    )


def test_read_log_buckets_rows_and_dead_letters_in_chunks(tmp_path):
    data = write_csv_folder(
        tmp_path / "raw",
        "user_id,item_id,rating,timestamp\n"
        "u1,i1,5,100\nu1,i2,five,101\nu2,i1,4\n,i3,1,102\nu2,i2,3,7\n",
    )
    layout = L.detect_layout(data)
    with BeamTestPipeline() as p:
        # 16-byte chunks: every row in a chunk of its own, line numbers still right.
        read = p | ReadLog(layout, L.INTERACTIONS, num_buckets=4, chunk_bytes=16)
        rows = read["rows"] | beam.FlatMap(
            lambda kv: [(kv[0], *row.values()) for row in kv[1].to_pylist()]
        )
        expected_buckets = feature_reading.user_bucket(["u1", "u2"], 4)
        assert_that(rows, equal_to([
            (expected_buckets[0], "u1", "i1", 5.0, 100.0),
            (expected_buckets[1], "u2", "i2", 3.0, 7.0),
        ]), label="Rows")  # fmt: skip
        dead = read[DEAD] | beam.Map(lambda d: (d["line"], d["reason"]))
        assert_that(
            dead,
            equal_to([(3, "bad_rating"), (4, "wrong_field_count"), (5, "empty_user_id")]),
            label="DeadLetters",
        )
        totals = read["counts"] | beam.Map(lambda c: c[1]) | beam.CombineGlobally(
            lambda counts: tuple(map(sum, zip(*counts))) if counts else (0, 0, 0)
        )
        assert_that(totals, equal_to([(5, 2, 3)]), label="Counts")  # read = valid + dead


def test_prepare_bucket_merges_duplicates_and_profiles():
    table = interaction_table([
        ("u1", "i1", 2.0, 100.0),
        ("u1", "i1", 5.0, 300.0),  # the later opinion of i1 wins
        ("u1", "i2", 5.0, 200.0),
        ("u1", "i3", 1.0, 50.0),  # below min_rating: not a positive
        ("u9", "i2", 4.0, 10.0),  # not in the users table: unknown attributes
    ])  # fmt: skip
    profiles = [
        ("users.csv", 2, b"u1,30", L.UserRow("u1", {"age": "30"})),
        ("users.csv", 3, b"u2,40", L.UserRow("u2", {"age": "40"})),
        ("users.csv", 4, b"u1,99", L.UserRow("u1", {"age": "99"})),
    ]
    bucket, letters = prepare_bucket([table], profiles, min_rating=3.0)
    assert bucket.users.tolist() == ["u1", "u2", "u9"]
    # Sorted by (user, timestamp, item): u1's i3 (50), i2 (200), i1 (300); then u9.
    assert list(zip(bucket.user, bucket.item, bucket.rating, bucket.events)) == [
        (0, "i3", 1.0, 1.0), (0, "i2", 5.0, 1.0), (0, "i1", 5.0, 2.0), (2, "i2", 4.0, 1.0),
    ]  # fmt: skip
    assert bucket.positive.tolist() == [False, True, True, True]
    assert bucket.profiles == {"u1": {"age": "30"}, "u2": {"age": "40"}}  # first row wins
    assert [(d["line"], d["reason"]) for d in letters] == [(4, "duplicate_user_id")]


def test_filter_items_reaches_the_fixed_point():
    def bucket(rows):
        return prepare_bucket([interaction_table(rows)], [], None)[0]

    # u1 {a, b}, u2 {a, c}, u3 {b}, u4 {a, b, d}; at least 2 per user and per item.
    # Round 1: u3 is too light -> a 3, b 2, c 1, d 1 -> keep {a, b}.
    # Round 2: u2 now has only a -> out; a 2, b 2 -> keep {a, b}: nothing changed, done.
    first = bucket([("u1", "a", 1.0, 1.0), ("u1", "b", 1.0, 2.0), ("u2", "a", 1.0, 1.0),
                    ("u2", "c", 1.0, 2.0)])  # fmt: skip
    second = bucket([("u3", "b", 1.0, 1.0), ("u4", "a", 1.0, 1.0), ("u4", "b", 1.0, 2.0),
                     ("u4", "d", 1.0, 3.0)])  # fmt: skip
    with BeamTestPipeline() as p:
        state = p | beam.Create([(0, first), (1, second)]) | F.FilterItems(2, 2, max_rounds=4)
        assert_that(
            state, equal_to([F.FilterState(frozenset("ab"), {"a": 2, "b": 2}, True, 2)])
        )
    assert F.item_vocabulary(F.FilterState(None, {"b": 2, "a": 2, "c": 5}, True, 1)) == [
        "c", "a", "b"
    ]  # most interacted first, ties by id


def test_bucket_summaries_decide_kinds_and_vocabularies(tmp_path):
    layout = L.detect_layout(
        write_csv_folder(tmp_path / "raw", "user_id,item_id\nu1,i1\n", "user_id,age,plan,zip\n")
    )

    def bucket(profiles):
        rows = [("f", n, b"", L.UserRow(u, a)) for n, (u, a) in enumerate(profiles)]
        return prepare_bucket([], rows, None)[0]

    buckets = [
        bucket([("u1", {"age": "30", "plan": "free", "zip": "02139"}),
                ("u2", {"age": "", "plan": "free", "zip": "10001"})]),
        bucket([("u3", {"age": "41.5", "plan": "paid", "zip": "10001"})]),
    ]
    with BeamTestPipeline() as p:
        merged = (
            p
            | beam.Create(buckets)
            | beam.Map(F.bucket_summary, layout.attributes)
            | beam.CombineGlobally(F.MergeSummariesFn())
        )
        decided = merged | beam.Map(
            lambda s: (kinds := F.decide_kinds(s["scanned"], layout),
                       F.attribute_vocabularies(s["values"], kinds))
        )  # fmt: skip
        assert_that(decided, equal_to([
            ({"age": "numeric", "plan": "categorical", "zip": "categorical"},
             {"plan": ["free", "paid"], "zip": ["10001", "02139"]})
        ]))  # fmt: skip


def test_numeric_statistics_merge_in_bucket_order():
    examples = [
        P.UserExample(S.TRAIN, "u1", [], [], {"age": "20"}),
        P.UserExample(S.TRAIN, "u2", [], [], {"age": "40"}),
        P.UserExample(S.TRAIN, "u3", [], [], {"age": "", "ctx": float("nan")}),  # unknown
    ]
    kinds = {"age": "numeric", "ctx": "numeric"}
    sums = [(1, F.numeric_sums(examples[1:], kinds)), (0, F.numeric_sums(examples[:1], kinds))]
    # mean (20 + 40) / 2 = 30; population std sqrt((100 + 100) / 2) = 10
    assert F.mean_std(sums) == {"age": (30.0, 10.0)}
    assert F.mean_std([(0, {"x": (2, 10.0, 50.0)})]) == {"x": (5.0, 1.0)}  # constant -> 1.0


def test_numeric_boundaries_are_the_training_quantiles_without_empty_buckets():
    ages = [float(a) for a in range(1, 101)]  # 1..100
    kinds = {"age": "numeric", "decade": "numeric", "flat": "numeric"}
    examples = [
        P.UserExample(S.TRAIN, f"u{a:g}", [], [],
                      {"age": a, "decade": 10 * (a // 50), "flat": 7.0})
        for a in ages
    ]
    halves = [(0, F.numeric_sums(examples[:30], kinds)), (1, F.numeric_sums(examples[30:], kinds))]
    boundaries = F.numeric_boundaries(halves, 4)
    # The 1/4, 2/4, 3/4 quantiles of 1..100, however the users fall into buckets.
    assert boundaries["age"] == [25.0, 50.0, 75.0]
    assert boundaries == F.numeric_boundaries(list(reversed(halves)), 4)
    # Values 0, 10, 20 (decades): repeated quantiles collapse, none at the minimum.
    assert boundaries["decade"] == [10.0]
    assert boundaries["flat"] == []  # a constant has nothing to cut
    assert F.numeric_boundaries(halves, 0) == {}


def test_example_encoder_matches_protobuf_bytes():
    attributes = [
        S.AttributeSpec("age", "numeric"),
        S.AttributeSpec("plan", "categorical", vocabulary_file="vocab/attr_plan.txt"),
        S.AttributeSpec("ctx_events_log1p", "numeric", source="context"),
    ]
    encoder = ExampleEncoder(attributes)
    cases = [
        ("u1", ["i1", "i2"], [], {"age": "31", "plan": "free"}),
        ("ü" * 200, [], ["i" * 300], {"age": "", "ctx_events_log1p": float("nan")}),
        ("u3", [f"i{n}" for n in range(300)], ["x"], {"plan": None, "age": 1e30}),
    ]
    for case in cases:
        assert encoder.encode(*case) == UR.encode_user_example(attributes, *case)
        for weights in ([], [0.25] * len(case[1])):  # optional recency weights
            assert encoder.encode(*case, weights) == UR.encode_user_example(
                attributes, *case, weights
            )

# ---- whole job ------------------------------------------------------------------------------


SMALL = FeaturesConfig(min_user_interactions=3, cold_fraction=0.1)


def test_job_on_synthetic_data(tmp_path):
    data = write_synthetic(str(tmp_path / "raw"), num_users=120, num_items=40, seed=3)
    out = str(tmp_path / "features")
    spec = job.build_features(data, out, SMALL, quiet=True)

    assert spec.layout == "csv" and spec.seed == SMALL.seed and spec.protocol == S.STRONG
    assert spec.attribute_names == ["age", "region", "device", "plan"]
    assert spec.attribute("age").kind == "numeric" and spec.attribute("plan").is_categorical
    assert sorted(spec.attribute_vocabulary("plan")) == ["free", "premium"]
    assert spec.protocols == {
        "strong": {"train": "train", "validation": "validation", "test": "test"},
        "weak": {"train": "weak_train", "validation": "weak_validation", "test": "weak_test"},
        "temporal": {"train": "temporal_train", "validation": "temporal_validation",
                     "test": "temporal_test"},
        "cold": {"test": "cold"},
    }  # fmt: skip
    counts = spec.counts
    assert counts["rows_read"] == counts["rows_valid"] + counts["rows_dead_lettered"]
    interaction_rows = sum(1 for _ in open(os.path.join(data, "interactions.csv"))) - 1
    assert counts["rows_read"] == interaction_rows + 120  # every data row of both files
    assert counts["rows_dead_lettered"] == 0
    strong = [S.TRAIN, S.VALIDATION, S.TEST, S.COLD]
    assert counts["users"] == 120 == sum(counts["users_per_split"][s] for s in strong)
    items = spec.item_vocabulary()
    assert len(items) == spec.num_items == counts["items"] and len(set(items)) == len(items)

    seen: set[str] = set()
    for split in strong:
        records = read_feature_split(spec, split)
        assert len(records) == spec.splits[split].users == counts["users_per_split"][split]
        ids = {r["user_id"] for r in records}
        assert not ids & seen, f"users in two splits: {ids & seen}"
        seen |= ids
        for r in records:
            assert not set(r["history_item_ids"]) & set(r["target_item_ids"])
            assert set(r["history_item_ids"] + r["target_item_ids"]) <= set(items)
            if split == S.TRAIN:
                assert r["target_item_ids"] == [] and len(r["history_item_ids"]) >= 3
            elif split == S.COLD:
                assert r["history_item_ids"] == []
            else:
                assert r["history_item_ids"] and r["target_item_ids"]
    assert len(seen) == 120
    assert all(counts["users_per_split"][split] > 0 for split in spec.splits)
    for split in spec.splits:  # shards sized for the data: one per ~50k users here
        assert len(glob.glob(spec.split_pattern(split))) == 1


def test_job_is_deterministic(tmp_path):
    """Two runs, the second with two threads (other bundles, other orders): same bytes."""
    data = write_synthetic(str(tmp_path / "raw"), num_users=60, num_items=30, seed=5)
    config = dataclasses.replace(SMALL, context_features=True)
    job.build_features(data, str(tmp_path / "a"), config, quiet=True)
    threads = ["--direct_num_workers=2", "--direct_running_mode=multi_threading"]
    job.build_features(data, str(tmp_path / "b"), config, threads, quiet=True)
    a, b = feature_files(str(tmp_path / "a")), feature_files(str(tmp_path / "b"))
    assert len(a) > 10 and a.keys() == b.keys() and a == b


def test_bad_rows_become_dead_letters_and_filters_apply(tmp_path):
    data = write_csv_folder(
        tmp_path / "raw",
        "user_id,item_id,rating,timestamp\n"
        "u1,i1,5,1\nu1,i2,5,2\nu1,i3,1,3\n"  # i3 is below min_rating
        "u2,i1,4,1\nu2,i2,4,2\n"
        "u3,i1,4,1\nu3,i2,abc,2\n",  # line 8: a bad rating
        "user_id,plan\nu1,free\nu2,paid\nu3,free\nu4,free\nu2,free\n",  # u4: no interactions
    )
    out = str(tmp_path / "features")
    spec = job.run(
        ["--data-dir", data, "--output-dir", out, "--set", "features.min_rating=4",
         "--set", "features.min_user_interactions=1", "--set", "features.max_bad_fraction=0.2"]
    )  # fmt: skip
    counts = spec.counts
    # 7 interaction rows + 5 user rows read; bad: line 8 of interactions, line 6 of users.
    assert (counts["rows_read"], counts["rows_valid"], counts["rows_dead_lettered"]) == (12, 10, 2)
    letters = [
        json.loads(line)
        for path in glob.glob(os.path.join(out, DEAD, "*.jsonl"))
        for line in open(path)
    ]
    assert sorted((os.path.basename(d["source"]), d["line"], d["reason"]) for d in letters) == [
        ("interactions.csv", 8, "bad_rating"),
        ("users.csv", 6, "duplicate_user_id"),
    ]
    assert {d["raw"] for d in letters} == {"u3,i2,abc,2", "u2,free"}
    users = {r["user_id"]: r for split in S.SPLITS for r in read_feature_split(spec, split)}
    assert counts["files"][os.path.join(data, "users.csv")]["rows_valid"] == 4
    assert sorted(users) == ["u1", "u2", "u3", "u4"]
    everything = {u: set(r["history_item_ids"] + r["target_item_ids"]) for u, r in users.items()}
    assert everything == {"u1": {"i1", "i2"}, "u2": {"i1", "i2"}, "u3": {"i1"}, "u4": set()}
    assert users["u4"]["history_item_ids"] == [] and spec.splits[S.COLD].users >= 1
    assert users["u2"]["plan"] == "paid"  # the first profile row wins
    assert spec.item_vocabulary() == ["i1", "i2"]  # i1: 3 users, i2: 2 users


def test_too_many_bad_rows_is_refused(tmp_path):
    data = write_csv_folder(
        tmp_path / "raw",
        "user_id,item_id,rating\nu1,i1,5\nu1,i2,x\nu2,i1,y\nu2,i2,4\n",
    )
    out = str(tmp_path / "features")
    with pytest.raises(L.InputError) as error:
        job.build_features(data, out, FeaturesConfig(max_bad_fraction=0.25), quiet=True)
    message = str(error.value)
    assert "\n" not in message
    assert "interactions.csv: 2 of 4 rows are bad (50.0%" in message
    assert "commonest reason bad_rating (2 rows), e.g. line 3: 'u1,i2,x'" in message
    assert not os.path.exists(os.path.join(out, S.SPEC_FILE))


def test_config_and_layout_errors(tmp_path):
    data = write_csv_folder(tmp_path / "raw", "user_id,item_id\nu1,i1\n")
    with pytest.raises(ConfigError, match="must be < 1"):
        job.build_features(data, str(tmp_path / "f"), FeaturesConfig(test_fraction=0.95))
    with pytest.raises(L.InputError, match="min_rating is set but there is no rating column"):
        job.build_features(data, str(tmp_path / "f"), FeaturesConfig(min_rating=3.0))


def feature_files(out: str) -> dict[str, bytes]:
    """Every file the job wrote except the dead letters (Beam names those shards at random)."""
    paths = [p for p in glob.glob(os.path.join(out, "**", "*"), recursive=True)
             if os.path.isfile(p) and f"{os.sep}{DEAD}{os.sep}" not in p]  # fmt: skip
    return {os.path.relpath(p, out): open(p, "rb").read() for p in paths}


@pytest.mark.slow  # ~25 s: two worker processes start; the rerun test below is the fast variant
def test_multi_processing_runner_writes_identical_files(tmp_path):
    data = write_synthetic(str(tmp_path / "raw"), num_users=60, num_items=30, seed=5)
    flags = ["--data-dir", data, "--set", "features.min_user_interactions=3",
             "--set", "features.context_features=true"]  # fmt: skip
    job.run([*flags, "--output-dir", str(tmp_path / "a")], save_main_session=False)
    job.run(
        [*flags, "--output-dir", str(tmp_path / "b"), "--", "--direct_num_workers=2",
         "--direct_running_mode=multi_processing"],
        save_main_session=False,
    )  # fmt: skip
    a, b = feature_files(str(tmp_path / "a")), feature_files(str(tmp_path / "b"))
    assert len(a) > 10 and a == b


def test_job_on_ml_100k_records_the_zip_region_derivation(tmp_path):
    """u.user holds zip_code; the spec says zip_region derives from it, the records hold it."""
    raw = tmp_path / "raw"
    raw.mkdir()
    zips = ["55105", "e1a 2b3", "", "94110", "T8H1N", "02139"] * 5
    (raw / "u.user").write_text("".join(
        f"{u}|{20 + u}|{'MF'[u % 2]}|writer|{z}\n" for u, z in enumerate(zips, start=1)
    ))  # fmt: skip
    (raw / "u.data").write_text("".join(
        f"{u}\t{(u + k) % 8 + 1}\t4\t{880000000 + 1000 * u + k}\n"
        for u in range(1, len(zips) + 1) for k in range(5)
    ))  # fmt: skip
    out = str(tmp_path / "features")
    config = dataclasses.replace(SMALL, protocols=["strong", "cold"])
    spec = job.build_features(str(raw), out, config, quiet=True)
    with open(os.path.join(out, S.SPEC_FILE)) as f:
        written = {a["name"]: a for a in json.load(f)["attributes"]}
    assert written["zip_region"]["derived_from"] == "zip_code"
    assert written["zip_region"]["derivation"] == "first_char_upper"
    assert "derived_from" not in written["gender"] and "derivation" not in written["age"]
    assert sorted(spec.attribute_vocabulary("zip_region")) == ["0", "5", "9", "E", "T"]
    assert [(i.name, i.attributes) for i in S.serving_inputs(spec)] == [
        ("age", ("age",)), ("gender", ("gender",)), ("occupation", ("occupation",)),
        ("zip_code", ("zip_region",)),
    ]  # fmt: skip
    by_user = {}
    for split in spec.splits:
        by_user.update({r["user_id"]: r["zip_region"] for r in read_feature_split(spec, split)})
    assert by_user == {str(u): z[:1].upper() for u, z in enumerate(zips, start=1)}
