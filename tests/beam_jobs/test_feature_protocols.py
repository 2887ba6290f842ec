"""Evaluation protocols and user-context features of the feature job: invariants per protocol."""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import pandas as pd
import pytest

from beam_jobs import bucket_records as B
from beam_jobs import context_features as C
from beam_jobs import features as job
from beam_jobs import splits as P
from recsys_cvae import spec as S
from recsys_cvae.config import ConfigError, FeaturesConfig
from recsys_cvae.datasets import layouts as L
from recsys_cvae.datasets.synthetic import write_synthetic
from tests.builders import read_feature_split


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    raw = write_synthetic(str(tmp_path_factory.mktemp("raw")), num_users=150, num_items=50,
                          seed=4)  # fmt: skip
    out = str(tmp_path_factory.mktemp("features"))
    config = FeaturesConfig(min_user_interactions=3, context_features=True,
                            recency_half_life_days=30.0)  # fmt: skip
    spec = job.build_features(raw, out, config, save_main_session=False, quiet=True)
    events = pd.read_csv(os.path.join(raw, "interactions.csv"), dtype={"user_id": str})
    times = {(u, i): t for u, i, t in zip(events.user_id, events.item_id, events.timestamp)}
    records = {split: read_feature_split(spec, split) for split in spec.splits}
    return spec, records, times


def by_user(records: list[dict]) -> dict[str, dict]:
    return {r["user_id"]: r for r in records}


def test_no_user_in_two_roles_and_no_target_in_its_fold_in(built):
    spec, records, _ = built
    for protocol, roles in spec.protocols.items():
        evaluation = [set(by_user(records[split])) for role, split in roles.items()
                      if role != "train"]  # fmt: skip
        if protocol in (S.STRONG, S.COLD_START):  # held-out users: unseen in training
            train = set(by_user(records[roles["train"]])) if "train" in roles else set()
            for users in evaluation:
                assert not users & train
        if len(evaluation) == 2 and protocol != S.WEAK:
            assert not evaluation[0] & evaluation[1]
        for split in roles.values():
            for r in records[split]:
                assert not set(r["history_item_ids"]) & set(r["target_item_ids"]), (split, r)


def test_weak_protocol_holds_out_items_of_the_same_users(built):
    spec, records, _ = built
    train = by_user(records["weak_train"])
    validation, test = by_user(records["weak_validation"]), by_user(records["weak_test"])
    assert set(validation) <= set(train) and set(test) <= set(train)
    assert len(test) > 0.8 * len(train)  # most users have a held-out item
    for user, r in test.items():
        # history = every other item: the training part plus the validation targets
        others = set(train[user]["history_item_ids"]) | set(
            validation.get(user, {}).get("target_item_ids", [])
        )
        assert set(r["history_item_ids"]) == others
        assert not set(r["target_item_ids"]) & set(train[user]["history_item_ids"])
    strong_users = {r["user_id"] for split in ("train", "validation", "test")
                    for r in records[split]}  # fmt: skip
    assert strong_users <= set(train)  # weak trains on every warm user


def test_temporal_targets_all_after_the_cut(built):
    spec, records, times = built
    cut = spec.counts["temporal_cut_timestamp"]
    all_times = sorted(times.values())
    share_before = sum(t < cut for t in all_times) / len(all_times)
    assert share_before == pytest.approx(0.8, abs=0.02)  # temporal_cut_quantile
    evaluated = 0
    for split in ("temporal_train", "temporal_validation", "temporal_test"):
        for r in records[split]:
            assert all(times[(r["user_id"], i)] < cut for i in r["history_item_ids"])
            assert all(times[(r["user_id"], i)] >= cut for i in r["target_item_ids"])
            evaluated += bool(r["target_item_ids"])
    assert evaluated == spec.splits["temporal_validation"].users + spec.splits[
        "temporal_test"].users > 0


def test_context_features_are_declared_and_nan_for_cold_users(built):
    spec, records, _ = built
    context = [a for a in spec.attributes if a.source == "context"]
    assert [a.name for a in context] == C.context_names(has_rating=True, has_timestamp=True)
    assert all(a.kind == S.NUMERIC and a.std > 0 for a in context)
    for r in records[S.COLD]:
        assert all(math.isnan(r[a.name]) for a in context)
    for r in records[S.TRAIN]:
        parts = [r[f"ctx_share_{p}"] for p in C.DAY_PARTS]
        days = [r[f"ctx_share_{d}"] for d in C.WEEKDAYS]
        assert sum(parts) == pytest.approx(1.0, abs=1e-5) == sum(days)
        assert r["ctx_tenure_days"] >= r["ctx_recency_days"] >= 0
    trains = [r["ctx_events_log1p"] for r in records[S.TRAIN]]
    assert spec.attribute("ctx_events_log1p").mean == pytest.approx(np.mean(trains), rel=1e-5)


def test_recency_weights_align_with_histories(built):
    spec, records, times = built
    assert spec.history_weights and "history_weights" in spec.parse_spec()
    latest, cut = max(times.values()), spec.counts["temporal_cut_timestamp"]
    for split in ("train", "weak_test", "temporal_train"):
        for r in records[split][:20]:
            now = cut if split.startswith("temporal") else latest
            expected = [0.5 ** ((now - times[(r["user_id"], i)]) / (30 * 86400))
                        for i in r["history_item_ids"]]  # fmt: skip
            assert r["history_weights"] == pytest.approx(expected, rel=1e-6)
    assert all(r["history_weights"] == [] for r in records[S.COLD])


def test_user_context_by_hand():
    # User 0: events at Thu 1970-01-01 01:00 (night) and Fri 13:00 (afternoon), ratings 4 and 2,
    # 3 log rows in all; user 1 has only an invisible event: unknown (NaN).
    day, hour = 86400.0, 3600.0
    table = C.user_context(
        user=np.array([0, 0, 1]), events=np.array([2.0, 1.0, 1.0]),
        rating=np.array([4.0, 2.0, 5.0]), timestamp=np.array([hour, day + 13 * hour, 0.0]),
        visible=np.array([True, True, False]), num_users=2, now=3 * day,
        names=C.context_names(True, True),
    )  # fmt: skip
    row = dict(zip(C.context_names(True, True), table[0]))
    assert row[C.EVENTS] == pytest.approx(math.log(4.0))
    assert row[C.TENURE] == pytest.approx(3 - 1 / 24) and row[C.RECENCY] == pytest.approx(
        3 - 1 - 13 / 24
    )
    assert row[C.MEAN_RATING] == 3.0
    assert (row["ctx_share_night"], row["ctx_share_afternoon"]) == (0.5, 0.5)
    assert (row["ctx_share_thu"], row["ctx_share_fri"], row["ctx_share_mon"]) == (0.5, 0.5, 0.0)
    assert np.isnan(table[1]).all()


def test_bucket_examples_for_one_user_by_hand():
    # One user with 10 items at times 0..9; cut at 7: temporal history 0..6, targets 7..9.
    items = np.array([f"i{t}" for t in range(10)], dtype=object)
    bucket = P.BucketEvents(
        users=np.array(["u"], dtype=object), items=items, user=np.zeros(10, np.int64),
        item_code=np.arange(10),
        rating=np.full(10, 4.0), timestamp=np.arange(10.0), events=np.ones(10),
        positive=np.ones(10, bool), profiles={"u": {"plan": "free"}},
    )  # fmt: skip
    config = FeaturesConfig(min_user_interactions=2, target_fraction=0.3)
    examples = list(B.bucket_examples(
        bucket, frozenset(items[:9]), config, list(P.ALL_PROTOCOLS), {"now": 9.0, "cut": 7.0}, []
    ))  # fmt: skip
    splits = {e.split: e for e in examples}
    kept = [f"i{t}" for t in range(9)]  # i9 is not in the vocabulary
    temporal = [e for e in examples if e.split.startswith("temporal_") and e.targets]
    assert splits["temporal_train"].history == kept[:7]
    assert len(temporal) == 1 and temporal[0].history == kept[:7] and temporal[0].targets == [
        "i7", "i8"
    ]
    weak = splits["weak_train"].history
    assert sorted(weak + splits["weak_test"].targets + splits.get(
        "weak_validation", P.UserExample("", "", [], [], {})).targets) == sorted(kept)
    strong = next(e for e in examples if e.split in (S.TRAIN, S.VALIDATION, S.TEST, S.COLD))
    assert sorted(strong.history + strong.targets) == sorted(kept)
    assert all(e.attributes == {"plan": "free"} for e in examples)


def test_protocols_are_config(tmp_path):
    (tmp_path / "interactions.csv").write_text("user_id,item_id,rating\nu1,i1,4\n")
    (tmp_path / "users.csv").write_text("user_id,plan\nu1,free\n")
    layout = L.detect_layout(str(tmp_path))
    assert job.choose_protocols(FeaturesConfig(), layout) == ["strong", "weak", "cold"]
    assert job.choose_protocols(FeaturesConfig(protocols=["cold", "weak"]), layout) == [
        "weak", "cold"
    ]
    with pytest.raises(ConfigError, match="temporal protocol needs a timestamp column"):
        job.choose_protocols(FeaturesConfig(protocols=["temporal"]), layout)
    with pytest.raises(ConfigError, match=r"features.protocols names \['random'\]"):
        job.choose_protocols(FeaturesConfig(protocols=["random"]), layout)


def test_without_attributes_there_is_no_cold_protocol(tmp_path):
    (tmp_path / "interactions.csv").write_text("user_id,item_id\nu1,i1\n")
    layout = L.detect_layout(str(tmp_path))
    assert job.choose_protocols(FeaturesConfig(), layout) == ["strong", "weak"]
    with pytest.raises(ConfigError, match="the cold protocol needs user attributes"):
        job.choose_protocols(FeaturesConfig(protocols=["cold"]), layout)


def test_only_the_chosen_protocols_are_written(tmp_path):
    raw = write_synthetic(str(tmp_path / "raw"), num_users=40, num_items=20, seed=1)
    config = dataclasses.replace(FeaturesConfig(min_user_interactions=2), protocols=["temporal"])
    spec = job.build_features(raw, str(tmp_path / "f"), config, save_main_session=False,
                              quiet=True)  # fmt: skip
    assert spec.protocol == "temporal" and list(spec.protocols) == ["temporal"]
    assert sorted(spec.splits) == ["temporal_test", "temporal_train", "temporal_validation"]
    assert sorted(os.listdir(tmp_path / "f")) == [
        "dead_letters", "feature_spec.json", "job_summary.json", "temporal_test",
        "temporal_train", "temporal_validation", "vocab",
    ]  # fmt: skip
