"""Training callbacks: the β schedule and the per-epoch ranking validation with early stopping."""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import numpy as np
import tensorflow as tf

from recsys_cvae.config import EvaluateConfig, ExportConfig
from recsys_cvae.metrics import metric_cutoff, ranking_metrics
from recsys_cvae.model.catalogue_top_k import catalogue_top_k
from recsys_cvae.model.cvae import CVAE
from recsys_cvae.spec import TARGETS

log = logging.getLogger(__name__)

# Logged every epoch whatever the selection metric; it is added when it is not among them.
VALIDATION_KS = (10, 20)


class BetaAnnealing(tf.keras.callbacks.Callback):
    """Raises the KL weight β linearly from 0 to `beta_cap` over `anneal_steps` optimizer steps.

    Why: with the full KL weight from step one the posterior collapses onto the prior before
    the decoder has learnt anything (Bowman et al., 2016); Mult-VAE caps β below 1 because a
    partially regularised model ranks better. β follows the model's `train_steps` variable,
    which BackupAndRestore checkpoints, so a resumed run continues the schedule.
    """

    def __init__(self, beta_cap: float, anneal_steps: int) -> None:
        super().__init__()
        self.beta_cap = beta_cap
        self.anneal_steps = anneal_steps

    def beta_at(self, step: int) -> float:
        if self.anneal_steps <= 0:
            return self.beta_cap
        return self.beta_cap * min(1.0, step / self.anneal_steps)

    def on_train_begin(self, logs: dict | None = None) -> None:
        self._update()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self._update()

    def _update(self) -> None:
        """β for the next step: the schedule at the number of steps taken so far."""
        self.model.beta.assign(self.beta_at(int(self.model.train_steps.numpy())))


class RankingValidation(tf.keras.callbacks.Callback):
    """Each epoch: Recall and NDCG at 10 and 20 on the validation users; keeps the best weights.

    Fold-in history → `recommend_logits`, history items excluded, top K compared with the
    held-out targets by `recsys_cvae.metrics.ranking_metrics`, ranked as the export ranks
    (`catalogue_top_k`, `chunk_size` = `export.top_k_chunk_size`). The metrics are added to
    the epoch logs as `val_recall@20`, `val_ndcg@10`, ... (TensorBoard and History see them).
    When `selection_metric` (`evaluate.selection_metric`, the one that picks every model's
    settings) improves the weights go to `best_weights`; after `patience` epochs without
    improvement training stops. Progress and the best epoch are written to `metrics_path`
    every epoch, and read back when `resume` is set (a BackupAndRestore restart).
    """

    def __init__(
        self,
        dataset: tf.data.Dataset | None,
        best_weights: str,
        metrics_path: str,
        patience: int,
        selection_metric: str = EvaluateConfig().selection_metric,
        chunk_size: int = ExportConfig().top_k_chunk_size,
        resume: bool = False,
    ) -> None:
        super().__init__()
        self.selection_metric = selection_metric
        self.ks = tuple(sorted({*VALIDATION_KS, metric_cutoff(selection_metric)}))
        self.chunk_size = chunk_size
        self.dataset = dataset
        self.best_weights = best_weights
        self.metrics_path = metrics_path
        self.patience = patience
        self.history: list[dict[str, float]] = []
        self.best: dict[str, float] = {}
        self.best_epoch = 0
        self.wait = 0
        self._rank = None
        if resume and tf.io.gfile.exists(metrics_path):
            with tf.io.gfile.GFile(metrics_path) as f:
                saved = json.load(f)
            self.history = saved.get("history", [])
            self.best = saved.get("best", {})
            self.best_epoch = saved.get("best_epoch", 0)
            self.wait = saved.get("wait", 0)

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        # After a restore, epochs past the restored one were lost with the crash.
        self.history = [h for h in self.history if h["epoch"] <= epoch]

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs if logs is not None else {}
        metrics = self.evaluate() if self.dataset is not None else {}
        for name, value in metrics.items():
            logs[f"val_{name}"] = value
        score = metrics.get(self.selection_metric)
        improved = score is None or not self.best or score > self.best[self.selection_metric]
        if improved:
            self.best, self.best_epoch, self.wait = dict(metrics), epoch + 1, 0
            self.model.save_weights(self.best_weights)
        else:
            self.wait += 1
        self.history.append(
            {"epoch": epoch + 1, **{k: float(v) for k, v in logs.items() if _is_number(v)}}
        )
        self.write()
        log.info(
            "epoch %d: loss %.4f  %s%s",
            epoch + 1,
            float(logs.get("loss", math.nan)),
            "  ".join(f"val {k} {v:.4f}" for k, v in metrics.items()),
            "  (best)" if improved else "",
        )
        if self.patience > 0 and self.wait >= self.patience:
            self.model.stop_training = True

    def evaluate(self) -> dict[str, float]:
        """Mean validation `recall@k` and `ndcg@k` for k in `self.ks` (10, 20 and the selection
        metric's), and the selection metric, over users with targets."""
        model: CVAE = self.model
        if self._rank is None:
            self._rank = _ranking_function(model, max(self.ks), self.chunk_size)
        item_ids = np.array(model.item_ids, dtype=object)
        ranked, truth = [], []
        for batch in self.dataset:
            indices = self._rank(batch).numpy()
            for row, targets in zip(indices, batch[TARGETS].numpy()):
                relevant = {t.decode() for t in targets if t}
                if relevant:
                    ranked.append(list(item_ids[row]))
                    truth.append(relevant)
        if not truth:
            return {}
        per_user = ranking_metrics(ranked, truth, self.ks)
        names = [f"{kind}@{k}" for kind in ("recall", "ndcg") for k in self.ks]
        names += [] if self.selection_metric in names else [self.selection_metric]
        return {name: float(np.mean(per_user[name])) for name in names}

    def write(self, **extra: Any) -> None:
        report = {
            "selection_metric": self.selection_metric,
            "best_epoch": self.best_epoch,
            "best": self.best,
            "wait": self.wait,
            "history": self.history,
            **extra,
        }
        with tf.io.gfile.GFile(self.metrics_path, "w") as f:
            f.write(json.dumps(report, indent=2) + "\n")


def _ranking_function(model: CVAE, k: int, chunk_size: int):
    """A traced `features → [batch, k]` item indices, best first, history excluded.

    Large catalogues are ranked chunk by chunk, as the export does
    (`model.catalogue_top_k`).
    Traced for any batch size and history width (`reduce_retracing`): validation batches
    are padded to their own longest history, and one trace per width costs more than the
    ranking itself.
    """
    k = min(k, len(model.item_ids))

    @tf.function(reduce_retracing=True)
    def rank(features):
        return catalogue_top_k(model, features, k, chunk_size)[1]

    return rank


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True
