"""The SavedModel export: signature contract, history masking, versions, fresh-process verify.

One small CVAE is trained for one epoch on the synthetic features and exported once per
module (top_k = 10); most tests call that export's signatures as a server would.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from recsys_cvae import export_layout as layout
from recsys_cvae import spec as S
from recsys_cvae.config import Config, ExportConfig, ModelConfig
from recsys_cvae.export import saved_model as E
from recsys_cvae.export import verification as EV
from recsys_cvae.model.cvae import build_model
from recsys_cvae.model.model_dir import load_trained_model
from recsys_cvae.training.fit import train
from serving import verify_export as V


@pytest.fixture(scope="module")
def model_dir(features_dir, tmp_path_factory):
    """A small CVAE trained for one epoch on the synthetic features."""
    config = Config()
    config.model = ModelConfig(latent_dim=8, hidden_dims=[32], embedding_dim=4, condition_dim=8)
    config.train.epochs = 1
    config.train.batch_size = 64
    config.train.strategy = "default"
    config.train.verbose = 0
    model_dir = str(tmp_path_factory.mktemp("model"))
    train(features_dir, model_dir, config)
    return model_dir


@pytest.fixture(scope="module")
def model(model_dir):
    return load_trained_model(model_dir)


@pytest.fixture(scope="module")
def export_base(tmp_path_factory):
    return str(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def exported(model_dir, export_base):
    """(export_dir, loaded SavedModel) of the first export, top_k = 10."""
    export_dir = E.export_model(model_dir, export_base, ExportConfig(top_k=10, verify=False))
    return export_dir, tf.saved_model.load(export_dir)


def _unknown_attributes(spec: S.FeatureSpec, batch: int) -> dict[str, tf.Tensor]:
    return {
        a.name: tf.constant([""] * batch) if a.is_categorical else tf.constant([math.nan] * batch)
        for a in spec.attributes
    }


def test_signatures_have_exactly_the_contract_inputs_and_outputs(model, exported):
    _, loaded = exported
    signatures = loaded.signatures
    assert set(signatures) == {"serving_default", "recommend", "generate", "encode",
                               "recommend_excluding", "generate_excluding", "sample"}
    # the synthetic users table: age is numeric, region/device/plan are categorical
    assert model.spec.attribute_names == ["age", "region", "device", "plan"]
    attributes = {
        "age": tf.TensorSpec([None], tf.float32, "age"),
        "region": tf.TensorSpec([None], tf.string, "region"),
        "device": tf.TensorSpec([None], tf.string, "device"),
        "plan": tf.TensorSpec([None], tf.string, "plan"),
    }
    history = {"item_ids": tf.TensorSpec([None, None], tf.string, "item_ids")}
    ranked = {
        "item_ids": tf.TensorSpec([None, 10], tf.string, "item_ids"),
        "scores": tf.TensorSpec([None, 10], tf.float32, "scores"),
    }
    for name in ("serving_default", "recommend"):
        assert signatures[name].structured_input_signature == ((), {**history, **attributes})
        assert signatures[name].structured_outputs == ranked
    assert signatures["generate"].structured_input_signature == ((), attributes)
    assert signatures["generate"].structured_outputs == ranked
    exclude = {"exclude_item_ids": tf.TensorSpec([None, None], tf.string, "exclude_item_ids")}
    assert signatures["recommend_excluding"].structured_input_signature == (
        (), {**history, **attributes, **exclude})
    assert signatures["generate_excluding"].structured_input_signature == (
        (), {**attributes, **exclude})
    assert signatures["recommend_excluding"].structured_outputs == ranked
    assert signatures["generate_excluding"].structured_outputs == ranked
    assert signatures["sample"].structured_input_signature == ((), {
        **attributes, "num_items": tf.TensorSpec([None], tf.int32, "num_items"),
        "seed": tf.TensorSpec([None], tf.int64, "seed")})
    assert signatures["sample"].structured_outputs == {
        "item_ids": tf.TensorSpec([None, None], tf.string, "item_ids")}
    assert signatures["encode"].structured_input_signature == ((), {**history, **attributes})
    encoded = signatures["encode"].structured_outputs
    assert set(encoded) == {"z_mean", "z_log_var"}
    assert all(s.dtype == tf.float32 and s.shape.rank == 2 for s in encoded.values())


def test_history_items_are_never_returned_and_padding_is_ignored(model, exported):
    _, loaded = exported
    items = model.item_ids
    top = loaded.signatures["recommend"](
        item_ids=tf.constant([["", "", ""], ["", "", ""]]), **_unknown_attributes(model.spec, 2)
    )["item_ids"].numpy().astype(str)
    # Put the user's own top three (with no history) into the history: they must disappear,
    # and "" padding / an unknown id must change nothing else.
    history = [[top[0][0], top[0][1], top[0][2]], [top[1][0], "no-such-item", ""]]
    out = loaded.signatures["recommend"](
        item_ids=tf.constant(history), **_unknown_attributes(model.spec, 2)
    )
    ids = out["item_ids"].numpy().astype(str)
    assert not set(history[0]) & set(ids[0])
    assert top[1][0] not in set(ids[1])
    assert set(ids[0]) <= set(items) and set(ids[1]) <= set(items)
    scores = out["scores"].numpy()
    assert (scores[:, :-1] >= scores[:, 1:]).all()  # best first
    assert np.isfinite(scores).all() and (scores < 0).all()  # log-probabilities


def test_unknown_history_ids_and_padding_are_ignored(model, exported):
    _, loaded = exported
    items = model.item_ids
    attributes = _unknown_attributes(model.spec, 3)
    out = loaded.signatures["recommend"](
        item_ids=tf.constant([[items[5], "", ""], [items[5], "nope", ""], ["", items[5], "zzz"]]),
        **attributes,
    )
    ids = out["item_ids"].numpy()
    scores = out["scores"].numpy()
    # three spellings of the same history ({items[5]}) give the same answer
    np.testing.assert_array_equal(ids[0], ids[1])
    np.testing.assert_array_equal(ids[0], ids[2])
    np.testing.assert_allclose(scores[0], scores[2], rtol=1e-6)


def test_unknown_attribute_values_are_accepted(model, exported):
    _, loaded = exported
    out = loaded.signatures["generate"](
        age=tf.constant([math.nan, 30.0]),
        region=tf.constant(["", "atlantis"]),
        device=tf.constant(["fridge", ""]),
        plan=tf.constant(["", "free"]),
    )
    assert out["item_ids"].shape == (2, 10)
    assert np.isfinite(out["scores"].numpy()).all()


def test_the_served_export_answers_like_the_in_process_signatures(model, exported, tmp_path):
    from serving.client import RecommenderClient
    from serving.server import ModelServer

    export_dir, loaded = exported
    shutil.copytree(export_dir, tmp_path / "base" / "1")
    items = list(model.item_ids)
    histories = [[items[3], items[7]], []]
    attributes = {"age": [30.0, None], "region": ["north", ""]}
    server = ModelServer(str(tmp_path / "base"), port=0, poll_interval_s=60.0)
    port = server.start()
    try:
        with RecommenderClient(f"127.0.0.1:{port}", timeout_s=10.0) as client:
            served = client.recommend(histories, attributes)
            served_generate = client.generate(attributes)
    finally:
        server.stop(grace_s=1.0)
    inputs = {**_unknown_attributes(model.spec, 2),
              "age": tf.constant([30.0, math.nan]), "region": tf.constant(["north", ""])}
    direct = loaded.signatures["recommend"](
        item_ids=tf.constant([histories[0], ["", ""]]), **inputs)
    direct_generate = loaded.signatures["generate"](**inputs)
    for ranked, out in ((served, direct), (served_generate, direct_generate)):
        for row, user in enumerate(ranked):
            assert [i for i, _ in user] == [i.decode() for i in out["item_ids"][row].numpy()]
            np.testing.assert_allclose([s for _, s in user], out["scores"][row], rtol=1e-5)
    assert not {items[3], items[7]} & {i for i, _ in served[0]}


def test_generate_depends_on_the_attributes(model, exported):
    _, loaded = exported
    regions = model.spec.attribute_vocabulary("region")
    out = loaded.signatures["generate"](
        age=tf.constant([30.0, 30.0]),
        region=tf.constant(regions[:2]),
        device=tf.constant(["web", "web"]),
        plan=tf.constant(["free", "free"]),
    )
    ids = out["item_ids"].numpy()
    scores = out["scores"].numpy()
    assert not (np.array_equal(ids[0], ids[1]) and np.allclose(scores[0], scores[1]))


def test_when_the_history_covers_the_catalogue_the_tail_is_padding(model, export_base):
    items = model.item_ids
    module = E.ServingModule(model, top_k=len(items) + 50)
    assert module.top_k == len(items)  # K = min(top_k, num_items)
    out = module.recommend(
        {"item_ids": tf.constant([items[3:]]), **_unknown_attributes(model.spec, 1)}
    )
    ids = out["item_ids"].numpy()[0].astype(str)
    scores = out["scores"].numpy()[0]
    # only items 0, 1, 2 are left; the other positions hold "" with score -inf
    assert set(ids[:3]) == set(items[:3])
    assert (ids[3:] == "").all() and np.isneginf(scores[3:]).all()


def test_graphs_have_no_python_ops(exported):
    _, loaded = exported
    for name, signature in loaded.signatures.items():
        ops = V.graph_op_types(signature)
        # the walk reaches into the function library, where the signature bodies live
        assert ("TopKV2" in ops) == (name != "encode"), name
        assert not ops & V.PYTHON_OPS, (name, ops & V.PYTHON_OPS)


def test_the_python_op_check_can_fail():
    fn = tf.function(lambda x: tf.py_function(lambda v: v * 2, [x], tf.float32))
    ops = V.graph_op_types(fn.get_concrete_function(tf.TensorSpec([None], tf.float32)))
    assert ops & V.PYTHON_OPS == {"EagerPyFunc"}


def test_versions_count_up_and_no_temporary_folder_is_left(model, exported, export_base):
    export_dir, _ = exported
    assert os.path.basename(export_dir) == "1"
    os.makedirs(os.path.join(export_base, "not-a-version"))
    second = E.write_export(model, export_base, top_k=5)
    assert os.path.basename(second) == "2"
    assert sorted(os.listdir(export_base)) == ["1", "2", "not-a-version"]
    assert layout.next_version(export_base) == 3
    assert layout.next_version(os.path.join(export_base, "missing")) == 1
    info = EV.read_export_info(second)
    assert info["top_k"] == 5 and info["num_items"] == len(model.item_ids)


def test_a_version_claimed_meanwhile_is_skipped(model, tmp_path, monkeypatch):
    base = str(tmp_path / "export")
    real_next_version = layout.next_version
    claimed = []

    def racing_next_version(export_base):
        version = real_next_version(export_base)
        if not claimed:  # another exporter renames its version 1 into place first
            os.makedirs(os.path.join(export_base, str(version), "variables"))
            claimed.append(version)
        return version

    monkeypatch.setattr(layout, "next_version", racing_next_version)
    export_dir = E.write_export(model, base, top_k=3)
    assert claimed == [1] and os.path.basename(export_dir) == "2"
    assert sorted(os.listdir(base)) == ["1", "2"]
    assert os.listdir(os.path.join(base, "1")) == ["variables"]  # the other export is untouched


def test_a_failed_export_leaves_no_folder_behind(model, tmp_path, monkeypatch):
    base = str(tmp_path / "export")

    def disk_full(module, directory, trained_on):
        raise OSError("No space left on device")

    monkeypatch.setattr(E, "_write_assets_extra", disk_full)
    with pytest.raises(OSError, match="No space left"):
        E.write_export(model, base, top_k=3)
    assert os.listdir(base) == []


def test_assets_extra_holds_spec_vocabularies_and_valid_warmup_requests(model, exported):
    from tensorflow_serving.apis import prediction_log_pb2

    export_dir, loaded = exported
    extra = os.path.join(export_dir, "assets.extra")
    with open(os.path.join(extra, "feature_spec.json")) as f:
        assert [a["name"] for a in json.load(f)["attributes"]] == model.spec.attribute_names
    assert S.read_vocabulary(os.path.join(extra, "vocab", "items.txt")) == model.item_ids
    assert S.read_vocabulary(os.path.join(extra, "vocab", "attr_region.txt")) == (
        model.spec.attribute_vocabulary("region")
    )
    names = []
    for record in tf.data.TFRecordDataset(os.path.join(extra, "tf_serving_warmup_requests")):
        request = prediction_log_pb2.PredictionLog.FromString(record.numpy()).predict_log.request
        name = request.model_spec.signature_name
        names.append(name)
        inputs = {k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()}
        loaded.signatures[name](**inputs)  # the request is accepted as is
    assert names == ["recommend", "generate", "encode", "recommend_excluding",
                     "generate_excluding", "sample"]


def test_assets_extra_holds_the_training_metrics(model_dir, exported):
    export_dir, _ = exported
    with open(os.path.join(model_dir, "training_metrics.json")) as f:
        trained = json.load(f)
    with open(os.path.join(export_dir, "assets.extra", "training_metrics.json")) as f:
        assert json.load(f) == trained


def test_a_model_without_attributes_exports_and_verifies(features_dir, tmp_path):
    spec = dataclasses.replace(S.FeatureSpec.load(features_dir), attributes=())
    plain = build_model(spec, ModelConfig(latent_dim=4, hidden_dims=[8]))
    export_dir = E.write_export(plain, str(tmp_path), top_k=5)
    cases = EV.build_cases(plain, EV._verification_users(spec, 3), top_k=5)
    assert cases["signatures"]["generate"]["inputs"] == {}
    summary = V.check_export(export_dir, cases)
    # recommend, serving_default, encode, recommend_excluding: 3 users + 2 edge cases;
    # generate, generate_excluding and sample: one row each
    assert summary["rows"] == 4 * 5 + 3


def test_bad_attribute_names_are_refused(model):
    class Renamed:
        item_ids = model.item_ids
        spec = S.FeatureSpec(
            attributes=(S.AttributeSpec("item_ids", S.NUMERIC),),
            item_vocabulary_file="vocab/items.txt", num_items=len(model.item_ids), splits={},
        )

    with pytest.raises(E.ExportError, match="'item_ids' clashes"):
        E.ServingModule(Renamed(), top_k=3)


@pytest.fixture(scope="module")
def cases(model, exported):
    users = EV._verification_users(model.spec, 6)
    assert len(users) == 6
    return EV.build_cases(model, users, top_k=10)


def test_verify_export_passes_in_a_fresh_process(exported, model_dir):
    export_dir, _ = exported
    summary = EV.verify_export(export_dir, model_dir, num_users=6)
    assert summary["signatures"] == ["encode", "generate", "generate_excluding", "recommend",
                                     "recommend_excluding", "sample", "serving_default"]
    assert summary["rows"] == 7 * (6 + 2)  # 6 users + 2 edge cases, for each signature
    assert summary["max_abs_diff"] < 1e-4
    assert summary["session_loader"]["max_abs_diff"] < 1e-4  # the TF1 loader ran too


def test_session_loader_runs_every_signature_by_tensor_name(exported, cases):
    export_dir, _ = exported
    max_diff, op_types = V.check_with_session(export_dir, cases)
    assert max_diff < 1e-4
    # top-K, and log Z (a logsumexp) subtracted from the winners: the log-softmax scores
    assert {"TopKV2", "Exp", "Log"} <= op_types and not op_types & V.PYTHON_OPS
    tampered = json.loads(json.dumps(cases))
    tampered["signatures"]["encode"]["expected"]["z_mean"][1][0] = 7.5
    with pytest.raises(V.VerificationError, match=r"session encode.z_mean\[1, 0\] is .*7.5"):
        V.check_with_session(export_dir, tampered)


def test_verifier_in_a_fresh_process_rejects_a_tampered_case(exported, cases, tmp_path):
    export_dir, _ = exported
    tampered = json.loads(json.dumps(cases))
    tampered["signatures"]["generate"]["expected"]["item_ids"][2][0] = "not-an-item"
    path = tmp_path / "cases.json"
    path.write_text(json.dumps(tampered))
    with pytest.raises(E.ExportError, match=r"generate.item_ids: row 2 rank 0 is '.+', expected "
                                            r"'not-an-item'"):
        EV.run_verifier(export_dir, str(path))


def test_verifier_takes_paths_relative_to_the_callers_folder(exported, cases, tmp_path,
                                                            monkeypatch):
    # The verifier runs in the repository root; a user's relative paths are theirs, not its.
    export_dir, _ = exported
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    monkeypatch.chdir(tmp_path)
    relative_export = os.path.relpath(export_dir, tmp_path)
    assert not os.path.isabs(relative_export)
    summary = EV.run_verifier(relative_export, "cases.json")
    assert summary["signatures"] == ["encode", "generate", "generate_excluding", "recommend",
                                     "recommend_excluding", "sample", "serving_default"]
    assert summary["rows"] == 7 * (6 + 2)


def test_verifier_refuses_to_run_with_recsys_cvae_imported(exported, cases, tmp_path):
    export_dir, _ = exported
    path = tmp_path / "cases.json"
    path.write_text(json.dumps(cases))
    script = (
        "import sys, recsys_cvae\n"
        "from serving.verify_export import main\n"
        f"sys.exit(main(['--export-dir', {export_dir!r}, '--cases', {str(path)!r}]))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), timeout=300)
    assert result.returncode == 1
    assert "recsys_cvae was imported" in result.stderr.strip().splitlines()[-1]


def _set_score(cases):
    cases["signatures"]["recommend"]["expected"]["scores"][0][1] = 0.5


def _set_z_log_var(cases):
    cases["signatures"]["encode"]["expected"]["z_log_var"][3][0] = 9.0


def _drop_input(cases):
    del cases["signatures"]["encode"]["inputs"]["plan"]


def _expect_more_items(cases):
    cases["top_k"] = 11


def _ask_for_unknown_signature(cases):
    cases["signatures"]["rank"] = cases["signatures"]["generate"]


@pytest.mark.parametrize(
    "tamper, message",
    [
        (_set_score, r"recommend.scores\[0, 1\] is -?\d"),
        (_set_z_log_var, r"encode.z_log_var\[3, 0\] is .*, expected 9.0"),
        (_drop_input, r"'encode' takes inputs .*'plan'.*, the cases have"),
        (_expect_more_items, r"serving_default.item_ids: shape \(8, 10\), expected \(8, 11\)"),
        (_ask_for_unknown_signature, r"signature 'rank' missing"),
    ],
)
def test_check_export_names_the_first_mismatch(exported, cases, tamper, message):
    export_dir, _ = exported
    tampered = json.loads(json.dumps(cases))
    tamper(tampered)
    with pytest.raises(V.VerificationError, match=message):
        V.check_export(export_dir, tampered)


def test_swapped_tied_items_are_accepted_and_nothing_else(cases):
    expected = cases["signatures"]["recommend"]["expected"]
    got = np.array([[i.encode() for i in expected["item_ids"][0]]], dtype=object)
    ids, scores = list(expected["item_ids"][0]), list(expected["scores"][0])
    # pretend the first two items tie: the expectation lists them the other way round
    ids[0], ids[1] = ids[1], ids[0]
    scores[1] = scores[0]
    reference = {ids[0]: scores[0], ids[1]: scores[0]}
    case = {"expected": {"item_ids": [ids], "scores": [scores]}, "reference_scores": [reference]}
    V._compare_ranking("recommend", "item_ids", got, case, 10, 1e-4, 1e-4)
    reference[ids[1]] = scores[0] - 1.0  # no longer a tie
    with pytest.raises(V.VerificationError, match="row 0 rank 0"):
        V._compare_ranking("recommend", "item_ids", got, case, 10, 1e-4, 1e-4)


def _custom_gradient_functions(export_dir: str) -> list[str]:
    """Functions of the SavedModel whose ops carry a custom gradient: what makes every load
    log "Importing a function ... with ops with unsaved custom gradients"."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(export_dir, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    library = proto.meta_graphs[0].graph_def.library
    return [fn.signature.name for fn in library.function
            if any("_gradient_op_type" in node.attr for node in fn.node_def)]


def test_the_export_carries_no_custom_gradient_and_no_keras_layers(exported):
    export_dir, _ = exported
    assert _custom_gradient_functions(export_dir) == []
    with open(os.path.join(export_dir, "saved_model.pb"), "rb") as f:
        assert b"layer_call_and_return_conditional_losses" not in f.read()


def test_the_custom_gradient_check_can_fail(tmp_path):
    @tf.custom_gradient
    def doubled(x):
        return 2 * x, lambda upstream: 2 * upstream

    module = tf.Module()
    module.call = tf.function(doubled, input_signature=[tf.TensorSpec([None], tf.float32)])
    tf.saved_model.save(module, str(tmp_path), options=tf.saved_model.SaveOptions(
        experimental_custom_gradients=False))
    assert _custom_gradient_functions(str(tmp_path))
