"""Large catalogues: the sampled-softmax training option and chunked top-K.

Sampled softmax must reduce to the full multinomial loss when the draws cover the
catalogue, estimate the partition function without bias, refuse bad settings in one line
and still learn; chunked top-K must give the answers of one top-K over the whole
catalogue (history masking, ties, the "" tail), in the export too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from recsys_cvae import spec as S
from recsys_cvae.config import ModelConfig
from recsys_cvae.export import saved_model as E
from recsys_cvae.export import verification as EV
from recsys_cvae.model.catalogue_top_k import (
    catalogue_top_k,
    chunked_top_k,
    full_top_k,
    uses_chunks,
)
from recsys_cvae.model.cvae import build_model
from recsys_cvae.model.losses import (
    multinomial_log_likelihood,
    negative_log_expected_count,
    sample_negatives,
    sampled_multinomial_log_likelihood,
)
from recsys_cvae.model.model_dir import load_trained_model
from recsys_cvae.spec import HISTORY, TEST, VALIDATION
from recsys_cvae.training.callbacks import RankingValidation
from recsys_cvae.training.dataset import make_dataset
from recsys_cvae.training.fit import train
from serving import verify_export as V
from tests.builders import (
    REPO,
    popularity_ndcg_at_10,
    sampled_config,
    write_tiny_features,
)

NO_BRANCH = dict(latent_dim=4, hidden_dims=[8], embedding_dim=3, condition_dim=5,
                 linear_branch_max_items=0)


# ---- sampled softmax: the maths -----------------------------------------------------------


def test_sampled_loss_with_every_other_item_drawn_once_is_the_full_loss():
    # Catalogue of 4 items; the batch's positives P = {0, 2}; draws = the other items
    # {1, 3} once each with N·q = 1 (log expected count 0), so Ẑ = Z exactly.
    logits = tf.constant([[1.0, 2.0, 0.5, -1.0], [0.0, 3.0, 1.0, 2.0]])
    x = tf.constant([[1.0, 0.0, 2.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    full = multinomial_log_likelihood(x, logits)
    sampled = sampled_multinomial_log_likelihood(
        tf.gather(x, [0, 2], axis=1),
        tf.gather(logits, [0, 2], axis=1),
        tf.gather(logits, [1, 3], axis=1),
        tf.zeros([2]),
        tf.constant([False, False]),
    )
    np.testing.assert_allclose(sampled.numpy(), full.numpy(), rtol=1e-6)
    # A draw that hits P is already counted exactly and must not count twice.
    with_hit = sampled_multinomial_log_likelihood(
        tf.gather(x, [0, 2], axis=1),
        tf.gather(logits, [0, 2], axis=1),
        tf.gather(logits, [1, 3, 0], axis=1),
        tf.zeros([3]),
        tf.constant([False, False, True]),
    )
    np.testing.assert_allclose(with_hit.numpy(), full.numpy(), rtol=1e-6)


def test_an_empty_history_row_and_an_empty_batch_give_zero_not_nan():
    # Row 2 has no positives (x = 0): its likelihood is 0, whatever Ẑ is.
    out = sampled_multinomial_log_likelihood(
        tf.constant([[1.0], [0.0]]), tf.constant([[0.5], [0.1]]), tf.constant([[0.2], [0.3]]),
        tf.zeros([1]), tf.constant([False]),
    )
    assert np.isfinite(out.numpy()).all() and out.numpy()[1] == 0.0
    empty = sampled_multinomial_log_likelihood(
        tf.zeros([2, 0]), tf.zeros([2, 0]), tf.constant([[0.2], [0.3]]),
        tf.zeros([1]), tf.constant([False]),
    )
    np.testing.assert_array_equal(empty.numpy(), [0.0, 0.0])


@pytest.mark.parametrize("sampler", ["log_uniform", "uniform"])
def test_draws_follow_q_and_the_partition_estimate_is_unbiased(sampler):
    num_items, draws = 50, 40_000
    q = tf.exp(negative_log_expected_count(tf.range(num_items), num_items, 1, sampler)).numpy()
    assert q.sum() == pytest.approx(1.0, abs=1e-5)
    tf.random.set_seed(3)
    drawn, log_expected = sample_negatives(num_items, draws, sampler)
    frequencies = np.bincount(drawn.numpy(), minlength=num_items) / draws
    assert np.abs(frequencies - q).max() < 0.01  # 4 standard errors of the largest q
    np.testing.assert_allclose(np.exp(log_expected.numpy()) / draws, q[drawn.numpy()],
                               rtol=1e-4)
    # Ẑ_R = Σ_k exp(l_s − log N q(s)) over N = 10 draws, averaged over 4,000 batches of
    # draws, is Z_R = Σ_j exp(l_j) (here P is empty, so R is the whole catalogue).
    logits = np.random.default_rng(0).normal(size=num_items).astype(np.float32)
    batches = drawn.numpy().reshape(-1, 10)
    log_n_q = negative_log_expected_count(batches, num_items, 10, sampler).numpy()
    estimates = np.exp(logits[batches] - log_n_q).sum(axis=1)
    assert estimates.mean() == pytest.approx(np.exp(logits).sum(), rel=0.03)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"sampled_softmax_negatives": -1}, "must be 0 \\(off\\) or a number of negatives"),
        ({"sampled_softmax_negatives": 5, "likelihood": "gaussian"},
         "needs model.likelihood = multinomial"),
        ({"sampled_softmax_negatives": 5, "sampled_softmax_sampler": "zipf"},
         "sampled_softmax_sampler must be one of"),
        ({"sampled_softmax_negatives": 5, "linear_branch_max_items": 5000},
         "needs the item-item branch off: set model.linear_branch_max_items below 3"),
    ],
)
def test_bad_sampled_softmax_settings_are_one_line_errors(tmp_path, fields, message):
    spec = write_tiny_features(str(tmp_path))
    config = ModelConfig(**{**NO_BRANCH, **fields})
    with pytest.raises(ValueError, match=message) as error:
        build_model(spec, config)
    assert "\n" not in str(error.value)


def test_the_model_sampled_elbo_with_the_rest_of_the_catalogue_is_the_full_elbo(tmp_path):
    spec = write_tiny_features(str(tmp_path))  # 3 items a, b, c
    model = build_model(spec, ModelConfig(**NO_BRANCH, sampled_softmax_negatives=2,
                                          prior_reconstruction_weight=0.5))
    batch = next(iter(make_dataset(spec, S.TRAIN, batch_size=3)))  # histories ab, c, -
    full = model._elbo(batch, training=False)
    # Every item drawn once with N·q = 1: the batch's positives a, b, c are all hits, so
    # Ẑ = Σ_P exp(l) = Z, and the loss must be the full one.
    every_item = (tf.range(3), tf.zeros([3]))
    sampled = model._sampled_elbo(batch, training=False, negatives=every_item)
    np.testing.assert_allclose(sampled["reconstruction"].numpy(),
                               full["reconstruction"].numpy(), rtol=1e-5)
    np.testing.assert_allclose(sampled["kl"].numpy(), full["kl"].numpy(), rtol=1e-6)
    np.testing.assert_allclose(sampled["prior_reconstruction"].numpy(),
                               full["prior_reconstruction"].numpy(), rtol=1e-5)
    # A few real draws give a finite estimate that is not the full value.
    drawn = model._sampled_elbo(batch, training=True)
    assert np.isfinite(drawn["reconstruction"].numpy()).all()


def assert_beats_popularity(result: dict, model_dir: str) -> None:
    """Validation NDCG@10 (full softmax) beats popularity, and so does the unseen test split."""
    model = load_trained_model(model_dir)
    assert result["ndcg@10"] > popularity_ndcg_at_10(model.spec, VALIDATION) + 0.05
    test = RankingValidation(make_dataset(model.spec, TEST, 64), "", "", patience=0)
    test.set_model(model)
    assert test.evaluate()["ndcg@10"] > popularity_ndcg_at_10(model.spec, TEST) + 0.03


def test_sampled_training_learns_better_than_popularity(features_dir, tmp_path):
    result = train(features_dir, str(tmp_path), sampled_config(3, strategy="default"))
    with open(tmp_path / "training_metrics.json") as f:
        losses = [h["loss"] for h in json.load(f)["history"]]
    assert losses[-1] < losses[0]
    assert_beats_popularity(result, str(tmp_path))


@pytest.mark.slow
def test_sampled_training_under_mirrored_learns_better_than_popularity(features_dir, tmp_path):
    """Two logical CPUs, each replica drawing its own negatives (a fresh process: logical
    devices must be set before TensorFlow starts)."""
    script = textwrap.dedent(
        f"""
        import json
        from tests.builders import sampled_config
        from recsys_cvae.training.fit import train
        config = sampled_config(3, strategy="mirrored", num_logical_cpus=2)
        print(json.dumps(train({features_dir!r}, {str(tmp_path)!r}, config)))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["replicas"] == 2
    assert_beats_popularity(result, str(tmp_path))


# ---- chunked top-K ------------------------------------------------------------------------


def test_chunked_top_k_breaks_ties_and_masks_like_one_top_k():
    # Two users over 7 items in chunks of 2 (the last chunk has 1 item). Item values with
    # ties: 3.0 at items 1, 2, 4, 6. User 0 has seen item 2; user 1 has seen 1 and 6.
    logits = tf.constant([[1.0, 3.0, 3.0, 0.0, 3.0, 2.0, 3.0],
                          [1.0, 3.0, 3.0, 0.0, 3.0, 2.0, 3.0]])
    history = tf.constant([[2, -1], [1, 6]])
    exclude = tf.constant([[0, 0, 1, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0, 1]], tf.float32)

    # h = 0 and E = 0, so the logits are exactly the biases b (no rounding to break ties).
    hidden, kernel, bias = tf.zeros([2, 1]), tf.zeros([7, 1]), logits[0]

    for k in (1, 3, 7):
        scores, indices = chunked_top_k(hidden, kernel, bias, history, k, 2)
        expected_scores, expected_indices = full_top_k(logits, exclude, k)
        finite = np.isfinite(expected_scores.numpy())
        np.testing.assert_array_equal(indices.numpy()[finite], expected_indices.numpy()[finite])
        np.testing.assert_allclose(scores.numpy(), expected_scores.numpy(), rtol=1e-6)
    # Ties go to the lower index: user 0 gets 1, 4, 6 (2 is seen); user 1 gets 2, 4, 5.
    _, top3 = chunked_top_k(hidden, kernel, bias, history, 3, 2)
    np.testing.assert_array_equal(top3.numpy(), [[1, 4, 6], [2, 4, 5]])


def synthetic_spec(directory: str, num_items: int) -> S.FeatureSpec:
    """An item vocabulary and one categorical attribute, no examples (untrained models)."""
    S.write_vocabulary(os.path.join(directory, "vocab", "items.txt"),
                       [f"item{i}" for i in range(num_items)])
    S.write_vocabulary(os.path.join(directory, "vocab", "attr_region.txt"), ["n", "s"])
    spec = S.FeatureSpec(
        attributes=(S.AttributeSpec("region", S.CATEGORICAL, "vocab/attr_region.txt", 2),),
        item_vocabulary_file="vocab/items.txt",
        num_items=num_items,
        splits={S.TRAIN: S.SplitSpec("train/*.tfrecord.gz", 0)},
    )
    spec.save(directory)
    return S.FeatureSpec.load(directory)


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    """An untrained CVAE over 1,000 items without the item-item branch (random weights)."""
    spec = synthetic_spec(str(tmp_path_factory.mktemp("wide")), 1000)
    tf.keras.utils.set_random_seed(7)
    model = build_model(spec, ModelConfig(latent_dim=8, hidden_dims=[16], embedding_dim=3,
                                          condition_dim=4, linear_branch_max_items=0))
    # Non-zero biases, so the slice of b matters too.
    model.decoder.logits.bias.assign(tf.random.normal([1000], stddev=0.5))
    return model


def wide_features(num_users: int = 6) -> dict[str, tf.Tensor]:
    rng = np.random.default_rng(1)
    history = [[f"item{i}" for i in rng.choice(1000, 12, replace=False)] for _ in range(num_users)]
    history[0][3:] = [""] * 9  # padding
    history[1][0] = "no-such-item"
    return {HISTORY: tf.constant(history),
            "region": tf.constant((["n", "s", ""] * num_users)[:num_users])}


@pytest.mark.parametrize("k, chunk_size", [(10, 128), (200, 128), (50, 999), (1000, 256)])
def test_chunked_top_k_of_the_model_equals_the_full_top_k(wide_model, k, chunk_size):
    features = wide_features()
    assert uses_chunks(wide_model, chunk_size) and not uses_chunks(wide_model, 1000)
    for from_history in (True, False):
        # one_piece_max_logits=0 chunks every call; the default ranks 6 users in one piece.
        scores, indices = catalogue_top_k(wide_model, features, k, chunk_size, from_history,
                                          one_piece_max_logits=0)
        full_scores, full_indices = catalogue_top_k(wide_model, features, k, 0, from_history)
        small_scores, small_indices = catalogue_top_k(wide_model, features, k, chunk_size,
                                                      from_history)
        finite = np.isfinite(full_scores.numpy())
        for got, got_scores in ((indices, scores), (small_indices, small_scores)):
            np.testing.assert_array_equal(got.numpy()[finite], full_indices.numpy()[finite])
            np.testing.assert_allclose(got_scores.numpy(), full_scores.numpy(), atol=1e-5)
        # Scores are the log softmax over the whole catalogue, history items never returned.
        logits = (wide_model.recommend_logits(features) if from_history
                  else wide_model.generate_logits(features)).numpy()
        log_softmax = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        rows = np.arange(len(logits))[:, None]
        np.testing.assert_allclose(scores.numpy()[finite],
                                   log_softmax[rows, indices.numpy()][finite], atol=1e-5)
    seen = wide_model.history_indices(features[HISTORY]).numpy()
    _, indices = catalogue_top_k(wide_model, features, k, chunk_size, one_piece_max_logits=0)
    for row, ranked in zip(seen, indices.numpy()):
        assert not set(row[row >= 0]) & set(ranked[: 1000 - (row >= 0).sum()])


def test_the_chunked_export_answers_like_the_full_one_and_verifies(wide_model, tmp_path):
    items = wide_model.item_ids
    chunked = E.ServingModule(wide_model, top_k=20, chunk_size=128, one_piece_max_logits=0)
    whole = E.ServingModule(wide_model, top_k=20, chunk_size=0)
    assert (chunked.chunk_size, whole.chunk_size) == (128, 0)
    features = wide_features()
    inputs = {"item_ids": features[HISTORY], "region": features["region"]}
    # One user has seen all but 3 items: the tail is "" with score -inf in both forms.
    covering = {"item_ids": tf.constant([items[3:]]), "region": tf.constant(["n"])}
    for request in (inputs, covering):
        got, expected = chunked.recommend(request), whole.recommend(request)
        np.testing.assert_array_equal(got["item_ids"].numpy(), expected["item_ids"].numpy())
        np.testing.assert_allclose(got["scores"].numpy(), expected["scores"].numpy(), atol=1e-5)
    tail = chunked.recommend(covering)
    assert (tail["item_ids"].numpy()[0, 3:] == b"").all()
    assert np.isneginf(tail["scores"].numpy()[0, 3:]).all()

    assert EV.read_export_info(E.write_export(wide_model, str(tmp_path / "base"), top_k=20,
                                             chunk_size=128))["top_k_chunk_size"] == 128
    # The module that chunks every call, saved and checked by both loaders (the TF1 session
    # one runs the graph as tensorflow_model_server does) against the numpy ranking.
    export_dir = str(tmp_path / "chunked")
    tf.saved_model.save(chunked, export_dir, signatures=chunked.signatures())
    loaded = tf.saved_model.load(export_dir)
    for name, signature in loaded.signatures.items():
        ops = V.graph_op_types(signature)
        assert not ops & V.PYTHON_OPS, name
        if name != "encode":
            assert "While" in ops or "StatelessWhile" in ops, name
    users = [{HISTORY: [h.decode() for h in row if h], "region": r.decode()}
             for row, r in zip(features[HISTORY].numpy(), features["region"].numpy())]
    summary = V.check_export(export_dir, EV.build_cases(wide_model, users, top_k=20))
    assert summary["rows"] > 0


def test_a_negative_chunk_size_is_refused(wide_model):
    with pytest.raises(E.ExportError, match="export.top_k_chunk_size must be 0"):
        E.ServingModule(wide_model, top_k=5, chunk_size=-1)
    assert not uses_chunks(wide_model, 0)


def test_item_logits_is_h_times_e_transposed_and_round_trips():
    from recsys_cvae.model.layers import ItemLogits

    layer = ItemLogits(num_items=3)
    h = tf.constant([[1.0, 2.0]])
    logits = layer(h)  # builds E [3, 2], b [3]
    assert layer.kernel.shape == (3, 2) and layer.bias.shape == (3,)
    layer.kernel.assign([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    layer.bias.assign([0.0, 0.5, -1.0])
    # h · Eᵀ + b = [1, 2, 3] + [0, 0.5, -1]
    np.testing.assert_allclose(layer(h).numpy(), [[1.0, 2.5, 2.0]])
    assert logits.dtype == tf.float32
    assert ItemLogits.from_config(layer.get_config()).get_config() == layer.get_config()
