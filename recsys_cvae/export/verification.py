"""Checks an export against the in-process model, from a fresh Python process.

Why a fresh process: TF Serving loads the SavedModel with its own session loader and none of
our Python code, so a check in the exporting process (which still holds the Keras objects)
can pass where the server fails. `verify_export` computes, with numpy from the trained model,
what every signature must answer, and `serving/verify_export.py` (which never imports
recsys_cvae) loads the export with the TF2 loader and TF1's session loader and compares.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import posixpath
import subprocess
import sys
import tempfile
import time

import numpy as np
import tensorflow as tf

from recsys_cvae import spec as S
from recsys_cvae import user_records as UR
from recsys_cvae.export.policy import POLICY_FILE, Policy
from recsys_cvae.export.saved_model import (
    ASSETS_EXTRA,
    ENCODE,
    EXCLUDE_INPUT,
    EXPORT_INFO_FILE,
    GENERATE,
    GENERATE_EXCLUDING,
    HISTORY_INPUT,
    ITEM_IDS,
    NUM_ITEMS_INPUT,
    RECOMMEND,
    RECOMMEND_EXCLUDING,
    SAMPLE,
    SAMPLE_MAX_ITEMS,
    SCORES,
    SEED_INPUT,
    SERVING_DEFAULT,
    Z_LOG_VAR,
    Z_MEAN,
    ExportError,
)
from recsys_cvae.model.model_dir import load_trained_model
from recsys_cvae.model.sampling import Z_STREAM, gumbel_top_k, row_noise

logger = logging.getLogger(__name__)

VERIFY_TIMEOUT_S = 600


def verify_export(export_dir: str, model_dir: str, num_users: int = 16) -> dict:
    """Checks the export against the in-process model, from a fresh Python process.

    Takes up to `num_users` validation/test users (plus edge cases: unknown and padded
    history ids with unknown attribute values, an empty history, and raw spellings of the
    columns derived attributes come from; see `build_cases`), computes what every
    signature must return with the model loaded from `model_dir` (numpy top-K, independent of
    the serving graph), writes inputs and expectations to a JSON file and runs
    `python -m serving.verify_export`, which loads the export with `tf.saved_model.load`
    without importing recsys_cvae. Returns that run's summary (signatures, rows, largest
    score difference, seconds); raises `ExportError` with the subprocess's reason on mismatch.
    """
    model = load_trained_model(model_dir)
    info = read_export_info(export_dir)
    cases = build_cases(model, _verification_users(model.spec, num_users), info["top_k"],
                        read_export_policy(export_dir, list(model.item_ids)))
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="verify-export-") as tmp:
        cases_path = os.path.join(tmp, "cases.json")
        with open(cases_path, "w") as f:
            json.dump(cases, f)
        summary = run_verifier(export_dir, cases_path)
    summary["seconds"] = round(time.time() - started, 2)
    loader = summary.get("session_loader") or {}
    logger.info(
        "verified %s in a fresh process: %s on %d rows, largest score difference %.2g "
        "(TF Serving's session loader: %s), %.1f s", export_dir,
        ", ".join(summary.get("signatures", [])), summary.get("rows", 0),
        summary.get("max_abs_diff", 0.0),
        f"{loader['max_abs_diff']:.2g}" if "max_abs_diff" in loader else "not run",
        summary["seconds"],
    )
    return summary


def read_export_info(export_dir: str) -> dict:
    path = posixpath.join(export_dir, ASSETS_EXTRA, EXPORT_INFO_FILE)
    try:
        return json.loads(S.read_text(path))
    except FileNotFoundError:
        raise ExportError(
            f"{path}: missing; {export_dir} was not written by export_model"
        ) from None
    except json.JSONDecodeError as error:
        raise ExportError(f"{path}: not valid JSON ({error})") from None


def read_export_policy(export_dir: str, item_ids: list[str]) -> Policy | None:
    """The policy baked into the export (`assets.extra/policy.json`), or None."""
    path = posixpath.join(export_dir, ASSETS_EXTRA, POLICY_FILE)
    if not tf.io.gfile.exists(path):
        return None
    return Policy.from_json(json.loads(S.read_text(path)), item_ids)


def run_verifier(export_dir: str, cases_path: str) -> dict:
    """Runs `serving.verify_export` in a fresh interpreter; its last stdout line is JSON."""
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(S.__file__)))
    env = {"TF_CPP_MIN_LOG_LEVEL": "2", **os.environ}
    # The child runs in the repository root (so `serving` imports without recsys_cvae), not
    # in the caller's folder: a relative path must be made absolute here, in the caller's cwd.
    command = [sys.executable, "-m", "serving.verify_export",
               "--export-dir", S.absolute_local_path(export_dir),
               "--cases", S.absolute_local_path(cases_path)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, env=env,
                                cwd=repo_root, timeout=VERIFY_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ExportError(
            f"verification of {export_dir} timed out after {VERIFY_TIMEOUT_S} s"
        ) from None
    if result.returncode != 0:
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit status {result.returncode}"
        raise ExportError(f"verification of {export_dir} failed: {reason}")
    try:
        return json.loads(result.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise ExportError(f"verification of {export_dir}: no summary on stdout") from None


def _verification_users(spec: S.FeatureSpec, num_users: int) -> list[dict]:
    """Up to `num_users` decoded user records, validation first, then test (then others)."""
    order = [s for s in (S.VALIDATION, S.TEST, S.COLD, S.TRAIN) if s in spec.splits]
    users: list[dict] = []
    for split in order:
        if not tf.io.gfile.glob(spec.split_pattern(split)):
            continue
        users.extend(itertools.islice(UR.read_user_records(spec, split), num_users - len(users)))
        if len(users) >= num_users:
            break
    return users


def build_cases(
    model: tf.keras.Model, users: list[dict], top_k: int, policy: Policy | None = None
) -> dict:
    """Inputs and expected outputs of every signature for `users` (decoded records), with
    `policy`'s items removed (computed with its numpy `mask`, not the graph's test).

    Two edge cases are appended: a history of one known id, an unknown id and "" padding
    with every attribute input unknown; and an all-padding history. When the spec has
    derived attributes, a third: the first user with each derived attribute's column
    spelled as a raw profile would hold it (`_raw_spelling`). Signature inputs are the raw
    columns (`spec.serving_inputs`; a record's derived value stands for its column, as the
    derivations are projections); the model's attributes are derived from them in Python
    (`spec.attributes_from_inputs`), so the check covers the graph's derivations too.
    Expected rankings are computed here with numpy from the model's logits and a Python
    history set, not with the serving graph, so the check covers masking, top-K and the id
    lookup.
    """
    spec: S.FeatureSpec = model.spec
    item_ids = list(model.item_ids)
    attributes = list(spec.attributes)
    serving_inputs = S.serving_inputs(spec)
    unknown = {i.name: "" if i.is_categorical else math.nan for i in serving_inputs}
    first_user = S.inputs_from_attributes(spec, users[0]) if users else unknown
    first_history = list(users[0][S.HISTORY]) if users else []
    rows = [(list(u[S.HISTORY]), S.inputs_from_attributes(spec, u)) for u in users]
    rows += [([item_ids[0], "no-such-item-id", ""], unknown), ([], first_user)]
    derived_columns = {a.serving_input for a in attributes if a.is_derived}
    if derived_columns:
        rows.append((first_history, {
            name: _raw_spelling(value) if name in derived_columns else value
            for name, value in first_user.items()
        }))
    width = max(1, max(len(h) for h, _ in rows))
    history = [h + [""] * (width - len(h)) for h, _ in rows]
    input_values = {
        i.name: [str(r[i.name]) if i.is_categorical else float(r[i.name]) for _, r in rows]
        for i in serving_inputs
    }
    derived_rows = [S.attributes_from_inputs(spec, r) for _, r in rows]
    features = {
        a.name: tf.constant(
            [str(r[a.name]) if a.is_categorical else float(r[a.name]) for r in derived_rows],
            tf.string if a.is_categorical else tf.float32,
        )
        for a in attributes
    }
    history_features = {**features, S.HISTORY: tf.constant(history, tf.string)}

    index = {item: i for i, item in enumerate(item_ids)}
    seen = _marked(history, index, len(item_ids))
    recommend_logits = model.recommend_logits(history_features).numpy()
    # Without attributes, generate has no inputs and answers one row: [1, num_items].
    generate_logits = model.generate_logits(features).numpy()

    def removed(rows_: int) -> np.ndarray:
        if policy is None:
            return np.zeros((rows_, len(item_ids)), dtype=bool)
        return policy.mask(input_values, rows_, len(item_ids))

    recommend_removed = seen | removed(len(rows))  # history and policy, per row
    generate_removed = removed(generate_logits.shape[0])
    recommend = _expected_top_k(recommend_logits, recommend_removed, item_ids, top_k)
    generate = _expected_top_k(generate_logits, generate_removed, item_ids, top_k)
    # Request-level exclusions: each row's best answer, an unknown id and padding.
    exclude = [[ids[0], "no-such-item-id", ""] for ids in recommend["expected"][ITEM_IDS]]
    excluded = _marked(exclude, index, len(item_ids))
    recommend_excluding = _expected_top_k(
        recommend_logits, recommend_removed | excluded, item_ids, top_k)
    generate_exclude = exclude[:generate_logits.shape[0]]
    generate_excluding = _expected_top_k(
        generate_logits, generate_removed | excluded[:len(generate_exclude)], item_ids, top_k)
    z_mean, z_log_var = model.encode(history_features)
    sample = _expected_sample(model, features, input_values, len(rows))

    recommend_inputs = {HISTORY_INPUT: history, **input_values}
    recommend_case = {"inputs": recommend_inputs, **recommend}
    return {
        "top_k": top_k,
        "rtol": 1e-4,
        "atol": 1e-4,
        "signatures": {
            SERVING_DEFAULT: recommend_case,
            RECOMMEND: recommend_case,
            GENERATE: {"inputs": input_values, **generate},
            ENCODE: {"inputs": recommend_inputs,
                     "expected": {Z_MEAN: z_mean.numpy().tolist(),
                                  Z_LOG_VAR: z_log_var.numpy().tolist()}},
            RECOMMEND_EXCLUDING: {"inputs": {**recommend_inputs, EXCLUDE_INPUT: exclude},
                                  **recommend_excluding},
            GENERATE_EXCLUDING: {"inputs": {**input_values, EXCLUDE_INPUT: generate_exclude},
                                 **generate_excluding},
            SAMPLE: sample,
        },
    }


def _expected_sample(model: tf.keras.Model, features: dict, input_values: dict,
                     rows: int) -> dict:
    """`sample`'s case: each row asks for a different number of items (0 included), seeded
    by its row; the expectation runs the sampler eagerly on the Keras model."""
    if not input_values:  # no attributes: one row, as generate
        rows, features = 1, {}
    counts = [(3 * r) % 11 for r in range(rows)]
    seeds = [1000 + r for r in range(rows)]
    noise = row_noise(tf.constant(seeds, tf.int64), model.model_config.latent_dim, Z_STREAM,
                      normal=True)
    logits = model.sample_logits(features, noise)
    indices, used = gumbel_top_k(logits, tf.constant(seeds, tf.int64),
                                 tf.constant(counts, tf.int32), SAMPLE_MAX_ITEMS)
    item_ids = list(model.item_ids)
    expected = [[item_ids[i] if ok else "" for i, ok in zip(row, row_used)]
                for row, row_used in zip(indices.numpy().tolist(), used.numpy().tolist())]
    return {"inputs": {**input_values, NUM_ITEMS_INPUT: counts, SEED_INPUT: seeds},
            "expected": {ITEM_IDS: expected}}


def _marked(lists: list[list[str]], index: dict[str, int], num_items: int) -> np.ndarray:
    """`[len(lists), num_items]` bool of the known ids in each list."""
    marked = np.zeros((len(lists), num_items), dtype=bool)
    for r, ids in enumerate(lists):
        marked[r, [index[i] for i in ids if i in index]] = True
    return marked


def _raw_spelling(value: str) -> str:
    """A raw column value a derivation must reduce: the stored derived value lower-cased and
    lengthened ("5" -> "50 raw", "T" -> "t0 raw"), as a client's profile would hold it."""
    return f"{value.lower()}0 raw"


def _expected_top_k(logits: np.ndarray, seen: np.ndarray, item_ids: list[str],
                    top_k: int, margin: int = 16) -> dict:
    """The contract's ranking in numpy: log-softmax, history to -inf, stable sort, top K.

    Also returns `reference_scores`: each row's top K + `margin` items with their scores, so
    the verifier can accept two items swapped by a float tie and nothing else.
    """
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    scores = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    scores = np.where(seen, -np.inf, scores).astype(np.float32)
    order = np.argsort(-scores, axis=1, kind="stable")
    expected_ids, expected_scores, reference = [], [], []
    for row, ranked in zip(scores, order):
        best = ranked[:top_k]
        expected_ids.append(["" if np.isinf(row[i]) else item_ids[i] for i in best])
        expected_scores.append([float(row[i]) for i in best])
        reference.append({item_ids[i]: float(row[i]) for i in ranked[:top_k + margin]
                          if not np.isinf(row[i])})
    return {"expected": {ITEM_IDS: expected_ids, SCORES: expected_scores},
            "reference_scores": reference}
