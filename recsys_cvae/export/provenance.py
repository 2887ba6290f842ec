"""`assets.extra/provenance.json`: where an exported model came from, in the export itself.

Why in the export: a SavedModel is what gets copied between buckets, promoted and served for
months; the facts a risk or compliance review asks for — which files (by SHA-256) and rows
trained it, with which settings and code, how it scored — must travel with it, not live in a
workdir that is long gone. `export` writes what is known then (data, features, config, code,
training and validation); the pipeline adds the test metrics per protocol once its evaluation
has run (`record_evaluation`), before anything serves the export. `serve` logs a line of it
when it loads a version, and the model card (`export.model_card`) is written from it.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import posixpath
import subprocess
from collections.abc import Mapping
from typing import Any

import tensorflow as tf

import recsys_cvae
from recsys_cvae import spec as S

PROVENANCE_FILE = "provenance.json"
FORMAT_VERSION = 1
# What the card and the review read of each evaluated model (the report has every metric).
EVALUATION_METRICS = ("ndcg@10", "recall@20", "recall@50", "coverage@10")
CVAE = "cvae"  # the report's name for this product's model
_REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(recsys_cvae.__file__)))


def _utc(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).isoformat(timespec="seconds")


def code_version() -> dict[str, Any]:
    """The package version, and the git commit (and whether the tree had changes) when the
    code runs from a checkout; None for an installed package."""
    version = {"package": "recsys-cvae", "version": recsys_cvae.__version__,
               "git_commit": None, "git_dirty": None}
    if not os.path.isdir(os.path.join(_REPOSITORY, ".git")):
        return version
    try:
        commit = subprocess.run(["git", "-C", _REPOSITORY, "rev-parse", "HEAD"],
                                capture_output=True, text=True, timeout=10, check=True)
        status = subprocess.run(["git", "-C", _REPOSITORY, "status", "--porcelain",
                                 "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return version
    version.update(git_commit=commit.stdout.strip(), git_dirty=bool(status.stdout.strip()))
    return version


def _read_json(path: str) -> dict | None:
    return json.loads(S.read_text(path)) if tf.io.gfile.exists(path) else None


def _training_summary(metrics: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The run's choices and its validation scores (not the per-epoch history)."""
    if metrics is None:
        return None
    keep = ("selection_metric", "best_epoch", "epochs_run", "best_beta", "strategy",
            "linear_blend", "attribute_lift")
    summary = {key: metrics[key] for key in keep if key in metrics}
    summary["validation"] = metrics.get("best") or None
    return summary


def build_provenance(model_dir: str, created: float | None = None) -> dict[str, Any]:
    """The provenance of the model trained in `model_dir` (its config.json names the features
    directory, whose spec holds the input files' digests and row counts)."""
    config = _read_json(posixpath.join(model_dir, "config.json")) or {}
    features_dir = config.get("features_dir", "")
    spec_path = posixpath.join(features_dir, S.SPEC_FILE)
    spec_text = S.read_text(spec_path) if features_dir and tf.io.gfile.exists(spec_path) else ""
    counts = json.loads(spec_text).get("counts", {}) if spec_text else {}
    window = counts.get("time_window")
    resolved = {key: value for key, value in config.items()
                if key not in ("features_dir", "trained_on")}
    return {
        "format_version": FORMAT_VERSION,
        "created": _utc(created if created is not None else datetime.datetime.now().timestamp()),
        "code": code_version(),
        "data": {
            "inputs": counts.get("inputs", []),
            "rows_read": counts.get("rows_read"),
            "rows_valid": counts.get("rows_valid"),
            "rows_dead_lettered": counts.get("rows_dead_lettered"),
            "time_window": None if not window else {
                "first": _utc(window["first"]), "last": _utc(window["last"]),
                "first_unix": window["first"], "last_unix": window["last"]},
            "users": counts.get("users"),
            "items": counts.get("items"),
        },
        "features": {
            "directory": features_dir,
            "feature_spec_sha256": hashlib.sha256(spec_text.encode()).hexdigest()
            if spec_text else None,
            "users_per_split": counts.get("users_per_split", {}),
        },
        "trained_on": config.get("trained_on", {}),
        "training": _training_summary(_read_json(posixpath.join(model_dir,
                                                                "training_metrics.json"))),
        "config": resolved,
        "evaluation": None,
    }


def provenance_path(export_dir: str) -> str:
    return posixpath.join(export_dir, "assets.extra", PROVENANCE_FILE)


def read_provenance(export_dir: str) -> dict | None:
    """The export's provenance, or None for an export written before it was recorded."""
    return _read_json(provenance_path(export_dir))


def write_provenance(export_dir: str, provenance: Mapping[str, Any]) -> str:
    """Writes (or replaces, through a temporary file and a rename) the export's provenance."""
    path = provenance_path(export_dir)
    temporary = path + ".tmp"
    S.write_text(temporary, json.dumps(provenance, indent=2) + "\n")
    tf.io.gfile.rename(temporary, path, overwrite=True)
    return path


def evaluation_record(
    metrics: Mapping[str, Any], protocol_models: Mapping[str, str]
) -> dict[str, Any]:
    """Per protocol: its test split, each model's test metrics with their bootstrap intervals
    (the report's `metrics.json`), the CVAE's validation scores (the protocol model's
    training run in `protocol_models[protocol]`) and its scores per attribute group."""
    record = {}
    for protocol, split in metrics.get("protocols", {}).items():
        scores, intervals = metrics["splits"].get(split, {}), metrics.get("ci", {}).get(split, {})
        test = {
            model: {**{m: values[m] for m in EVALUATION_METRICS if m in values},
                    "ci": {m: intervals.get(model, {}).get(m) for m in EVALUATION_METRICS
                           if intervals.get(model, {}).get(m) is not None}}
            for model, values in scores.items()
        }
        model_dir = protocol_models.get(protocol)
        training = _read_json(posixpath.join(model_dir, "training_metrics.json")) if (
            model_dir) else None
        record[protocol] = {
            "split": split,
            "users": metrics.get("users", {}).get(split, {}).get("evaluated"),
            "validation": (training or {}).get("best") or None,
            "test": test,
            "segments": _segments(metrics.get("segments", {}).get(split, {}).get(CVAE, {})),
        }
    return record


def _segments(by_attribute: Mapping[str, Mapping[str, Any]]) -> dict[str, dict]:
    """The CVAE's NDCG@10 per attribute group (and per activity band), with users and
    interval: what the model card's gaps between groups are read from."""
    return {
        attribute: {group: {"ndcg@10": values.get("ndcg@10"), "users": values.get("users"),
                            "ci": {"ndcg@10": (values.get("ci") or {}).get("ndcg@10")}}
                    for group, values in groups.items()}
        for attribute, groups in by_attribute.items()
    }


def record_evaluation(
    export_dir: str, metrics: Mapping[str, Any], protocol_models: Mapping[str, str]
) -> dict[str, Any]:
    """Adds the evaluation (`evaluation_record`) to the export's provenance; returns it."""
    provenance = read_provenance(export_dir)
    if provenance is None:
        raise FileNotFoundError(f"{provenance_path(export_dir)}: no provenance to add to")
    provenance["evaluation"] = evaluation_record(metrics, protocol_models)
    write_provenance(export_dir, provenance)
    return provenance
