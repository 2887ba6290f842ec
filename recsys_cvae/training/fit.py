"""Fits the CVAE under a tf.distribute strategy and keeps the best epoch on validation.

    train("W/features", "W/model", config)

writes into the model directory

    config.json              the resolved config, with `features_dir` (load_trained_model)
    best/weights.*           TF checkpoint of the best epoch (evaluate.selection_metric)
    training_metrics.json    per-epoch losses and validation metrics, the best epoch
    logs/                    TensorBoard
    backup/                  BackupAndRestore state while training runs (resume after a crash)

Strategies are chosen by name (`training.strategy`); the callbacks that anneal β and validate
each epoch live in `training.callbacks`. Settings that depend on the data's size are resolved
by `adapt_to_data` and written resolved into config.json. Which splits fit and tune the model
is `recsys_cvae.protocols.fit_splits`'s answer for `train.protocol`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import sys
import time
from typing import Any

import numpy as np
import tensorflow as tf

from recsys_cvae import protocols as P
from recsys_cvae.config import Config
from recsys_cvae.model.cvae import CVAE, build_model, has_item_item_branch
from recsys_cvae.model.ease import ease_from_gram
from recsys_cvae.model.gradient_exchange import gathers_item_item, resolve_gradient_dtype
from recsys_cvae.model.model_dir import BEST_WEIGHTS, CONFIG_FILE, METRICS_FILE, TRAINED_ON
from recsys_cvae.spec import FeatureSpec, absolute_local_path
from recsys_cvae.training.attribute_blend import apply_lift, blend_lift
from recsys_cvae.training.callbacks import BetaAnnealing, RankingValidation
from recsys_cvae.training.dataset import make_dataset
from recsys_cvae.training.ease_blend import add_ease, gram_matrix
from recsys_cvae.training.linear_blend import blend_linear_term
from recsys_cvae.training.low_pass_blend import add_low_pass
from recsys_cvae.training.strategy import choose_strategy, resolve_strategy_name, worker_name

log = logging.getLogger(__name__)

SMALL_DATA_USERS = 20_000


@dataclasses.dataclass(frozen=True)
class FitData:
    """What a model learns from: splits read as one training set, and the split that tunes it.

    Attributes:
      train: the training splits (a protocol model: its protocol's train split).
      validation: the split whose ranking picks the best epoch, or None (every epoch is kept;
        the last one is the model).
      fold_targets: the training users' held-out targets join their history, so every
        interaction is input (the serving refit, `training.refit`).
      hold_out: this share of each training user's history is left out of training, for
        the linear blend to choose on (`training.linear_blend`, `make_dataset(hold_out=)`).
    """

    train: tuple[str, ...]
    validation: str | None
    fold_targets: bool = False
    hold_out: float = 0.0

    def users(self, spec: FeatureSpec) -> int:
        return sum(spec.splits[split].users for split in self.train)

    def describe(self, spec: FeatureSpec) -> dict[str, Any]:
        """The provenance written to config.json and the export's assets."""
        return {"splits": list(self.train), "validation": self.validation,
                "users": self.users(spec), "targets_in_history": self.fold_targets,
                "history_held_out": self.hold_out}


def _fit_inputs(
    strategy: tf.distribute.Strategy,
    spec: FeatureSpec,
    data: FitData,
    batch_size: int,
    seed: int,
) -> tuple[Any, int | None, Any]:
    """(train data, steps per epoch, validation data) for `fit` under `strategy`.

    In one process `fit` splits each global batch across the replicas itself
    (`experimental_distribute_dataset`), and an epoch is one pass over the training users.
    Across workers each worker reads its own shard (`distribute_datasets_from_function`
    with the input context); workers must run the same number of steps, so the data
    repeats and an epoch is counted in steps. Validation loss is skipped there: the
    ranking validation runs on every worker alike.
    """
    fold, held = data.fold_targets, data.hold_out
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        train_data = make_dataset(
            spec, data.train, batch_size, shuffle=True, seed=seed, fold_targets=fold,
            hold_out=held,
        )
        validation_data = (
            make_dataset(spec, data.validation, batch_size) if data.validation else None
        )
        return train_data, None, validation_data
    train_data = strategy.distribute_datasets_from_function(
        lambda context: make_dataset(
            spec, data.train, batch_size, shuffle=True, seed=seed, input_context=context,
            fold_targets=fold, hold_out=held,
        ).repeat()
    )
    return train_data, steps_per_epoch(spec, data, batch_size), None


def steps_per_epoch(spec: FeatureSpec, data: FitData, batch_size: int) -> int:
    """Optimizer steps in one pass over the training users at this global batch size."""
    return max(1, math.ceil(data.users(spec) / batch_size))


def train(
    features_dir: str,
    model_dir: str,
    config: Config,
    callbacks: list[tf.keras.callbacks.Callback] | None = None,
    data: FitData | None = None,
    fixed_blend: dict[str, Any] | None = None,
    provenance: dict[str, Any] | None = None,
    fixed_lift: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Trains the CVAE on `features_dir`'s train split; returns the best validation metrics.

    `data` (default: `train.protocol`'s train and validation splits, `protocols.fit_splits`)
    says what it learns from. `fixed_blend` ({"alpha", "l2"}, as a validated run chose them)
    adds α · EASE(λ) of this run's training users to the item-item branch instead of choosing
    (λ, α) on validation: the serving refit has no validation split; `fixed_lift` likewise
    for the attribute lift (`attribute_blend`). `provenance` is recorded
    next to `data` under config.json's `trained_on`.

    Resumes from `model_dir/backup` when an earlier run stopped before finishing. Extra
    `callbacks` run after the built-in ones (which add the validation metrics to the logs).
    Seeds: `train.seed` seeds Python, NumPy and TensorFlow (initialisation, dropout, z
    sampling) and the shuffle; the same seed, data and strategy give the same run on CPU.
    The best epoch is the one with the best `evaluate.selection_metric` on validation.

    Returns:
      `{"recall@10", "recall@20", "ndcg@10", "ndcg@20"` (best epoch, validation),
      `"best_epoch", "best_beta", "epochs_run", "seconds", "strategy", "replicas"}`.
    """
    start = time.time()
    if config.train.batch_size < 0:
        raise ValueError(
            f"train.batch_size must be at least 1 (or 0: by data size), got "
            f"{config.train.batch_size}"
        )
    strategy_name = resolve_strategy_name(config.train.strategy)
    strategy = choose_strategy(strategy_name, config.train.num_logical_cpus,
                               config.train.collective, config.train.collective_bytes_per_pack)
    tf.keras.utils.set_random_seed(config.train.seed)
    spec = FeatureSpec.load(features_dir)
    config = adapt_to_data(config, spec)
    if data is None:
        training, validation = P.fit_splits(spec, config.train.protocol)
        data = FitData((training,), validation)
    if fixed_blend is None and data.validation and _chooses_blend(spec, config):
        data = dataclasses.replace(data, hold_out=config.model.linear_blend_held_out_share)
    trained_on = {**data.describe(spec), **(provenance or {})}
    run = _prepare_model_dir(strategy, features_dir, model_dir, config, trained_on)
    model = _compiled_model(strategy, spec, config)
    if model.item_item is not None and config.model.linear_init == "ease" and not run.resume:
        model.item_item.weights_matrix.assign(ease_matrix(
            model, spec, data, config.model.linear_init_l2, config.train.batch_size
        ))
    validation = _fit(model, strategy, spec, data, run, config, callbacks or [])
    result = _best_run(validation, strategy_name, strategy, time.time() - start)
    # Every worker blends, not only the chief: the model's variables are the strategy's, and
    # a chief working alone on them waits on collectives the others, gone, never join (the
    # job died with "tasks are unhealthy"). Same weights, same data: the same choices.
    if model.item_item is not None:
        blend = _blend(model, spec, data, config, fixed_blend, run.best_weights)
        if blend is not None:
            result["linear_blend"] = blend
    if model.lift is not None:
        lift = _lift(model, spec, data, config, fixed_lift, run.best_weights)
        if lift is not None:
            result["attribute_lift"] = lift
    validation.write(
        linear_blend=result.get("linear_blend"), attribute_lift=result.get("attribute_lift"),
        epochs_run=result["epochs_run"],
        seconds=result["seconds"], strategy=result["strategy"], best_beta=result["best_beta"],
    )
    if not run.chief:
        tf.io.gfile.rmtree(run.out_dir)
    return result


@dataclasses.dataclass(frozen=True)
class _RunFolders:
    """Where this process writes: the model folder on the chief, a scratch copy elsewhere."""

    chief: bool
    out_dir: str
    backup_dir: str
    resume: bool  # an earlier run of this model_dir stopped before finishing

    @property
    def best_weights(self) -> str:
        return os.path.join(self.out_dir, BEST_WEIGHTS)


def _chooses_blend(spec: FeatureSpec, config: Config) -> bool:
    """Whether this run's CVAE has an item-item branch and a linear blend to choose."""
    return (has_item_item_branch(spec.num_items, config.model)
            and bool(config.model.linear_blend_lambdas))


def _blend(
    model: CVAE, spec: FeatureSpec, data: FitData, config: Config,
    fixed: dict[str, Any] | None, best_weights: str,
) -> dict[str, Any] | None:
    """The best epoch's weights plus EASE's closed form and the low-pass filter
    (`training.linear_blend`: shaped on a fold-in slice of the training users, weighted on
    validation), or at `fixed`'s choice when there is no validation; None when neither
    applies."""
    settings = config.model
    searches = settings.linear_blend_lambdas
    if fixed is None and not (data.validation and searches):
        return None
    if fixed is not None and not (fixed.get("alpha") or fixed.get("low_pass_weight")):
        return dict(fixed)  # the validated run kept its trained branch: so does this one
    model.load_weights(best_weights)
    batch_size = config.train.batch_size
    if fixed is not None:
        if fixed.get("alpha"):
            gram = gram_matrix(model, spec, data.train, batch_size, data.fold_targets)
            add_ease(model, gram, fixed["l2"], fixed["alpha"], fixed.get("dropout", 0.0))
        if fixed.get("low_pass_weight"):
            add_low_pass(model, spec, data.train, batch_size, data.fold_targets, fixed)
        chosen = dict(fixed)
    else:
        chosen = blend_linear_term(model, spec, data.train[0], data.validation, batch_size,
                                   settings, config.evaluate.selection_metric, data.hold_out)
    model.save_weights(best_weights)
    return chosen


def _lift(
    model: CVAE, spec: FeatureSpec, data: FitData, config: Config,
    fixed: dict[str, Any] | None, best_weights: str,
) -> dict[str, Any] | None:
    """The attribute lift on the best epoch's weights (after the EASE blend): chosen on
    validation, or `fixed`'s choice recounted on this run's data; None when neither."""
    settings = config.model
    if fixed is None and not (data.validation and settings.attribute_lift_weights):
        return None
    model.load_weights(best_weights)
    if fixed is not None:
        apply_lift(model, spec, data.train, config.train.batch_size, data.fold_targets, fixed)
        chosen = dict(fixed)
    else:
        chosen = blend_lift(
            model, spec, data.train, data.validation, config.train.batch_size,
            settings.attribute_lift_pseudo_users, settings.attribute_lift_weights,
            config.evaluate.selection_metric, settings.attribute_lift_decoder_weights,
        )
    model.save_weights(best_weights)
    return chosen


def _prepare_model_dir(
    strategy: tf.distribute.Strategy, features_dir: str, model_dir: str, config: Config,
    trained_on: dict[str, Any],
) -> _RunFolders:
    """Creates this process's folder and, on the chief, writes the resolved config.json."""
    # Non-chief workers of a multi-worker job write their copies to a scratch directory.
    worker = worker_name(strategy)
    chief = worker is None
    out_dir = model_dir if chief else os.path.join(model_dir, f"scratch_{worker}")
    tf.io.gfile.makedirs(out_dir)
    backup_dir = os.path.join(model_dir, "backup")
    # BackupAndRestore keeps its checkpoints in backup/chief until fit ends normally.
    resume = tf.train.latest_checkpoint(os.path.join(backup_dir, "chief")) is not None
    if chief:
        # Absolute, so `load_trained_model` works from any working directory.
        resolved = {"features_dir": absolute_local_path(features_dir), **config.to_dict(),
                    TRAINED_ON: trained_on}
        with tf.io.gfile.GFile(os.path.join(model_dir, CONFIG_FILE), "w") as f:
            f.write(json.dumps(resolved, indent=2) + "\n")
    return _RunFolders(chief, out_dir, backup_dir, resume)


def _compiled_model(strategy: tf.distribute.Strategy, spec: FeatureSpec, config: Config) -> CVAE:
    """The CVAE built and compiled in the strategy's scope (mixed float16 when asked)."""
    settings = config.train
    previous_policy = tf.keras.mixed_precision.global_policy()
    if settings.mixed_precision:
        tf.keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        with strategy.scope():
            model = build_model(spec, config.model)
            optimizer = adam(settings.learning_rate)
            if settings.mixed_precision:
                optimizer = tf.keras.mixed_precision.LossScaleOptimizer(optimizer)
            model.compile(optimizer=optimizer)
    finally:
        tf.keras.mixed_precision.set_global_policy(previous_policy)
    multi_worker = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
    model.gradient_dtype = resolve_gradient_dtype(settings.gradient_dtype, multi_worker)
    if model.item_item is not None and gathers_item_item(
            settings.item_item_gradient, spec.num_items, settings.batch_size):
        model.item_item.gather_dtype = model.gradient_dtype
    return model


def _fit(
    model: CVAE,
    strategy: tf.distribute.Strategy,
    spec: FeatureSpec,
    data: FitData,
    run: _RunFolders,
    config: Config,
    extra_callbacks: list[tf.keras.callbacks.Callback],
) -> RankingValidation:
    """`model.fit` with β annealing, ranking validation, backups and TensorBoard."""
    settings = config.train
    train_data, steps, validation_data = _fit_inputs(
        strategy, spec, data, settings.batch_size, settings.seed
    )
    anneal_steps = settings.beta_anneal_steps
    if anneal_steps < 0:  # over the whole run: the best epoch's β is the cap validation chose
        anneal_steps = settings.epochs * steps_per_epoch(spec, data, settings.batch_size)
    validation = RankingValidation(
        make_dataset(spec, data.validation, settings.batch_size) if data.validation else None,
        best_weights=run.best_weights,
        metrics_path=os.path.join(run.out_dir, METRICS_FILE),
        patience=settings.early_stopping_patience,
        selection_metric=config.evaluate.selection_metric,
        chunk_size=config.export.top_k_chunk_size,
        resume=run.resume,
    )
    model.fit(
        train_data,
        epochs=settings.epochs,
        steps_per_epoch=steps,
        validation_data=validation_data,
        callbacks=[
            BetaAnnealing(settings.beta_cap, anneal_steps),
            validation,
            tf.keras.callbacks.BackupAndRestore(run.backup_dir),
            tf.keras.callbacks.TensorBoard(os.path.join(run.out_dir, "logs"), write_graph=False),
            *extra_callbacks,
        ],
        verbose=progress_verbosity(settings.verbose),
    )
    return validation


def progress_verbosity(verbose: int) -> int:
    """Keras's `verbose`, with its bar (1) off when stdout is not a terminal: a log file or
    CI output would fill with `\r` redraws, and `RankingValidation` already logs one line
    per epoch (loss and validation metrics)."""
    if verbose == 1 and not sys.stdout.isatty():
        return 0
    return verbose


def _best_run(
    validation: RankingValidation, strategy_name: str, strategy: tf.distribute.Strategy,
    seconds: float,
) -> dict[str, Any]:
    """What `train` returns: the best epoch's validation metrics and how the run went."""
    best_row = [h for h in validation.history if h["epoch"] == validation.best_epoch]
    return {
        **validation.best,
        "best_epoch": validation.best_epoch,
        "best_beta": best_row[0].get("beta", math.nan) if best_row else math.nan,
        "epochs_run": len(validation.history),
        "seconds": round(seconds, 3),
        "strategy": strategy_name,
        "replicas": strategy.num_replicas_in_sync,
    }


def adam(learning_rate: float) -> tf.keras.optimizers.Adam:
    """Keras Adam with each variable's update compiled by XLA, on CPUs too.

    Why: Keras compiles the update only when it sees a GPU; on a CPU its update is a chain
    of separate element-wise ops, each a pass over the variable and its two moments. On
    the catalogue-sized kernels (`[num_items, units]`, twice) XLA fuses them into one
    pass, ~2.5× faster (`benchmarks/bench_train.py`). Same maths, same slots, same
    checkpoints.
    """
    optimizer = tf.keras.optimizers.Adam(learning_rate)
    optimizer.jit_compile = True
    return optimizer


def ease_matrix(model: CVAE, spec: FeatureSpec, data: FitData, l2: float, batch_size: int):
    """EASE's closed form B on the training users' inputs x (`ease_blend.gram_matrix`), as the
    float32 `[num_items, num_items]` start of the item-item branch. Every worker of a cluster
    computes the same B from the whole training set."""
    gram = gram_matrix(model, spec, data.train, batch_size, data.fold_targets, data.hold_out)
    return ease_from_gram(gram, l2).astype(np.float32)


def adapt_to_data(config: Config, spec: FeatureSpec) -> Config:
    """A copy of `config` with its data-size-dependent settings resolved for this spec.

    The rules (only fields left at their "auto" value are resolved; see `recsys_cvae.config`):
    `train.batch_size = 0` → 128 up to `SMALL_DATA_USERS` training users, else 512 (large
    data: fewer, larger steps amortise the per-step cost of the catalogue-wide softmax, as
    Mult-VAE's 500 on ML-20M). The item-item branch switches itself on below
    `model.linear_branch_max_items` items, and `train.beta_anneal_steps = -1` anneals over
    the whole run whatever its length. `model.prior_reconstruction_fraction = 0` → 1 up to
    `SMALL_DATA_USERS`, else 1/8 (the prior-path term's second decoder pass would otherwise
    double a large catalogue's step; many steps still train it well).
    """
    config = copy.deepcopy(config)
    train_split = P.fit_splits(spec, config.train.protocol)[0]
    users = spec.splits[train_split].users if train_split in spec.splits else 0
    if config.train.batch_size == 0:
        config.train.batch_size = 128 if users <= SMALL_DATA_USERS else 512
    if config.model.prior_reconstruction_fraction == 0:
        config.model.prior_reconstruction_fraction = 1.0 if users <= SMALL_DATA_USERS else 0.125
    return config
