"""Signature inputs are raw profile columns: `zip_code` in, `zip_region` derived in the graph.

A tiny CVAE (built, not trained: its random weights make every attribute value matter) over
features whose spec derives `zip_region` from `zip_code` as ML-100K's does, exported once per
module. The checks go the way TF Serving and the batch jobs go: the TF1 session loader in a
fresh process that never imports recsys_cvae, the verifier, Beam RunInference, the what-if.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline

from beam_jobs import candidates as candidates_job
from beam_jobs import signature_inference as SI
from recsys_cvae import candidates_format as C
from recsys_cvae import spec as S
from recsys_cvae import user_records as UR
from recsys_cvae.config import ModelConfig
from recsys_cvae.evaluation.whatif import what_if
from recsys_cvae.export import saved_model as E
from recsys_cvae.export import verification as EV
from recsys_cvae.model.cvae import build_model
from tests.builders import REPO, ZIP_REGIONS, write_zip_features, zip_profiles

TOP_K = 5
RAW_ZIPS = ["55105", "e1a 2b3", ""]
DERIVED_ZIPS = ["5", "E", ""]


@pytest.fixture(scope="module")
def zip_spec(tmp_path_factory) -> S.FeatureSpec:
    return write_zip_features(str(tmp_path_factory.mktemp("zip-features")))


@pytest.fixture(scope="module")
def zip_model(zip_spec):
    tf.keras.utils.set_random_seed(7)
    return build_model(zip_spec, ModelConfig(latent_dim=4, hidden_dims=[8], embedding_dim=4,
                                             condition_dim=4))


@pytest.fixture(scope="module")
def zip_export(zip_model, tmp_path_factory) -> str:
    return E.write_export(zip_model, str(tmp_path_factory.mktemp("zip-export")), top_k=TOP_K)


def test_signatures_take_zip_code_and_no_zip_region(zip_export):
    signatures = tf.saved_model.load(zip_export).signatures
    raw = {"gender": tf.string, "age": tf.float32, "zip_code": tf.string}
    for name in ("serving_default", "recommend", "encode", "generate"):
        inputs = signatures[name].structured_input_signature[1]
        expected = raw if name == "generate" else {"item_ids": tf.string, **raw}
        assert {key: spec.dtype for key, spec in inputs.items()} == expected, name
        assert inputs["zip_code"].shape.as_list() == [None]


SESSION_SCRIPT = r"""
import json, sys
import numpy as np
import tensorflow as tf

export_dir, raw, derived = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
answers = {}
with tf.Graph().as_default() as graph, tf.compat.v1.Session(graph=graph) as session:
    meta_graph = tf.compat.v1.saved_model.loader.load(session, ["serve"], export_dir)
    for name in ("recommend", "generate", "encode"):
        signature = meta_graph.signature_def[name]
        answers[name] = {"inputs": sorted(signature.inputs)}
        for label, zips in (("raw", raw), ("derived", derived)):
            values = {"item_ids": np.array([["i0", ""]] * len(zips), dtype=object),
                      "gender": np.array(["F"] * len(zips), dtype=object),
                      "age": np.full(len(zips), 30.0, np.float32),
                      "zip_code": np.array(zips, dtype=object)}
            feed = {info.name: values[key] for key, info in signature.inputs.items()}
            fetch = {key: info.name for key, info in signature.outputs.items()}
            got = session.run(fetch, feed_dict=feed)
            answers[name][label] = {
                key: value.astype(str).tolist() if value.dtype == object else value.tolist()
                for key, value in got.items()}
assert "recsys_cvae" not in sys.modules
print(json.dumps(answers))
"""


def test_session_loader_in_a_fresh_process_derives_zip_region_from_zip_code(zip_export):
    # As TF Serving runs a SignatureDef: TF1 loader, tensors fed by name, no recsys_cvae.
    result = subprocess.run(
        [sys.executable, "-c", SESSION_SCRIPT, zip_export, json.dumps(RAW_ZIPS),
         json.dumps(DERIVED_ZIPS)],
        capture_output=True, text=True, cwd=REPO, timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    answers = json.loads(result.stdout.strip().splitlines()[-1])
    for name, answer in answers.items():
        history = [] if name == "generate" else ["item_ids"]
        assert answer["inputs"] == sorted(["age", "gender", "zip_code", *history]), name
        # "55105" answers as "5", "e1a 2b3" as "E", "" as unknown: exactly the same outputs.
        assert answer["raw"] == answer["derived"], name
        outputs = answer["raw"]["scores" if name != "encode" else "z_mean"]
        # and the region matters: 55105 and e1a 2b3 are not answered like an unknown zip.
        assert outputs[0] != outputs[2] and outputs[1] != outputs[2], name


def test_the_graph_agrees_with_the_model_fed_the_derived_attribute(zip_model, zip_export):
    generate = tf.saved_model.load(zip_export).signatures["generate"]
    served = generate(gender=tf.constant(["M"] * 3), age=tf.constant([40.0] * 3),
                      zip_code=tf.constant(RAW_ZIPS))
    logits = zip_model.generate_logits({"gender": tf.constant(["M"] * 3),
                                        "age": tf.constant([40.0] * 3),
                                        "zip_region": tf.constant(DERIVED_ZIPS)})
    best = tf.math.top_k(tf.nn.log_softmax(logits), k=TOP_K)
    np.testing.assert_allclose(served["scores"].numpy(), best.values.numpy(), rtol=1e-5)
    expected_ids = tf.gather(tf.constant(zip_model.item_ids), best.indices).numpy()
    np.testing.assert_array_equal(served["item_ids"].numpy(), expected_ids)


def test_warmup_requests_name_the_raw_column(zip_export):
    from tensorflow_serving.apis import prediction_log_pb2

    path = os.path.join(zip_export, "assets.extra", "tf_serving_warmup_requests")
    for record in tf.data.TFRecordDataset(path):
        request = prediction_log_pb2.PredictionLog.FromString(record.numpy()).predict_log.request
        assert "zip_code" in request.inputs and "zip_region" not in request.inputs


def test_the_verifier_checks_raw_spellings_in_a_fresh_process(zip_model, zip_spec, zip_export,
                                                              tmp_path):
    users = EV._verification_users(zip_spec, 4)
    cases = EV.build_cases(zip_model, users, top_k=TOP_K)
    inputs = cases["signatures"]["recommend"]["inputs"]
    assert set(inputs) == {"item_ids", "gender", "age", "zip_code"}
    # 4 users fed their stored region, 2 edge cases, then the first user's zip spelled raw
    stored = [S.inputs_from_attributes(zip_spec, u)["zip_code"] for u in users]
    assert inputs["zip_code"][:4] == stored
    assert inputs["zip_code"][-1] == f"{stored[0].lower()}0 raw"
    path = tmp_path / "cases.json"
    path.write_text(json.dumps(cases))
    summary = EV.run_verifier(zip_export, str(path))  # TF2 and TF1 session loaders
    assert summary["rows"] == 7 * (4 + 3)  # seven signatures (serving_default included)
    assert summary["session_loader"]["max_abs_diff"] < 1e-4


def test_parse_users_feeds_the_stored_region_as_zip_code(zip_spec):
    records = list(UR.read_user_records(zip_spec, S.TEST))
    serialized = [UR.encode_user_example(zip_spec.attributes, r[S.USER_ID], r[S.HISTORY],
                                        r[S.TARGETS], r) for r in records]
    _, inputs = SI.parse_users(tf.constant(serialized), zip_spec, with_history=True)
    assert sorted(inputs) == ["age", "gender", "item_ids", "zip_code"]
    assert inputs["zip_code"].numpy().astype(str).tolist() == [r["zip_region"] for r in records]


def test_batch_candidates_match_clients_sending_raw_profiles(zip_spec, zip_export, tmp_path):
    output_dir = str(tmp_path / "candidates")
    written = candidates_job.run(
        ["--export-dir", zip_export, "--features-dir", zip_spec.directory,
         "--output-dir", output_dir, "--set", "candidates.splits=['test', 'cold']",
         "--set", "candidates.min_batch_size=2", "--set", "candidates.max_batch_size=2"],
        test_pipeline=BeamTestPipeline(),
    )  # fmt: skip
    assert written == {"test": 4, "cold": 3}
    signatures = tf.saved_model.load(zip_export).signatures
    profiles = zip_profiles()
    for split, signature in (("test", "recommend"), ("cold", "generate")):
        rows = sorted(C.iter_rows(C.split_files(output_dir, "cvae", split)))
        records = {r[S.USER_ID]: r for r in UR.read_user_records(zip_spec, split)}
        users = [user for user, _, _, _ in rows]
        assert sorted(records) == users
        # What a TF Serving client holding the raw u.user columns gets, user by user.
        inputs = {
            "gender": tf.constant([profiles[u]["gender"] for u in users]),
            "age": tf.constant([np.nan if profiles[u]["age"] is None else profiles[u]["age"]
                                for u in users], tf.float32),
            "zip_code": tf.constant([profiles[u]["zip_code"] for u in users]),
        }
        if signature == "recommend":
            width = max(len(records[u][S.HISTORY]) for u in users)
            inputs["item_ids"] = tf.constant(
                [records[u][S.HISTORY] + [""] * (width - len(records[u][S.HISTORY]))
                 for u in users])  # fmt: skip
        served = signatures[signature](**inputs)
        for row, (user, ids, scores, _) in enumerate(rows):
            assert ids == served["item_ids"][row].numpy().astype(str).tolist(), user
            np.testing.assert_allclose(scores, served["scores"][row].numpy(), rtol=1e-5)


def test_what_if_varies_a_derived_attribute_through_its_raw_column(zip_spec, zip_export):
    result = what_if(zip_spec, os.path.dirname(zip_export), attribute="zip_region", variants=3)
    assert [row["value"] for row in result["rows"]] == ZIP_REGIONS[:3]
    generate = tf.saved_model.load(zip_export).signatures["generate"]
    base = result["base"]
    # a client sending raw zip codes starting with those regions gets the same lists
    served = generate(gender=tf.constant([base["gender"]] * 3),
                      age=tf.constant([base["age"]] * 3, tf.float32),
                      zip_code=tf.constant(["55105", "e1a 2b3", "94110"]))
    for row, ids in zip(result["rows"], served["item_ids"].numpy().astype(str).tolist()):
        assert row["item_ids"] == ids[: len(row["item_ids"])]
