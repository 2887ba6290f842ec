"""Training callbacks: the β schedule and the per-epoch ranking validation with early stopping."""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import numpy as np
import tensorflow as tf

from recsys_cvae.config import ExportConfig
from recsys_cvae.metrics import ranking_metrics
from recsys_cvae.model import CVAE
from recsys_cvae.spec import TARGETS
from recsys_cvae.top_k import catalogue_top_k

log = logging.getLogger(__name__)

SELECTION_METRIC = "ndcg@10"
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
    """Each epoch: Recall@20 and NDCG@10 on the validation users; keeps the best weights.

    Fold-in history → `recommend_logits`, history items excluded, top 20 compared with the
    held-out targets by `recsys_cvae.metrics.ranking_metrics`. The metrics are added to the
    epoch logs as `val_recall@20`, `val_ndcg@10` (TensorBoard and History see them). When
    NDCG@10 improves the weights go to `best_weights`; after `patience` epochs without
    improvement training stops. Progress and the best epoch are written to `metrics_path`
    every epoch, and read back when `resume` is set (a BackupAndRestore restart).
    """

    def __init__(
        self,
        dataset: tf.data.Dataset | None,
        best_weights: str,
        metrics_path: str,
        patience: int,
        resume: bool = False,
    ) -> None:
        super().__init__()
        self.dataset = dataset
        self.best_weights = best_weights
        self.metrics_path = metrics_path
        self.patience = patience
        self.history: list[dict[str, float]] = []
        self.best: dict[str, float] = {}
        self.best_epoch = 0
        self.wait = 0
        self._top_k = None
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
        score = metrics.get(SELECTION_METRIC)
        improved = score is None or not self.best or score > self.best[SELECTION_METRIC]
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
        """Mean validation `recall@k` and `ndcg@k` for k in (10, 20), over users with targets."""
        model: CVAE = self.model
        if self._top_k is None:
            self._top_k = _top_k_function(model, max(VALIDATION_KS))
        item_ids = np.array(model.item_ids, dtype=object)
        ranked, truth = [], []
        for batch in self.dataset:
            indices = self._top_k(batch).numpy()
            for row, targets in zip(indices, batch[TARGETS].numpy()):
                relevant = {t.decode() for t in targets if t}
                if relevant:
                    ranked.append(list(item_ids[row]))
                    truth.append(relevant)
        if not truth:
            return {}
        per_user = ranking_metrics(ranked, truth, VALIDATION_KS)
        return {
            f"{kind}@{k}": float(np.mean(per_user[f"{kind}@{k}"]))
            for kind in ("recall", "ndcg")
            for k in VALIDATION_KS
        }

    def write(self, **extra: Any) -> None:
        report = {
            "selection_metric": SELECTION_METRIC,
            "best_epoch": self.best_epoch,
            "best": self.best,
            "wait": self.wait,
            "history": self.history,
            **extra,
        }
        with tf.io.gfile.GFile(self.metrics_path, "w") as f:
            f.write(json.dumps(report, indent=2) + "\n")


def _top_k_function(model: CVAE, k: int):
    """A traced `features → [batch, k]` item indices, best first, history excluded.

    Large catalogues are ranked chunk by chunk, as the export does (`recsys_cvae.top_k`).
    Traced for any batch size and history width (`reduce_retracing`): validation batches
    are padded to their own longest history, and one trace per width costs more than the
    ranking itself.
    """
    k = min(k, len(model.item_ids))

    @tf.function(reduce_retracing=True)
    def top_k(features):
        return catalogue_top_k(model, features, k, ExportConfig().top_k_chunk_size)[1]

    return top_k


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True
