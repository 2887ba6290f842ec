"""The `sample` signature on a real export: synthetic users' items drawn without replacement
from the decoder's softmax at z ~ p(z|c), the same for the same seed whatever the batch."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from recsys_cvae import spec as S
from recsys_cvae.config import ExportConfig
from recsys_cvae.export.saved_model import export_model
from recsys_cvae.model.model_dir import load_trained_model
from recsys_cvae.model.sampling import Z_STREAM, row_noise
from recsys_cvae.training.fit import train
from tests.builders import tiny_model_config


@pytest.fixture(scope="module")
def exported(features_dir, tmp_path_factory) -> tuple[str, object]:
    model_dir = str(tmp_path_factory.mktemp("model"))
    train(features_dir, model_dir, tiny_model_config(15))
    export_dir = export_model(model_dir, str(tmp_path_factory.mktemp("export")),
                              ExportConfig(top_k=10, verify=False))
    return model_dir, tf.saved_model.load(export_dir).signatures["sample"]


def users(region: str, rows: int, seeds, counts) -> dict[str, tf.Tensor]:
    return {"age": tf.constant([35.0] * rows), "region": tf.constant([region] * rows),
            "device": tf.constant(["ios"] * rows), "plan": tf.constant(["free"] * rows),
            "num_items": tf.constant(counts, tf.int32), "seed": tf.constant(seeds, tf.int64)}


def test_rows_have_their_count_of_distinct_items_and_padding(exported):
    _, sample = exported
    counts = [0, 1, 7, 30, 3]
    ids = sample(**users("north", 5, [1, 2, 3, 4, 5], counts))["item_ids"].numpy().astype(str)
    assert ids.shape == (5, 30)
    for row, count in zip(ids, counts):
        drawn = [i for i in row if i]
        assert len(drawn) == count and len(set(drawn)) == count
        assert all(i == "" for i in row[count:])


def test_a_seed_gives_the_same_user_in_any_batch(exported):
    _, sample = exported
    alone = sample(**users("south", 1, [42], [12]))["item_ids"].numpy()
    among = sample(**users("south", 3, [7, 42, 9], [5, 12, 20]))["item_ids"].numpy()
    assert list(alone[0]) == list(among[1][:12])
    other = sample(**users("south", 1, [43], [12]))["item_ids"].numpy()
    assert list(other[0]) != list(alone[0])


def test_single_draws_follow_the_decoder_softmax(exported):
    """num_items = 1 is one categorical draw from softmax(logits at the seed's z): over 3,000
    seeds the drawn item's frequency matches the mean probability the model gives it."""
    model_dir, sample = exported
    model = load_trained_model(model_dir)
    seeds = np.arange(3000)
    drawn = sample(**users("north", 3000, seeds, [1] * 3000))["item_ids"].numpy()[:, 0]
    features = {k: v for k, v in users("north", 3000, seeds, [1] * 3000).items()
                if k in ("age", "region", "device", "plan")}
    noise = row_noise(tf.constant(seeds, tf.int64), model.model_config.latent_dim, Z_STREAM,
                      normal=True)
    probabilities = tf.nn.softmax(model.sample_logits(features, noise)).numpy().mean(axis=0)
    items = np.array(model.item_ids, dtype=object)
    for item in np.argsort(-probabilities)[:5]:  # the five likeliest items
        frequency = np.mean(drawn.astype(str) == items[item])
        error = np.sqrt(probabilities[item] * (1 - probabilities[item]) / 3000)
        assert abs(frequency - probabilities[item]) < 4 * error + 1e-3, items[item]


def test_the_attributes_reach_the_sampler(exported, features_dir):
    # Same seeds, other region: the condition c moves the prior and the decoder, so some
    # users' draws change (the per-segment fidelity itself is measured on MovieLens by
    # `synthesize`'s report, README "Synthetic users").
    _, sample = exported
    regions = S.FeatureSpec.load(features_dir).attribute_vocabulary("region")[:2]
    drawn = [sample(**users(region, 400, np.arange(400), [10] * 400))["item_ids"].numpy()
             for region in regions]
    assert any(set(a) != set(b) for a, b in zip(*drawn))
