"""Baselines on a 4-user, 4-item toy matrix whose rankings can be worked out by hand.

    training users   region  plan     history
    t1               north   free     i1 i2
    t2               north   premium  i1 i2
    t3               south   free     i3 i4
    t4               south   premium  i1 i3

Popularity: i1 = 3, i2 = 2, i3 = 2, i4 = 1 (ties go to the earlier vocabulary item).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from recsys_cvae import candidates_format as C
from recsys_cvae import ranking as R
from recsys_cvae.baselines import build as B
from recsys_cvae.baselines import linear as Li
from recsys_cvae.baselines import rankings as Rk
from recsys_cvae.baselines import split_data as SD
from recsys_cvae.config import Config, EvaluateConfig
from recsys_cvae.histories import Histories
from recsys_cvae.model.ease import ease_from_gram
from tests.builders import write_toy_features

ITEMS = ["i1", "i2", "i3", "i4"]
TRAIN = [
    ("t1", ["i1", "i2"], [], {"region": "north", "plan": "free"}),
    ("t2", ["i1", "i2"], [], {"region": "north", "plan": "premium"}),
    ("t3", ["i3", "i4"], [], {"region": "south", "plan": "free"}),
    ("t4", ["i1", "i3"], [], {"region": "south", "plan": "premium"}),
]


@pytest.fixture(scope="module")
def toy_features(tmp_path_factory) -> str:
    directory = str(tmp_path_factory.mktemp("toy_features"))
    write_toy_features(
        directory,
        ITEMS,
        {"region": ["north", "south"], "plan": ["free", "premium"]},
        {
            "train": TRAIN,
            "validation": [
                ("v1", ["i1"], ["i2"], {"region": "north", "plan": "free"}),
                ("v2", ["i4"], ["i3"], {"region": "south", "plan": "free"}),
            ],
            "test": [
                ("w1", ["i1"], ["i2"], {"region": "north", "plan": "free"}),
                ("w2", ["i4"], ["i3"], {"region": "south", "plan": "premium"}),
            ],
            "cold": [("c1", [], ["i3"], {"region": "south", "plan": "free"})],
        },
    )
    return directory


def read(candidates_dir: str, name: str, split: str) -> dict[str, tuple[list, list]]:
    paths = C.split_files(candidates_dir, name, split)
    assert [os.path.basename(p) for p in paths] == [f"{split}-00000-of-00001.parquet"]
    assert pq.read_schema(paths[0]).equals(C.SCHEMA)
    rows = {}
    for user, ids, scores, model in C.iter_rows(paths):
        assert model == name
        rows[user] = (ids, scores)
    return rows


def test_top_k_skips_excluded_items_and_breaks_ties_by_index():
    scores = np.array([[3.0, 1.0, 2.0, 2.0]])
    order, best = R.top_unseen(scores, np.array([[False, False, True, False]]), k=3)
    assert order.tolist() == [[0, 3, 1]] and best.tolist() == [[3.0, 2.0, 1.0]]
    order, _ = R.top_unseen(scores, np.array([[True, False, True, False]]), k=5)
    assert order.tolist() == [[3, 1, -1, -1]]  # only 2 items left to recommend


def test_ease_weights_on_two_items_by_hand():
    # X = [[1, 1], [1, 0]]: G = XᵀX = [[2, 1], [1, 1]]
    # λ = 1: P = (G + I)⁻¹ = [[2, -1], [-1, 3]] / 5
    # B_ij = -P_ij / P_jj: B_01 = (1/5) / (3/5) = 1/3, B_10 = (1/5) / (2/5) = 1/2.
    weights = Li.ease_weights(np.array([[1, 1], [1, 0]], dtype=np.float32), l2=1.0)
    np.testing.assert_allclose(weights, [[0.0, 1 / 3], [1 / 2, 0.0]])


def test_popularity_ranks_by_training_counts_without_own_history(toy_features, tmp_path):
    out = str(tmp_path / "candidates")
    config = EvaluateConfig(splits=["test", "cold"])
    written = B.build_baselines(toy_features, out, Config(evaluate=config), 3, ["popularity"])
    assert written == ["popularity"]
    test = read(out, "popularity", "test")
    assert test["w1"] == (["i2", "i3", "i4"], [2.0, 2.0, 1.0])  # i1 is w1's history
    assert test["w2"] == (["i1", "i2", "i3"], [3.0, 2.0, 2.0])
    assert read(out, "popularity", "cold")["c1"] == (["i1", "i2", "i3"], [3.0, 2.0, 2.0])


def test_segment_popularity_picks_region_on_validation(toy_features, tmp_path):
    out = str(tmp_path / "candidates")
    config = EvaluateConfig(
        splits=["test", "cold"], selection_metric="ndcg@1", segment_prior_users=2.0
    )
    B.build_baselines(toy_features, out, Config(evaluate=config), k=4, names=["segment_popularity"])
    with open(os.path.join(out, "segment_popularity", B.PARAMS_FILE)) as f:
        params = json.load(f)["strong"]  # one entry per protocol
    # region puts v1's i2 and v2's i3 first (ndcg@1 = 1); plan misses v2 (i1 leads "free").
    assert params["attributes"] == ["region"]
    assert params["tried"]["region"] == 1.0 and params["tried"]["plan"] == 0.5
    # south = {t3, t4}, m = 2, global share = count / 4:
    #   i3 (2 + 2·2/4) / 4 = 0.75, i1 (1 + 2·3/4) / 4 = 0.625, i4 (1 + 2·1/4) / 4 = 0.375,
    #   i2 (0 + 2·2/4) / 4 = 0.25
    ids, scores = read(out, "segment_popularity", "cold")["c1"]
    assert ids == ["i3", "i1", "i4", "i2"]
    np.testing.assert_allclose(scores, [0.75, 0.625, 0.375, 0.25])


def test_ease_uses_co_occurrence_and_falls_back_to_popularity_for_cold(toy_features, tmp_path):
    out = str(tmp_path / "candidates")
    config = EvaluateConfig(splits=["test", "cold"], ease_lambdas=[1.0, 10.0])
    B.build_baselines(toy_features, out, Config(evaluate=config), k=3, names=["ease"])
    test = read(out, "ease", "test")
    # w1 saw i1, bought with i2 twice and i3 once (by t4), never with i4.
    assert test["w1"][0] == ["i2", "i3", "i4"]
    # w2 saw i4, bought only with i3 (by t3); popularity would have said i1.
    assert test["w2"][0][0] == "i3"
    assert read(out, "ease", "cold")["c1"] == (["i1", "i2", "i3"], [3.0, 2.0, 2.0])
    with open(os.path.join(out, "ease", B.PARAMS_FILE)) as f:
        params = json.load(f)["strong"]  # one entry per protocol
    assert params["l2"] in (1.0, 10.0) and set(params["tried"]) == {"1.0", "10.0"}


def test_unknown_baseline_is_named(toy_features, tmp_path):
    with pytest.raises(SD.BaselineError, match="unknown baseline.*'knn'"):
        B.build_baselines(toy_features, str(tmp_path), Config(), names=["knn"])


def test_item_knn_cosine_by_hand(toy_features, tmp_path):
    # Item columns: i1 {t1,t2,t4}, i2 {t1,t2}, i3 {t3,t4}, i4 {t3}.
    # cos(i1,i2) = 2/√6, cos(i1,i3) = 1/√6, cos(i3,i4) = 1/√2, all other pairs 0.
    history = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 1, 0]], np.float32)
    weights = Li.item_knn_weights(history, neighbours=0)
    np.testing.assert_allclose(weights[0], [0, 2 / np.sqrt(6), 1 / np.sqrt(6), 0], rtol=1e-6)
    np.testing.assert_allclose(weights[2, 3], 1 / np.sqrt(2), rtol=1e-6)
    # One neighbour per item: i3's closest is i4, so i1 no longer votes for i3.
    assert Li.item_knn_weights(history, neighbours=1)[0, 2] == 0.0
    out = str(tmp_path / "candidates")
    config = EvaluateConfig(splits=["test", "cold"], knn_neighbours=0)
    B.build_baselines(toy_features, out, Config(evaluate=config), k=3, names=["item_knn"])
    test = read(out, "item_knn", "test")
    assert test["w1"][0] == ["i2", "i3", "i4"]  # w1 saw i1
    assert test["w2"][0] == ["i3", "i1", "i2"]  # w2 saw i4; ties by vocabulary order
    assert read(out, "item_knn", "cold")["c1"][0] == ["i1", "i2", "i3"]  # popularity


def test_two_tower_writes_candidates_without_history_and_learns_on_synthetic(
    features_dir, tmp_path
):
    out = str(tmp_path / "candidates")
    config = EvaluateConfig(splits=["test", "cold"])
    names = ["two_tower", "popularity"]
    assert B.build_baselines(features_dir, out, Config(evaluate=config), k=20, names=names)
    from recsys_cvae import spec as S
    from recsys_cvae import user_records as UR
    from recsys_cvae.evaluation.evaluate import load_truth
    from recsys_cvae.metrics import score_rankings

    spec = S.FeatureSpec.load(features_dir)
    histories = {r[S.USER_ID]: set(r[S.HISTORY]) for r in UR.read_user_records(spec, "test")}
    rows = {u: ids for u, ids, _, _ in C.iter_rows(C.split_files(out, "two_tower", "test"))}
    assert set(rows) == set(histories)
    assert all(len(ids) == 20 and not set(ids) & histories[u] for u, ids in rows.items())
    with open(os.path.join(out, "two_tower", B.PARAMS_FILE)) as f:
        params = json.load(f)["strong"]
    # The epoch kept is the best of the validation curve (NDCG@10, history excluded).
    curve = params["validation_curve"]
    assert params["epochs"] == 1 + curve.index(max(curve))
    assert params["validation_ndcg@10"] == pytest.approx(max(curve), abs=1e-4)
    # The synthetic users' tastes follow their attributes: the towers must beat random
    # (expected recall@20 of a random list is about 20 / 120) and popularity.
    truth, _ = load_truth(spec, "test")
    recall = score_rankings(rows, truth, [20], spec.num_items)["recall@20"]
    assert recall > 2 * 20 / spec.num_items
    popular = {u: ids for u, ids, _, _ in C.iter_rows(C.split_files(out, "popularity", "test"))}
    assert recall > score_rankings(popular, truth, [20], spec.num_items)["recall@20"]
    # Deterministic for a seed: two (short) fits score alike.
    import dataclasses

    from recsys_cvae.baselines import two_tower as T

    index = {item: i for i, item in enumerate(spec.item_vocabulary())}
    train, validation, test = (
        SD.load_split(spec, split, index) for split in ("train", "validation", "test")
    )
    short = dataclasses.replace(T.SETTINGS, epochs=2)
    scores = [
        T._scorer(T.fit_two_tower(spec, train, validation, None, config, short)[0], spec)(
            test, slice(None)
        )
        for _ in range(2)
    ]
    np.testing.assert_array_equal(scores[0], scores[1])


def test_load_split_keeps_histories_sparse(toy_features):
    # CSR, not a dense users x items matrix: ML-20M's splits must fit in memory together.
    from recsys_cvae import spec as S

    spec = S.FeatureSpec.load(toy_features)
    train = SD.load_split(spec, "train", {item: i for i, item in enumerate(ITEMS)})
    assert isinstance(train.history, Histories) and train.history.shape == (4, 4)
    # t1..t4 as in the module docstring; popularity i1 = 3, i2 = 2, i3 = 2, i4 = 1.
    assert train.history.indptr.tolist() == [0, 2, 4, 6, 8]
    assert train.history.indices.tolist() == [0, 1, 0, 1, 2, 3, 0, 2]
    assert train.history.dense().astype(int).tolist() == [[1, 1, 0, 0], [1, 1, 0, 0],
                                                          [0, 0, 1, 1], [1, 0, 1, 0]]  # fmt: skip
    assert Li.popularity(train.history).tolist() == [3.0, 2.0, 2.0, 1.0]


def test_load_split_drops_unknown_items_and_counts_repeats_once(tmp_path):
    write_toy_features(
        str(tmp_path), ITEMS, {"region": ["north"]},
        {"train": [
            ("u1", ["i3", "zz", "i1", "i3", "i3"], [], {"region": "north"}),  # zz: unknown
            ("u2", ["zz"], [], {"region": "north"}),  # nothing known: an empty row
            ("u3", ["i4", "i2"], [], {"region": "north"}),
        ]},
    )  # fmt: skip
    from recsys_cvae import spec as S

    spec = S.FeatureSpec.load(str(tmp_path))
    train = SD.load_split(spec, "train", {item: i for i, item in enumerate(ITEMS)})
    # u1 = {i1, i3} (ascending indices, i3 once), u2 = {}, u3 = {i2, i4}.
    assert train.history.indptr.tolist() == [0, 2, 2, 4]
    assert train.history.indices.tolist() == [0, 2, 1, 3]
    assert train.history.lengths().tolist() == [2, 0, 2]
    assert Li.popularity(train.history).tolist() == [1.0, 1.0, 1.0, 1.0]  # i3 counted once


def _dense_reference_rankings(x, weights, global_scores, k):
    """What the baselines computed when histories were a dense bool matrix x (before CSR)."""
    scores = x.astype(np.float64) @ weights
    scores[x.sum(axis=1) == 0] = global_scores
    return R.top_unseen(scores, x > 0, k)


def test_sparse_histories_score_exactly_like_the_dense_matrix(monkeypatch):
    # Random 0/1 histories with empty rows; chunks of 7 users so rows cross chunk borders.
    monkeypatch.setattr(Rk, "CHUNK_USERS", 7)
    rng = np.random.default_rng(3)
    x = rng.random((40, 12)) < 0.25
    x[[0, 9, 33]] = False
    history = Histories.from_dense(x)
    assert history.dense().tolist() == x.tolist()
    assert history.dense(np.array([9, 2, 2]), np.float32).tolist() == x[[9, 2, 2]].tolist()
    dense_x = x.astype(np.float64)
    gram = dense_x.T @ dense_x
    np.testing.assert_array_equal(history.gram(), gram)  # integer counts: exact
    np.testing.assert_array_equal(Li.popularity(history), x.sum(axis=0, dtype=np.float64))
    np.testing.assert_array_equal(Li.ease_weights(history, 5.0), ease_from_gram(gram, 5.0))
    np.testing.assert_array_equal(Li.ease_weights(history, 5.0), Li.ease_weights(x, 5.0))
    knn = gram / np.outer(np.sqrt(x.sum(axis=0)), np.sqrt(x.sum(axis=0))).clip(min=1e-12)
    knn[np.diag_indices_from(knn)] = 0.0
    np.testing.assert_array_equal(Li.item_knn_weights(history, 0), knn)

    data = SD.SplitData([f"u{u}" for u in range(len(x))], history, {}, {})
    items = [f"i{i}" for i in range(x.shape[1])]
    global_scores = Li.popularity(history)
    for weights in (ease_from_gram(gram, 5.0), knn, np.zeros_like(gram)):
        ranked, scores = Rk.rankings(Li.ease_scorer(weights, global_scores), data, items, 5)
        order, best = _dense_reference_rankings(x, weights, global_scores, 5)
        assert ranked == [[items[i] for i in row if i >= 0] for row in order]
        assert scores == [row[row > -np.inf].tolist() for row in best]


def test_segment_popularity_sums_sparse_rows_like_dense_ones():
    from recsys_cvae.baselines.segment_popularity import SegmentPopularity

    rng = np.random.default_rng(4)
    x = rng.random((30, 9)) < 0.3
    regions = rng.choice(["north", "south", ""], size=30).tolist()  # "" = unknown
    train = SD.SplitData([str(u) for u in range(30)], Histories.from_dense(x), {},
                        {"region": regions})  # fmt: skip
    model = SegmentPopularity(train, ["region"], {"region": lambda v: v or None}, 2.0)
    share = x.sum(axis=0) / 30
    for region in ("north", "south"):
        members = x[[r == region for r in regions]]
        expected = (members.sum(axis=0) + 2.0 * share) / (len(members) + 2.0)
        row = regions.index(region)
        np.testing.assert_allclose(model.scores(train, slice(row, row + 1)).dense()[0],
                                   expected, rtol=1e-15)  # fmt: skip


def test_two_tower_leave_one_out_pools_other_items_and_multi_hot_equals_dense_rows():
    import dataclasses

    import tensorflow as tf

    from recsys_cvae.baselines import two_tower as T

    rng = np.random.default_rng(5)
    x = rng.random((20, 70)) < 0.5
    x[4] = False  # no history: no pairs
    x[7] = False
    x[7, 3] = True  # one item: one pair with nothing to pool
    history = Histories.from_dense(x)
    ragged = tf.RaggedTensor.from_row_splits(history.indices, history.indptr)
    rows = np.array([4, 0, 19, 0])
    np.testing.assert_array_equal(T._multi_hot(tf.gather(ragged, rows), 70).numpy(), x[rows])
    for cap, sample in ((0, 0), (0, 8), (5, 8)):
        settings = dataclasses.replace(
            T.SETTINGS, max_pairs_per_user=cap, history_sample=sample, cold_share=0.0
        )
        users, items, pooled = T.leave_one_out(history, settings, np.random.default_rng(0))
        pooled = pooled.to_list()
        for u in range(len(x)):
            mine = set(np.flatnonzero(x[u]).tolist())
            positives = items[users == u].tolist()
            # Every item once without a cap, `cap` distinct items of the user with one.
            assert len(set(positives)) == len(positives) == min(len(mine), cap or len(mine))
            assert set(positives) <= mine
        for u, item, others in zip(users, items, pooled):
            mine = set(np.flatnonzero(x[u]).tolist())
            # The pooled history: the user's other items, never the positive, `sample` at most.
            assert item not in others and set(others) <= mine
            assert len(set(others)) == len(others) == min(len(mine) - 1, sample or len(mine))
        # Shuffled across users, and the same draws for the same seed.
        assert users.tolist() != sorted(users.tolist())
        again = T.leave_one_out(history, settings, np.random.default_rng(0))
        assert again[0].tolist() == users.tolist() and again[1].tolist() == items.tolist()
        assert again[2].to_list() == pooled
    # cold_share: that share of pairs pools nothing (attributes only), the rest as before.
    settings = dataclasses.replace(T.SETTINGS, history_sample=8, cold_share=0.3)
    users, _, pooled = T.leave_one_out(history, settings, np.random.default_rng(0))
    lengths = np.array([len(p) for p in pooled.to_list()])
    expected = np.minimum(x[users].sum(axis=1) - 1, 8)
    empty = lengths == 0
    assert np.all(lengths[~empty] == expected[~empty]) and 0.2 < empty.mean() < 0.4


def test_top_k_matches_a_full_stable_sort_with_many_ties():
    # top_k sorts only the items at or above each row's k-th best; it must return exactly
    # what a full stable argsort returns: same items, same ties to the lower index, -1 slots.
    rng = np.random.default_rng(0)
    for _ in range(200):
        users, items, k = rng.integers(1, 12), rng.integers(1, 25), int(rng.integers(0, 30))
        scores = rng.integers(0, 4, size=(users, items)).astype(float)  # small ints: ties
        exclude = rng.random((users, items)) < rng.random()
        masked = np.where(exclude, -np.inf, scores)
        expected = np.argsort(-masked, axis=1, kind="stable")[:, : min(k, items)]
        expected_best = np.take_along_axis(masked, expected, axis=1)
        expected = np.where(np.isneginf(expected_best), -1, expected)
        order, best = R.top_unseen(scores, exclude, k)
        assert order.tolist() == expected.tolist()
        assert best.tolist() == expected_best.astype(np.float32).tolist()


def _dense_rankings(scorer, data, items, k):
    """`Rk.rankings` as it was before `SharedScores`: every chunk densified and `top_k`-ed."""
    ranked, scores = [], []
    for start in range(0, len(data.user_ids), Rk.CHUNK_USERS):
        rows = slice(start, start + Rk.CHUNK_USERS)
        order, best = R.top_unseen(scorer(data, rows).dense(), data.history.dense(rows), k)
        ranked += [[items[i] for i in row[row >= 0]] for row in order]
        scores += [row[row > -np.inf].tolist() for row in best]
    return ranked, scores


def _random_split(rng, users, num_items, attributes):
    """Histories from 0 items to the whole catalogue (short lists), some empty."""
    density = rng.choice([0.0, 0.1, 0.5, 0.9, 1.0], size=(users, 1))
    x = rng.random((users, num_items)) < density
    return SD.SplitData([f"u{u}" for u in range(users)], Histories.from_dense(x), {}, attributes)


def test_shared_scores_rank_exactly_like_dense_top_k(monkeypatch):
    # Small integer scores: many ties, which must go to the lower item index as in top_k;
    # k from 0 to past the catalogue; chunks of 7 users so rows cross chunk borders.
    monkeypatch.setattr(Rk, "CHUNK_USERS", 7)
    rng = np.random.default_rng(6)
    for _ in range(60):
        num_items, users = int(rng.integers(1, 30)), int(rng.integers(1, 25))
        data = _random_split(rng, users, num_items, {})
        items = [f"i{i}" for i in range(num_items)]
        table = rng.integers(0, 4, size=(int(rng.integers(1, 5)), num_items)).astype(float)
        table[rng.random(table.shape) < 0.1] = -np.inf  # never recommended, as excluded
        row_of = rng.integers(0, len(table), size=users)

        def shared(data, rows, table=table, row_of=row_of):
            return R.SharedScores(table, row_of[rows])

        for k in (0, 1, 3, num_items, num_items + 5):
            assert Rk.rankings(shared, data, items, k) == _dense_rankings(shared, data, items, k)
            ranked = R.sort_table(table)
            order, best = R.top_unseen_shared(ranked, row_of, data.history, slice(None), k)
            expected = R.top_unseen(table[row_of], data.history.dense(), k)
            assert order.tolist() == expected[0].tolist()
            assert best.tolist() == expected[1].tolist()


def test_popularity_and_segment_popularity_rank_like_the_dense_path(monkeypatch):
    from recsys_cvae.baselines.segment_popularity import SegmentPopularity

    monkeypatch.setattr(Rk, "CHUNK_USERS", 9)
    rng = np.random.default_rng(7)
    num_items = 15
    items = [f"i{i}" for i in range(num_items)]
    regions = rng.choice(["north", "south", "east", ""], size=40).tolist()
    plans = rng.choice(["free", "premium"], size=40).tolist()
    train = _random_split(rng, 40, num_items, {"region": regions, "plan": plans})
    # "west" is not in training and "" is unknown: both fall back to the global row.
    test_regions = rng.choice(["north", "south", "west", ""], size=50).tolist()
    test_plans = rng.choice(["free", "premium", ""], size=50).tolist()
    test = _random_split(rng, 50, num_items, {"region": test_regions, "plan": test_plans})
    keys = {"region": lambda v: v or None, "plan": lambda v: v or None}
    scorers = [Li.popularity_scorer(Li.popularity(train.history))]
    scorers += [
        SegmentPopularity(train, option, keys, prior).scores
        for option in (["region"], ["region", "plan"])
        for prior in (0.0, 2.0)  # m = 0: segment counts alone, many ties
    ]
    for scorer in scorers:
        for k in (1, 4, num_items, 20):
            assert Rk.rankings(scorer, test, items, k) == _dense_rankings(scorer, test, items, k)
    fallback = SegmentPopularity(train, ["region"], keys, 2.0).scores(test, slice(None))
    unknown = [r in ("west", "") for r in test_regions]
    assert (fallback.row_of[unknown] == 0).all() and (fallback.row_of[~np.array(unknown)] > 0).all()
    np.testing.assert_array_equal(fallback.table[0], Li.popularity(train.history) / 40)


def test_shared_scores_with_nan_fall_back_to_top_k():
    data = SD.SplitData(["a", "b"], Histories.from_dense(np.array([[1, 0, 0], [0, 0, 0]])), {}, {})
    table = np.array([[np.nan, 2.0, 1.0]])

    def shared(data, rows):
        return R.SharedScores(table, np.zeros(len(data.user_ids[rows]), dtype=np.int64))

    assert R.sort_table(table) is None
    assert Rk.rankings(shared, data, ["x", "y", "z"], 2) == _dense_rankings(
        shared, data, ["x", "y", "z"], 2
    )
