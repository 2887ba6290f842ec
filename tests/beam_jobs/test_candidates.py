"""Beam RunInference candidates on a small real SavedModel with the export's signatures.

The toy export scores item i (vocabulary index, n items) for a user as

    score_i = -i + 1000 · [i == n - 1 - region_index] + age    (NaN age -> 0, "" region -> no boost)

so the expected top-K of every user can be worked out by hand: the item "owned" by the
user's region first (unless it is in the history), then the remaining items in vocabulary
order, all shifted by the user's age. `recommend` masks the history; `generate` has none
and adds 0.5 to every score, so a test can tell which signature answered.
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow as tf
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline

from beam_jobs import candidates as job
from beam_jobs import signature_inference as SI
from recsys_cvae import candidates_format as C
from recsys_cvae import spec as S
from recsys_cvae import user_records as UR

TOP_K = 10


def build_toy_export(features_dir: str, export_dir: str, top_k: int = TOP_K) -> None:
    """Saves the toy recommender above with `recommend`, `generate` and `serving_default`."""
    spec = S.FeatureSpec.load(features_dir)
    items = spec.item_vocabulary()
    regions = spec.attribute_vocabulary("region")
    n = len(items)

    module = tf.Module()
    module.items = tf.constant(items)
    module.item_table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(items, tf.range(n, dtype=tf.int64)), -1
    )
    module.region_table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(regions, tf.range(len(regions), dtype=tf.int64)), -1
    )
    module.base = tf.Variable(-tf.range(n, dtype=tf.float32))

    def scores(inputs):
        region = module.region_table.lookup(inputs["region"])
        boost = 1000.0 * tf.one_hot(tf.where(region >= 0, n - 1 - region, -1), n)
        age = tf.where(tf.math.is_nan(inputs["age"]), 0.0, inputs["age"])
        return module.base[tf.newaxis, :] + boost + age[:, tf.newaxis]

    def top(values):  # as the real export: slots left after the history masking hold "" / -inf
        best, index = tf.math.top_k(values, k=top_k)
        item_ids = tf.where(tf.math.is_inf(best), "", tf.gather(module.items, index))
        return {"item_ids": item_ids, "scores": best}

    attribute_specs = {
        a.name: tf.TensorSpec([None], tf.string if a.is_categorical else tf.float32, name=a.name)
        for a in spec.attributes
    }
    history_spec = {"item_ids": tf.TensorSpec([None, None], tf.string, name="item_ids")}

    @tf.function(input_signature=[{**history_spec, **attribute_specs}])
    def recommend(inputs):
        index = module.item_table.lookup(inputs["item_ids"])  # [batch, n_hist], -1 for ""
        in_history = tf.reduce_max(tf.one_hot(index, n), axis=1)  # [batch, n]
        return top(tf.where(in_history > 0, -np.inf, scores(inputs)))

    @tf.function(input_signature=[attribute_specs])
    def generate(inputs):
        return top(scores(inputs) + 0.5)

    recommend_fn = recommend.get_concrete_function()
    tf.saved_model.save(
        module,
        export_dir,
        signatures={
            "serving_default": recommend_fn,
            "recommend": recommend_fn,
            "generate": generate.get_concrete_function(),
        },
    )


def expected_top(record: dict, items: list[str], regions: list[str], signature: str):
    """The toy model's answer for one user, in plain Python (see the module docstring)."""
    n = len(items)
    age = 0.0 if math.isnan(record["age"]) else record["age"]
    shift = 0.5 if signature == "generate" else 0.0
    boosted = n - 1 - regions.index(record["region"]) if record["region"] in regions else -1
    scored = [
        (-i + (1000.0 if i == boosted else 0.0) + age + shift, items[i])
        for i in range(n)
        if items[i] not in set(record[S.HISTORY])
    ]
    scored.sort(reverse=True)
    return [item for _, item in scored[:TOP_K]], [score for score, _ in scored[:TOP_K]]


def read_serialized(spec: S.FeatureSpec, split: str) -> list[bytes]:
    """The split's user examples as the feature job wrote them."""
    files = tf.io.gfile.glob(spec.split_pattern(split))
    return list(tf.data.TFRecordDataset(files, compression_type="GZIP").as_numpy_iterator())


@pytest.fixture(scope="module")
def export_base(features_dir, tmp_path_factory) -> str:
    base = tmp_path_factory.mktemp("export")
    build_toy_export(features_dir, str(base / "3"))
    return str(base)


def test_parse_users_pads_histories_and_marks_unknowns(features_dir):
    spec = S.FeatureSpec.load(features_dir)
    known = {"age": 30.0, "region": "north", "device": "ios", "plan": "free"}
    serialized = tf.constant([
        UR.encode_user_example(spec.attributes, "u1", ["a", "b", "c"], ["t"], known),
        UR.encode_user_example(spec.attributes, "u2", [], [], {}),
    ])  # fmt: skip
    user_ids, inputs = SI.parse_users(serialized, spec, with_history=True)
    assert user_ids.numpy().tolist() == [b"u1", b"u2"]
    # Width 3 = the longest history; the empty one is all padding; targets are not read.
    assert inputs["item_ids"].numpy().tolist() == [[b"a", b"b", b"c"], [b"", b"", b""]]
    assert inputs["plan"].numpy().tolist() == [b"free", b""]
    assert inputs["age"].dtype == tf.float32
    assert inputs["age"][0] == 30.0 and math.isnan(inputs["age"][1])
    assert sorted(inputs) == sorted(["item_ids", *spec.attribute_names])
    # generate takes no history; an all-empty batch still gets a [batch, 1] history.
    assert "item_ids" not in SI.parse_users(serialized, spec, with_history=False)[1]
    _, empty = SI.parse_users(serialized[1:], spec, with_history=True)
    assert empty["item_ids"].shape == (1, 1)


def test_parse_users_matches_the_python_decode_of_every_record(features_dir):
    """The in-graph batch parse reads the same users as `spec.decode_user_example`."""
    spec = S.FeatureSpec.load(features_dir)
    serialized = read_serialized(spec, "test")
    user_ids, inputs = SI.parse_users(tf.constant(serialized), spec, with_history=True)
    for row, example in enumerate(serialized):
        record = UR.decode_user_example(example, spec.attributes)
        assert user_ids[row].numpy().decode() == record[S.USER_ID]
        history = [i.decode() for i in inputs["item_ids"][row].numpy().tolist() if i]
        assert history == record[S.HISTORY]
        for attribute in spec.attributes:
            value = inputs[attribute.name][row].numpy()
            if attribute.is_categorical:
                assert value.decode() == record[attribute.name]
            else:
                np.testing.assert_equal(value, np.float32(record[attribute.name]))


def test_handler_drops_the_padding_when_a_history_leaves_fewer_than_k_items(
    features_dir, tmp_path
):
    spec = S.FeatureSpec.load(features_dir)
    items = spec.item_vocabulary()
    build_toy_export(features_dir, str(tmp_path / "1"), top_k=len(items))  # K = catalogue
    handler = SI.SavedModelSignatureHandler(str(tmp_path / "1"), "recommend", spec)
    batch = read_serialized(spec, "test")[:4]
    # One element is one batch of users, and its prediction holds the whole batch.
    (result,) = handler.run_inference([batch], handler.load_model())
    assert result.example == batch
    inference = result.inference
    rows = C.rows_of_top_k(
        inference[C.USER_ID], inference[C.ITEM_IDS], inference[C.SCORES], "m"
    ).to_pylist()
    for example, row in zip(batch, rows, strict=True):
        record = UR.decode_user_example(example, spec.attributes)
        assert row[C.USER_ID] == record[S.USER_ID]
        # Every item not in the history, once; the "" / -inf tail of the K slots is gone.
        assert sorted(row[C.ITEM_IDS]) == sorted(set(items) - set(record[S.HISTORY]))
        assert len(row[C.SCORES]) == len(row[C.ITEM_IDS])
        assert all(math.isfinite(score) for score in row[C.SCORES])
    assert handler.get_num_bytes([batch]) == sum(len(example) for example in batch)


def test_top_k_batch_keeps_the_filled_slots_of_each_row_in_order():
    # Two users, K = 3: u1 got three items; u2's history left one, so "" / -inf pad its row.
    batch = C.rows_of_top_k(
        pa.array(["u1", "u2"]),
        pa.array(["a", "b", "c", "d", "", ""]),
        np.array([[3.0, 2.0, 1.0], [5.0, -np.inf, -np.inf]], np.float32),
        "cvae/3",
    )
    assert batch.schema.equals(C.SCHEMA)
    assert batch.to_pydict() == {
        "user_id": ["u1", "u2"],
        "item_ids": [["a", "b", "c"], ["d"]],
        "scores": [[3.0, 2.0, 1.0], [5.0]],
        "model": ["cvae/3", "cvae/3"],
    }
    with pytest.raises(C.CandidatesError, match="top-K shapes differ"):
        C.rows_of_top_k(pa.array(["u1"]), pa.array(["a"]), np.zeros((1, 2), np.float32), "m")


def test_arrow_strings_reads_joined_bytes_and_rejects_bad_utf8():
    # "ab" + "" + "cde" joined: byte lengths 2, 0, 3.
    assert SI.arrow_strings(np.array([2, 0, 3]), b"abcde").to_pylist() == ["ab", "", "cde"]
    with pytest.raises(pa.ArrowInvalid):
        SI.arrow_strings(np.array([1, 1]), b"a\xff")


def test_users_to_candidates_rejects_bad_batch_bounds(features_dir):
    handler = SI.SavedModelSignatureHandler("x", "recommend", S.FeatureSpec.load(features_dir))
    with pytest.raises(ValueError, match="min_batch_size <= candidates.max_batch_size"):
        job.UsersToCandidates(handler, "m", min_batch_size=9, max_batch_size=8)


def per_user_reference(export_dir: str, spec: S.FeatureSpec, split: str) -> list[tuple]:
    """The rows the per-user job wrote (a PredictionResult and a row dict per user), from the
    raw signature: per user, the first k of its K slots, k = its number of non-"" item ids."""
    signature = "generate" if split == "cold" else "recommend"
    function = tf.saved_model.load(export_dir).signatures[signature]
    serialized = read_serialized(spec, split)
    user_ids, inputs = SI.parse_users(tf.constant(serialized), spec, signature == "recommend")
    outputs = function(**inputs)
    rows = []
    for user_id, ids, scores in zip(
        user_ids.numpy(), outputs["item_ids"].numpy(), outputs["scores"].numpy().tolist()
    ):
        k = np.count_nonzero(ids != b"")
        rows.append((user_id.decode(), [i.decode() for i in ids[:k]], scores[:k], "cvae/1"))
    return sorted(rows)


def test_per_batch_path_writes_the_rows_of_the_per_user_reference(features_dir, tmp_path):
    spec = S.FeatureSpec.load(features_dir)
    items = spec.item_vocabulary()
    # K = the catalogue, so every warm user with a history gets fewer than K items.
    build_toy_export(features_dir, str(tmp_path / "export" / "1"), top_k=len(items))
    output_dir = str(tmp_path / "candidates")
    # Batches of 3..7 users: several batches, of different sizes and history widths.
    job.run(
        ["--export-dir", str(tmp_path / "export"), "--features-dir", features_dir,
         "--output-dir", output_dir, "--set", "candidates.splits=['test', 'cold']",
         "--set", "candidates.min_batch_size=3", "--set", "candidates.max_batch_size=7"],
        test_pipeline=BeamTestPipeline(),
    )  # fmt: skip
    for split in ("test", "cold"):
        paths = C.split_files(output_dir, "cvae", split)
        assert paths and all(pq.read_schema(p).equals(C.SCHEMA) for p in paths)
        written = sorted(C.iter_rows(paths))
        # Same users, item ids, float32 scores and labels, exactly.
        assert written == per_user_reference(str(tmp_path / "export" / "1"), spec, split)
        shorter = sum(len(ids) < len(items) for _, ids, _, _ in written)
        assert shorter == (len(written) if split == "test" else 0), split


def test_resolve_export_dir_takes_the_newest_integer_version(tmp_path):
    for name in ("1", "2", "10", "tmp-11"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "saved_model.pb").write_bytes(b"")
    (tmp_path / "12").mkdir()  # no SavedModel inside: an export still being written
    assert job.resolve_export_dir(str(tmp_path)) == (str(tmp_path / "10"), "10")
    assert job.resolve_export_dir(str(tmp_path / "2")) == (str(tmp_path / "2"), "2")
    with pytest.raises(SI.ExportError, match="no SavedModel"):
        job.resolve_export_dir(str(tmp_path / "12"))


def test_signature_runner_rejects_inputs_that_do_not_match_the_export(features_dir, export_base):
    spec = S.FeatureSpec.load(features_dir)
    fewer = dataclasses.replace(spec, attributes=spec.attributes[:2])
    with pytest.raises(SI.ExportError, match="takes inputs"):
        SI.SignatureRunner(os.path.join(export_base, "3"), "generate", fewer)
    with pytest.raises(SI.ExportError, match="no signature 'encode'"):
        SI.SignatureRunner(os.path.join(export_base, "3"), "encode", spec)


def test_pipeline_writes_candidates_from_recommend_and_generate(
    features_dir, export_base, tmp_path
):
    output_dir = str(tmp_path / "candidates")
    # Small batches, so several batches with different history widths run.
    written = job.run(
        [
            "--export-dir",
            export_base,
            "--features-dir",
            features_dir,
            "--output-dir",
            output_dir,
            "--set",
            "candidates.splits=['test', 'cold']",
            "--set",
            "candidates.min_batch_size=2",
            "--set",
            "candidates.max_batch_size=5",
        ],
        test_pipeline=BeamTestPipeline(),
    )
    spec = S.FeatureSpec.load(features_dir)
    items = spec.item_vocabulary()
    regions = spec.attribute_vocabulary("region")
    assert written == {"test": spec.splits["test"].users, "cold": spec.splits["cold"].users}

    for split in ("test", "cold"):
        paths = C.split_files(output_dir, "cvae", split)
        assert paths and all(pq.read_schema(p).equals(C.SCHEMA) for p in paths)
        rows = {user: (ids, scores, model) for user, ids, scores, model in C.iter_rows(paths)}
        records = list(UR.read_user_records(spec, split))
        assert sorted(rows) == sorted(r[S.USER_ID] for r in records)
        for record in records:
            ids, scores, model = rows[record[S.USER_ID]]
            assert model == "cvae/3"
            assert not set(ids) & set(record[S.HISTORY]), "history returned"
            signature = "generate" if split == "cold" else "recommend"
            expected_ids, expected_scores = expected_top(record, items, regions, signature)
            assert ids == expected_ids, record[S.USER_ID]
            np.testing.assert_allclose(scores, expected_scores, rtol=1e-6)

    # Cold users went through `generate`: empty history, so the region's item leads.
    cold = next(r for r in UR.read_user_records(spec, "cold") if r["region"] in regions)
    ids, scores, _ = next(
        (i, s, m)
        for u, i, s, m in C.iter_rows(C.split_files(output_dir, "cvae", "cold"))
        if u == cold[S.USER_ID]
    )
    assert ids[0] == items[len(items) - 1 - regions.index(cold["region"])]
    assert scores[0] == pytest.approx(
        -(len(items) - 1 - regions.index(cold["region"])) + 1000.0 + cold["age"] + 0.5
    )


def candidate_rows(output_dir: str) -> dict[str, list]:
    return {split: sorted(C.iter_rows(C.split_files(output_dir, "cvae", split)))
            for split in ("test", "cold")}  # fmt: skip


@pytest.mark.slow  # ~40 s: two worker processes start, each loads TensorFlow and the export
def test_multi_processing_runner_writes_the_same_candidates(features_dir, export_base, tmp_path):
    flags = ["--export-dir", export_base, "--features-dir", features_dir,
             "--set", "candidates.min_batch_size=16",
             "--set", "candidates.max_batch_size=16"]  # fmt: skip
    job.run([*flags, "--output-dir", str(tmp_path / "a")], save_main_session=False)
    multi = ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]
    job.run([*flags, "--output-dir", str(tmp_path / "b"), *multi], save_main_session=False)
    shared = ["--set", "candidates.share_model_across_processes=true"]
    job.run([*flags, *shared, "--output-dir", str(tmp_path / "c"), *multi], save_main_session=False)
    # Shards follow Beam's bundles, so compare rows; the toy scores do not depend on the batch.
    in_memory = candidate_rows(str(tmp_path / "a"))
    assert in_memory["test"] and in_memory["cold"]
    assert candidate_rows(str(tmp_path / "b")) == in_memory
    assert candidate_rows(str(tmp_path / "c")) == in_memory
