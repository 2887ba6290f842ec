"""The model folder `train` writes and how a trained CVAE comes back from it.

    <model_dir>/config.json              the resolved config, with `features_dir` and
                                         `trained_on` (which splits and users fitted it)
    <model_dir>/best/weights.*           the best epoch's weights (validation's choice)
    <model_dir>/training_metrics.json    every epoch's validation metrics and the best one

Why a module of its own: training writes this layout, export, the verification and the
benchmarks read it; none of them should import the training loop to learn a file name.
"""

from __future__ import annotations

import json
import os

import tensorflow as tf

from recsys_cvae.config import ModelConfig
from recsys_cvae.model.cvae import CVAE, build_model
from recsys_cvae.spec import FeatureSpec

CONFIG_FILE = "config.json"
BEST_WEIGHTS = "best/weights"
METRICS_FILE = "training_metrics.json"
TRAINED_ON = "trained_on"  # config.json's record of the splits and users that fitted it


def read_trained_on(model_dir: str) -> dict:
    """config.json's `trained_on` (splits, users, whether targets were input, refit_of), or
    {} for a folder written before it was recorded."""
    config = _read_config(model_dir)
    return {} if config is None else config.get(TRAINED_ON, {})


def read_training_record(model_dir: str) -> dict | None:
    """{"training": training_metrics.json, "config": config.json} of a trained model folder
    (what the report's training section shows), or None when it has no training metrics."""
    path = os.path.join(model_dir, METRICS_FILE)
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path) as f:
        training = json.load(f)
    return {"training": training, "config": _read_config(model_dir) or {}}


def _read_config(model_dir: str) -> dict | None:
    """The parsed `model_dir/config.json`, or None when the folder has none."""
    path = os.path.join(model_dir, CONFIG_FILE)
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path) as f:
        return json.load(f)


def load_trained_model(model_dir: str) -> CVAE:
    """Rebuilds the model from `model_dir/config.json` and restores the best weights.

    `config.json` is the resolved config `train` wrote, with `features_dir` recorded: the
    feature spec and vocabularies there rebuild the lookup layers exactly.
    """
    path = os.path.join(model_dir, CONFIG_FILE)
    data = _read_config(model_dir)
    if data is None:
        raise FileNotFoundError(f"{path}: no config.json; train a model into {model_dir} first")
    try:
        # A model written before `condition_skip` existed was built without it.
        model_config = ModelConfig(**{"condition_skip": False, **data["model"]})
        features_dir = data["features_dir"]
    except (KeyError, TypeError) as error:
        raise ValueError(f"{path}: not a config written by `recsys-cvae train` ({error})") from None
    weights = os.path.join(model_dir, BEST_WEIGHTS)
    if not tf.io.gfile.exists(weights + ".index"):
        raise FileNotFoundError(f"{weights}: no best weights; training did not finish an epoch")
    model = build_model(FeatureSpec.load(features_dir), model_config)
    model.load_weights(weights).expect_partial()
    return model
