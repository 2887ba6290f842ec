"""Builders the tests share: small feature folders and configs, written from explicit users.

Why one module: tests that import each other's helpers couple unrelated files (moving one
breaks the other) and run the other file's module-level code; every shared builder lives here,
every shared fixture in `tests/conftest.py`.
"""

from __future__ import annotations

import collections
import glob
import os

import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2

from recsys_cvae import candidates_format as C
from recsys_cvae import spec as S
from recsys_cvae import user_records as UR
from recsys_cvae.config import Config, ModelConfig
from recsys_cvae.datasets import layouts as L
from recsys_cvae.metrics import ranking_metrics
from recsys_cvae.spec import TRAIN, FeatureSpec
from recsys_cvae.training.dataset import make_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_ITEMS = ["a", "b", "c"]
TINY_REGIONS = ["north", "south"]

# Three training users: ids, history, targets, region, age (None = unknown).
TINY_USERS = [
    ("u1", ["a", "b"], [], "north", 30.0),
    ("u2", ["c"], ["a"], "south", None),
    ("u3", [], ["b", "c"], None, 50.0),
]


def write_tiny_features(directory: str, users=TINY_USERS, files: int = 1) -> S.FeatureSpec:
    """A features directory with 3 items, a `region` and an `age` attribute, one split."""
    S.write_vocabulary(os.path.join(directory, "vocab", "items.txt"), TINY_ITEMS)
    S.write_vocabulary(os.path.join(directory, "vocab", "attr_region.txt"), TINY_REGIONS)
    attributes = (
        S.AttributeSpec("region", S.CATEGORICAL, "vocab/attr_region.txt", len(TINY_REGIONS)),
        S.AttributeSpec("age", S.NUMERIC, mean=40.0, std=10.0),
    )
    os.makedirs(os.path.join(directory, S.TRAIN), exist_ok=True)
    for f in range(files):
        path = os.path.join(directory, S.TRAIN, f"part-{f:05d}-of-{files:05d}.tfrecord.gz")
        with tf.io.TFRecordWriter(path, options="GZIP") as writer:
            for user_id, history, targets, region, age in users[f::files]:
                values = {"region": region, "age": age}
                writer.write(UR.encode_user_example(attributes, user_id, history, targets, values))
    spec = S.FeatureSpec(
        attributes=attributes,
        item_vocabulary_file="vocab/items.txt",
        num_items=len(TINY_ITEMS),
        splits={S.TRAIN: S.SplitSpec("train/part-*.tfrecord.gz", len(users))},
    )
    spec.save(directory)
    return S.FeatureSpec.load(directory)


def write_toy_features(
    directory: str,
    items: list[str],
    categorical: dict[str, list[str]],
    users: dict[str, list[tuple[str, list[str], list[str], dict]]],
) -> S.FeatureSpec:
    """A features directory from explicit users: split -> [(user_id, history, targets, attrs)].

    `categorical` maps each (categorical) attribute to its vocabulary; no numeric attributes.
    """
    attributes = tuple(
        S.AttributeSpec(name, S.CATEGORICAL, f"vocab/attr_{name}.txt", len(values))
        for name, values in categorical.items()
    )
    S.write_vocabulary(os.path.join(directory, "vocab", "items.txt"), items)
    for name, values in categorical.items():
        S.write_vocabulary(os.path.join(directory, "vocab", f"attr_{name}.txt"), values)
    splits = {}
    for split in S.SPLITS:
        rows = users.get(split, [])
        os.makedirs(os.path.join(directory, split), exist_ok=True)
        path = os.path.join(directory, split, "part-00000-of-00001.tfrecord.gz")
        with tf.io.TFRecordWriter(path, options="GZIP") as writer:
            for user_id, history, targets, attrs in rows:
                writer.write(UR.encode_user_example(attributes, user_id, history, targets, attrs))
        splits[split] = S.SplitSpec(f"{split}/part-*.tfrecord.gz", len(rows))
    S.FeatureSpec(attributes, "vocab/items.txt", len(items), splits).save(directory)
    return S.FeatureSpec.load(directory)


def tiny_model_config(epochs: int, **train_fields) -> Config:
    """The smallest CVAE worth exporting (latent 8, one hidden layer of 32), batches of 64,
    one device: for tests that need a real trained model and export, not a good one."""
    config = Config()
    config.model = ModelConfig(latent_dim=8, hidden_dims=[32], embedding_dim=4, condition_dim=8)
    config.train.epochs, config.train.batch_size = epochs, 64
    config.train.strategy, config.train.verbose = "default", 0
    for name, value in train_fields.items():
        setattr(config.train, name, value)
    return config


def small_config(epochs: int, **train_fields) -> Config:
    config = Config()
    config.train.epochs = epochs
    config.train.beta_anneal_steps = 20
    config.train.verbose = 0
    config.model.linear_blend_lambdas = []  # best weights = the best epoch's (blend: own test)
    config.model.low_pass_weights = []  # likewise the low-pass filter (own test)
    config.model.attribute_lift_weights = []  # likewise the attribute lift (own test)
    # Five epochs train the warm path; the cold-start term (own tests in test_model.py and
    # the end-to-end run) would share them and blur what these tests check.
    config.model.prior_reconstruction_weight = 0.0
    for name, value in train_fields.items():
        setattr(config.train, name, value)
    return config


def sampled_config(epochs: int, **train_fields) -> Config:
    """10 negatives; batches of 8 users, whose histories cover ~90 of the 120 items, so the
    draws matter (a batch covering the catalogue makes the loss the full one)."""
    config = small_config(epochs, batch_size=8, **train_fields)
    config.model.sampled_softmax_negatives = 10
    config.model.linear_branch_max_items = 0
    return config


def popularity_ndcg_at_10(spec: FeatureSpec, split: str) -> float:
    """NDCG@10 of recommending the most-consumed training items the user has not seen."""
    counts = collections.Counter()
    for batch in make_dataset(spec, TRAIN, batch_size=64):
        for row in batch["history_item_ids"].numpy():
            counts.update(item.decode() for item in row if item)
    ranking = [item for item, _ in counts.most_common()]
    ranked, truth = [], []
    for batch in make_dataset(spec, split, batch_size=64):
        rows = zip(batch["history_item_ids"].numpy(), batch["target_item_ids"].numpy())
        for history, targets in rows:
            seen = {item.decode() for item in history if item}
            relevant = {item.decode() for item in targets if item}
            if relevant:
                ranked.append([item for item in ranking if item not in seen][:10])
                truth.append(relevant)
    return float(np.mean(ranking_metrics(ranked, truth, [10])["ndcg@10"]))


TOY_ITEMS = ["a", "b", "c", "d", "e"]


def write_toy_candidates(
    directory: str, model: str, split: str, rows: dict[str, list[str]]
) -> None:
    """One model's candidates for one split; scores fall with the rank."""
    scores = [[float(len(ids) - r) for r in range(len(ids))] for ids in rows.values()]
    table = C.to_table(list(rows), list(rows.values()), scores, f"{model}/1")
    C.write_split(directory, model, split, table)


def write_toy_dirs(tmp_path) -> tuple[str, str, str]:
    """(features, candidates, report) folders: 5 items, two models' candidates (test, cold)."""
    features = str(tmp_path / "features")
    write_toy_features(
        features,
        TOY_ITEMS,
        {"region": ["north", "south"]},
        {
            "train": [("t1", ["a", "b"], [], {"region": "north"})],
            "test": [
                ("u1", ["d"], ["a", "c"], {"region": "north"}),
                ("u2", ["a"], ["b"], {"region": "south"}),
                ("u3", ["a", "b"], [], {"region": "north"}),  # no targets: skipped
                ("u4", ["a"], ["e"], {"region": ""}),
            ],
            "cold": [("c1", [], ["d"], {"region": "south"})],
        },
    )
    candidates = str(tmp_path / "candidates")
    write_toy_candidates(
        candidates, "m1", "test", {"u1": ["a", "b", "c"], "u2": ["c", "d"], "u3": ["a"]}
    )
    write_toy_candidates(candidates, "m1", "cold", {"c1": ["d"]})
    write_toy_candidates(candidates, "m2", "test", {"u1": ["c"], "u2": ["b", "a"], "u4": ["e"]})
    return features, candidates, str(tmp_path / "report")




# ---- features with a derived attribute (export, candidates) -------------------------------

ZIP_ITEMS = [f"i{n}" for n in range(12)]
ZIP_REGIONS = ["5", "E", "9", "0", "T"]
# split -> [(user_id, history, targets, raw profile)]: the profile as a client holds it
# (u.user columns), the records hold zip_region = zip_code[:1].upper() (the feature job's
# ML-100K rule, written out here independently of recsys_cvae.derivations).
ZIP_USERS = {
    S.TRAIN: [
        ("t1", ["i0", "i1", "i2"], [], {"gender": "F", "age": 25.0, "zip_code": "55105"}),
        ("t2", ["i3", "i4"], [], {"gender": "M", "age": 41.0, "zip_code": "e1a 2b3"}),
        ("t3", ["i5", "i6", "i7"], [], {"gender": "F", "age": None, "zip_code": "94110"}),
    ],
    S.VALIDATION: [
        ("v1", ["i1"], ["i2"], {"gender": "M", "age": 33.0, "zip_code": "02139"}),
        ("v2", ["i4", "i8"], ["i9"], {"gender": "", "age": 52.0, "zip_code": "T8H1N"}),
    ],
    S.TEST: [
        ("s1", ["i0", "i9"], ["i3"], {"gender": "F", "age": 29.0, "zip_code": "55105"}),
        ("s2", ["i2"], ["i5"], {"gender": "M", "age": None, "zip_code": "e1a 2b3"}),
        ("s3", ["i10", "i11"], ["i1"], {"gender": "F", "age": 61.0, "zip_code": ""}),
        ("s4", ["i6"], ["i7"], {"gender": "M", "age": 38.0, "zip_code": "x0x 0x0"}),
    ],
    S.COLD: [
        ("c1", [], ["i4"], {"gender": "F", "age": 45.0, "zip_code": "98052"}),
        ("c2", [], ["i8"], {"gender": "M", "age": 22.0, "zip_code": "e2a4h"}),
        ("c3", [], ["i0"], {"gender": "", "age": None, "zip_code": ""}),
    ],
}


def write_zip_features(directory: str) -> S.FeatureSpec:
    """A features directory whose spec derives `zip_region` from the raw `zip_code` (as
    ML-100K's), next to a raw categorical `gender` and a numeric `age`; 12 items, 4 splits."""
    attributes = (
        S.AttributeSpec("gender", S.CATEGORICAL, "vocab/attr_gender.txt", 2),
        S.AttributeSpec("age", S.NUMERIC, mean=35.0, std=10.0),
        S.AttributeSpec("zip_region", S.CATEGORICAL, "vocab/attr_zip_region.txt",
                        len(ZIP_REGIONS), derived_from="zip_code",
                        derivation="first_char_upper"),
    )  # fmt: skip
    S.write_vocabulary(os.path.join(directory, "vocab", "items.txt"), ZIP_ITEMS)
    S.write_vocabulary(os.path.join(directory, "vocab", "attr_gender.txt"), ["F", "M"])
    S.write_vocabulary(os.path.join(directory, "vocab", "attr_zip_region.txt"), ZIP_REGIONS)
    splits = {}
    for split, rows in ZIP_USERS.items():
        os.makedirs(os.path.join(directory, split), exist_ok=True)
        path = os.path.join(directory, split, "part-00000-of-00001.tfrecord.gz")
        with tf.io.TFRecordWriter(path, options="GZIP") as writer:
            for user_id, history, targets, profile in rows:
                values = {"gender": profile["gender"], "age": profile["age"],
                          "zip_region": profile["zip_code"][:1].upper()}
                writer.write(UR.encode_user_example(attributes, user_id, history, targets, values))
        splits[split] = S.SplitSpec(f"{split}/part-*.tfrecord.gz", len(rows))
    S.FeatureSpec(attributes, "vocab/items.txt", len(ZIP_ITEMS), splits).save(directory)
    return S.FeatureSpec.load(directory)


def zip_profiles() -> dict[str, dict]:
    """user_id -> raw profile of every ZIP_USERS user."""
    return {user: profile for rows in ZIP_USERS.values() for user, _, _, profile in rows}


# ---- raw input files (datasets) -------------------------------------------------------------


def write_raw(path, text: str, encoding: str = "utf-8") -> None:
    path.write_bytes(text.encode(encoding))


def parsed_rows(layout: L.Layout, role: str) -> list:
    return [(line, layout.parse(role, raw)) for line, raw in L.iter_raw_rows(layout, role)]


# ---- feature files (beam_jobs) --------------------------------------------------------------


def read_feature_split(spec: S.FeatureSpec, split: str) -> list[dict]:
    records = []
    for path in sorted(glob.glob(spec.split_pattern(split))):
        for serialized in tf.data.TFRecordDataset(path, compression_type="GZIP"):
            records.append(UR.decode_user_example(serialized.numpy(), spec.attributes))
    return records


# ---- TF Serving requests (serving) -----------------------------------------------------------

NORTH_EMPTY = {"item_ids": [[""]], "region": ["north"], "age": [30.0]}


def predict_request(inputs: dict, signature: str = "recommend", name: str = "recsys_cvae",
                 version: int | None = None, label: str = "", output_filter=()):
    request = predict_pb2.PredictRequest(output_filter=list(output_filter))
    request.model_spec.name = name
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    if label:
        request.model_spec.version_label = label
    for key, value in inputs.items():
        dtype = tf.float32 if key == "age" else tf.string
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value, dtype=dtype))
    return request


def outputs_of(response) -> dict:
    return {key: tf.make_ndarray(proto) for key, proto in response.outputs.items()}


# ---- a tiny SavedModel with the export's signatures (serving) ------------------------------

# The tiny served model (the serving tests): five items, a region bias, top 3.
SERVING_ITEMS = ["i1", "i2", "i3", "i4", "i5"]
SERVING_TOP_K = 3


class TinyRecommender(tf.Module):
    """Fixed item scores + a region bias, with history masking, top-K inside the graph.

    Scores are `base[item] + region bias`, where the bias adds 10 to i5 for "north" and to
    i4 for "south"; items in the history are masked out (score -inf); top K = 3. So with
    V1_SCORES (5, 4, 3, 2, 1): history [], region "north" -> i5 (11), i1 (5), i2 (4);
    history ["i1"], region "" -> i2 (4), i3 (3), i4 (2). `encode` returns
    z_mean = [age (NaN -> 0), number of known history items], z_log_var = 0.
    """

    def __init__(self, base_scores: list[float]):
        super().__init__()
        self.items = tf.constant(SERVING_ITEMS)
        self.base = tf.Variable(base_scores, dtype=tf.float32)
        self.regions = tf.constant(["north", "south"])
        self.region_bias = tf.constant(
            [[0, 0, 0, 0, 10], [0, 0, 0, 10, 0]], dtype=tf.float32
        )

    def _scores(self, region: tf.Tensor) -> tf.Tensor:
        """[batch] region -> [batch, 5] item scores."""
        match = tf.cast(tf.equal(region[:, None], self.regions[None, :]), tf.float32)
        return self.base[None, :] + tf.matmul(match, self.region_bias)

    def _in_history(self, item_ids: tf.Tensor) -> tf.Tensor:
        """[batch, n] history -> [batch, 5] bool, True where the item was seen."""
        return tf.reduce_any(tf.equal(item_ids[:, :, None], self.items[None, None, :]), axis=1)

    def _top_k(self, scores: tf.Tensor) -> dict[str, tf.Tensor]:
        best = tf.math.top_k(scores, k=SERVING_TOP_K)
        return {"item_ids": tf.gather(self.items, best.indices), "scores": best.values}

    @tf.function(input_signature=[
        tf.TensorSpec([None, None], tf.string, name="item_ids"),
        tf.TensorSpec([None], tf.string, name="region"),
        tf.TensorSpec([None], tf.float32, name="age"),
    ])
    def recommend(self, item_ids, region, age):
        scores = self._scores(region)
        return self._top_k(tf.where(self._in_history(item_ids), -np.inf, scores))

    @tf.function(input_signature=[
        tf.TensorSpec([None], tf.string, name="region"),
        tf.TensorSpec([None], tf.float32, name="age"),
    ])
    def generate(self, region, age):
        return self._top_k(self._scores(region))

    @tf.function(input_signature=[
        tf.TensorSpec([None, None], tf.string, name="item_ids"),
        tf.TensorSpec([None], tf.string, name="region"),
        tf.TensorSpec([None], tf.float32, name="age"),
    ])
    def encode(self, item_ids, region, age):
        known = tf.reduce_sum(tf.cast(self._in_history(item_ids), tf.float32), axis=1)
        age = tf.where(tf.math.is_nan(age), 0.0, age)
        z_mean = tf.stack([age, known], axis=1)
        return {"z_mean": z_mean, "z_log_var": tf.zeros_like(z_mean)}


def save_version(base_path: str, version: int, base_scores: list[float]) -> str:
    """Writes version `version` the way the export does: to a temp folder, then renamed."""
    module = TinyRecommender(base_scores)
    final = os.path.join(base_path, str(version))
    tmp = os.path.join(base_path, f".tmp-{version}")
    tf.saved_model.save(module, tmp, signatures={
        "serving_default": module.recommend,
        "recommend": module.recommend,
        "generate": module.generate,
        "encode": module.encode,
    })
    os.rename(tmp, final)
    return final


V1_SCORES = [5.0, 4.0, 3.0, 2.0, 1.0]
V2_SCORES = [1.0, 2.0, 3.0, 4.0, 5.0]


def write_self_signed_certificate(folder: str) -> tuple[str, str]:
    """A fresh self-signed CA certificate for 127.0.0.1/localhost: (cert.pem, key.pem) paths."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
    with open(cert_path, "wb") as f:
        f.write(certificate.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_path, key_path


class RecordWeights(tf.keras.callbacks.Callback):
    """Keeps the item-item branch's weights after every epoch."""

    def __init__(self):
        super().__init__()
        self.branches = []

    def on_epoch_end(self, epoch, logs=None):
        self.branches.append(self.model.item_item.weights_matrix.numpy().copy())
