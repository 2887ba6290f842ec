"""Deployment: the model users are served, judged from outside as an evaluator would.

Why: the pipeline's own report scores the CVAE on splits the product chose itself, with its
own readers, vocabularies and candidate files. A regression in any of them (a split that
leaks, a reader that drops rows, an export whose inputs a client cannot fill) can leave the
report happy while the served model is worse. This benchmark holds data out on the RAW files
before the product sees anything, runs `recsys-cvae pipeline` with its defaults exactly as a
user would, loads the SavedModel the way TF Serving does (TF1 session loader, tensors fed and
fetched by the SignatureDef's names) and scores it against baselines it fits itself on the
same training input. No recsys_cvae model, training or export code is imported; only the
shared metric definitions (`recsys_cvae.metrics`) and EASE's closed form
(`recsys_cvae.model.ease.ease_from_gram`), so the numbers mean what the product's mean.

Protocol, per dataset and per split seed (default 0, 1, 2):

 1. Hold-out on the raw files. 10% of the users (blake2b of "<seed>:<user_id>") are cold:
    every interaction and their profile row leave the training input; all their
    interactions are their truth. Every other user keeps a random 80% of their interactions
    (NumPy, seeded) as history and the other 20% are their warm targets. The 80% and the
    non-cold profiles are written in the dataset's own raw layout (ML-100K: u.data, u.user,
    u.item; planted: interactions.csv, users.csv) into a temp folder outside the repository.
 2. `recsys-cvae pipeline --data-dir <folder> --workdir <tmp>/W` runs in a subprocess from
    an empty temp cwd, with the product's defaults (plus `--pipeline-args`, if given); its
    wall time is recorded. A run that fails is rerun from a fresh workdir (`--retries`,
    default 1) and every failed attempt, with its exit status and log tail, goes into the
    JSON: a crash is a result too.
 3. `W/export/<newest version>/` is loaded with `tf.compat.v1.saved_model.loader.load`.
    `recommend` gets each warm user's 80% as `item_ids` ("" pads) and one [batch] tensor per
    attribute input the SignatureDef declares, filled from the user's raw profile column of
    the same name (string or float32 as declared); `generate` gets the attributes only. A
    declared input with no raw column of that name (a column the product derives, such as
    ML-100K's `zip_region`) is a contract failure: a client holding the raw profile cannot
    fill it. It is listed and fed "" (NaN if numeric) so scoring can go on.
 4. Baselines, fitted on the same training input (all non-cold users' 80%):
      popularity     interaction counts over the training input
      EASE           B = ease_from_gram(XᵀX, λ); λ from EASE_LAMBDAS by NDCG@10 on a further
                     10% held out of each warm user's history, then refitted on the full 80%
      segment pop.   (cold only) popularity within the training users sharing one attribute
                     value or a pair of them (numeric attributes cut at the training users'
                     quartiles); the best segmentation on the cold users themselves, i.e.
                     chosen with hindsight, an upper bound for that family
      oracle         (planted only) items ranked by the generator's true probabilities for
                     the cold user's attributes (`planted_data.PlantedWorld.true_scores`);
                     "gap recovered" = (CVAE − segment) / (oracle − segment)
    Warm: NDCG@10 and Recall@20 with the history excluded; cold: the same from attributes.
    Items that appear only in held-out targets stay in the truth: no model can rank them,
    for every model alike, as for any evaluator who does not know the catalogue in advance.

    .venv/bin/python benchmarks/bench_deployment.py                       # both, seeds 0,1,2
    .venv/bin/python benchmarks/bench_deployment.py --datasets planted --seeds 0 \\
        --planted-users 1500 --planted-items 300 --pipeline-args="--set train.epochs=3"

The planted data (`planted_data.py`, `--planted-users` × `--planted-items`, generator seed
`--planted-seed`) is drawn once; the split seeds vary the hold-out only, as for ML-100K. One
ML-100K seed took ~5 min on 2 cores (the pipeline trains a CVAE per protocol), so the
default run (2 datasets × 3 seeds) takes well over half an hour. Prints one Markdown table
per dataset (rows: seeds, then mean ± std) and the contract failures, and writes
benchmarks/results/deployment.json
(per seed: every baseline's scores, EASE's λ curve, every segmentation, the signature inputs,
the pipeline's stage table and its own report's NDCG@10, and the product's commit and
locally modified files).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import io
import itertools
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import planted_data  # noqa: E402

from recsys_cvae.metrics import ranking_metrics  # noqa: E402  (sets TF_USE_LEGACY_KERAS)
from recsys_cvae.model.ease import ease_from_gram  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results")
COLD_FRACTION = 0.10
TARGET_FRACTION = 0.20
VALIDATION_FRACTION = 0.10
EASE_LAMBDAS = (1.0, 10.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0)
KS = (10, 20)
NUMERIC_BINS = 4
BATCH = 256
ML_100K_USER_COLUMNS = ("user_id", "age", "gender", "occupation", "zip_code")  # its README
ML_100K = "ml100k"
PLANTED = "planted"


# ---- raw files ---------------------------------------------------------------------------


@dataclasses.dataclass
class RawData:
    """One dataset's raw files, line by line, as an evaluator reads them (not the product).

    Attributes:
      layout: `ml-100k` (u.data/u.user, no header) or `csv` (interactions.csv/users.csv).
      interaction_lines: every data line of the interactions file, as bytes, in file order.
      interaction_users, interaction_items: [lines] the user and item id of each line.
      user_lines: user id -> its profile line (bytes).
      profiles: user id -> {raw column: value} (columns other than user_id).
      user_columns: the raw profile columns, in file order (without user_id).
      headers: file name -> header line for the CSV layout.
      copies: other files of the folder copied unchanged (ML-100K's u.item).
    """

    layout: str
    interaction_lines: list[bytes]
    interaction_users: list[str]
    interaction_items: list[str]
    user_lines: dict[str, bytes]
    profiles: dict[str, dict[str, str]]
    user_columns: tuple[str, ...]
    headers: dict[str, bytes] = dataclasses.field(default_factory=dict)
    copies: tuple[str, ...] = ()

    def write(self, folder: str, keep_line: np.ndarray, keep_users: set[str]) -> None:
        """The kept interaction lines and profile rows, in the same layout and order."""
        os.makedirs(folder, exist_ok=True)
        if self.layout == "ml-100k":
            names = ("u.data", "u.user")
        else:
            names = ("interactions.csv", "users.csv")
        lines = [line for line, keep in zip(self.interaction_lines, keep_line) if keep]
        users = [line for user, line in self.user_lines.items() if user in keep_users]
        for name, body in zip(names, (lines, users)):
            with open(os.path.join(folder, name), "wb") as f:
                if name in self.headers:
                    f.write(self.headers[name] + b"\n")
                f.write(b"".join(line + b"\n" for line in body))
        for path in self.copies:
            shutil.copy(path, os.path.join(folder, os.path.basename(path)))


def _data_lines(path: str) -> list[bytes]:
    with open(path, "rb") as f:
        return [line for line in f.read().splitlines() if line.strip()]


def read_ml100k(folder: str) -> RawData:
    """u.data (user\\titem\\trating\\ttimestamp) and u.user (user|age|gender|occupation|zip)."""
    lines = _data_lines(os.path.join(folder, "u.data"))
    fields = [line.split(b"\t") for line in lines]
    user_lines, profiles = {}, {}
    for line in _data_lines(os.path.join(folder, "u.user")):
        values = line.decode("latin-1").split("|")
        user_lines[values[0]] = line
        profiles[values[0]] = dict(zip(ML_100K_USER_COLUMNS[1:], values[1:]))
    item_file = os.path.join(folder, "u.item")
    return RawData(
        layout="ml-100k",
        interaction_lines=lines,
        interaction_users=[f[0].decode() for f in fields],
        interaction_items=[f[1].decode() for f in fields],
        user_lines=user_lines,
        profiles=profiles,
        user_columns=ML_100K_USER_COLUMNS[1:],
        copies=(item_file,) if os.path.exists(item_file) else (),
    )


def read_generic_csv(folder: str) -> RawData:
    """interactions.csv (user_id,item_id,...) and users.csv (user_id,<attributes>)."""

    def table(name: str) -> tuple[bytes, list[bytes], list[str], list[list[str]]]:
        header, *lines = _data_lines(os.path.join(folder, name))
        columns = next(csv.reader([header.decode("utf-8-sig")]))
        rows = list(csv.reader(io.StringIO(b"\n".join(lines).decode("utf-8"))))
        return header, lines, [c.strip() for c in columns], rows

    i_header, i_lines, i_columns, i_rows = table("interactions.csv")
    u_header, u_lines, u_columns, u_rows = table("users.csv")
    user_at, item_at = i_columns.index("user_id"), i_columns.index("item_id")
    uid = u_columns.index("user_id")
    attributes = tuple(c for c in u_columns if c != "user_id")
    return RawData(
        layout="csv",
        interaction_lines=i_lines,
        interaction_users=[r[user_at] for r in i_rows],
        interaction_items=[r[item_at] for r in i_rows],
        user_lines={r[uid]: line for r, line in zip(u_rows, u_lines)},
        profiles={r[uid]: {c: v for c, v in zip(u_columns, r) if c != "user_id"} for r in u_rows},
        user_columns=attributes,
        headers={"interactions.csv": i_header, "users.csv": u_header},
    )


# ---- hold-out ----------------------------------------------------------------------------


@dataclasses.dataclass
class HoldOut:
    """What one split seed keeps and holds out.

    Attributes:
      keep_line: [interaction lines] bool, the line goes into the training input.
      history: non-cold user -> their kept items (the 80%), in file order.
      warm_truth: non-cold user with targets -> their held-out items (the 20%).
      cold_truth: cold user -> all their items.
    """

    keep_line: np.ndarray
    history: dict[str, list[str]]
    warm_truth: dict[str, set[str]]
    cold_truth: dict[str, set[str]]


def is_cold(user: str, seed: int) -> bool:
    digest = hashlib.blake2b(f"{seed}:{user}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64 < COLD_FRACTION


def hold_out(raw: RawData, seed: int) -> HoldOut:
    """Cold users by hash; a seeded random 20% of every other user's interactions."""
    by_user: dict[str, list[int]] = {}
    for line, user in enumerate(raw.interaction_users):
        by_user.setdefault(user, []).append(line)
    keep = np.ones(len(raw.interaction_lines), dtype=bool)
    rng = np.random.default_rng(seed)
    history, warm_truth, cold_truth = {}, {}, {}
    for user in sorted(by_user):
        lines = np.asarray(by_user[user])
        items = [raw.interaction_items[i] for i in lines]
        if user in raw.profiles and is_cold(user, seed):
            keep[lines] = False
            cold_truth[user] = set(items)
            continue
        held = np.zeros(len(lines), dtype=bool)
        held[rng.permutation(len(lines))[: math.floor(TARGET_FRACTION * len(lines) + 0.5)]] = True
        keep[lines[held]] = False
        history[user] = [item for item, h in zip(items, held) if not h]
        targets = {item for item, h in zip(items, held) if h} - set(history[user])
        if targets:
            warm_truth[user] = targets
    return HoldOut(keep, history, warm_truth, cold_truth)


# ---- the product, as a user runs it ------------------------------------------------------


def cli_command() -> list[str]:
    """The installed `recsys-cvae` next to this interpreter (the venv's), else on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "recsys-cvae")
    if os.path.exists(beside):
        return [beside]
    found = shutil.which("recsys-cvae")
    return [found] if found else [sys.executable, "-m", "recsys_cvae.cli"]


class PipelineFailed(RuntimeError):
    """`recsys-cvae pipeline` exited non-zero; the message ends with its exit status."""


def run_pipeline(data_dir: str, workdir: str, cwd: str, extra: list[str]) -> dict:
    """Runs `recsys-cvae pipeline`; returns its command, wall seconds and stage table."""
    command = [*cli_command(), "pipeline", "--data-dir", data_dir, "--workdir", workdir, *extra]
    log_path = os.path.join(os.path.dirname(workdir), "pipeline.log")
    start = time.perf_counter()
    with open(log_path, "w") as log:
        code = subprocess.call(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    with open(log_path, errors="replace") as f:
        output = f.read()
    if code != 0:
        status = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit {code}"
        # Keras progress bars: backspaces, and one line per step; keep the log's own lines
        lines = [line for line in output.replace("\x08", "").splitlines()
                 if line.strip() and " - ETA: " not in line and "Unknown - " not in line]
        raise PipelineFailed(f"{shlex.join(command)} after {seconds:.0f} s:\n"
                             + "\n".join(lines[-25:])[-2500:] + f"\n[{status}]")  # fmt: skip
    _, found, rest = output.partition("Stage durations")
    stages = list(itertools.takewhile(lambda line: line.startswith("|"),
                                      rest.strip().splitlines() if found else []))  # fmt: skip
    return {"command": command, "seconds": seconds, "stage_table": stages}


def run_pipeline_with_retries(
    data_dir: str, workdir: str, cwd: str, extra: list[str], retries: int
) -> dict:
    """`run_pipeline`, rerun from a fresh workdir after a failure, at most `retries` times;
    the failed attempts are kept in the result (`failed_attempts`): a crash is a finding."""
    failed = []
    while True:
        try:
            return {**run_pipeline(data_dir, workdir, cwd, extra), "failed_attempts": failed}
        except PipelineFailed as error:
            failed.append(str(error))
            print(f"pipeline attempt {len(failed)} failed: {str(error)[-300:]}", flush=True)
            if len(failed) > retries:
                raise PipelineFailed("\n\n".join(failed)) from None
            shutil.rmtree(workdir, ignore_errors=True)


def product_version() -> dict:
    """The repository's commit and its locally modified files: what the CLI ran."""
    def git(*command: str) -> str:
        done = subprocess.run(["git", "-C", ROOT, *command], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    modified = [line[3:] for line in git("status", "--porcelain").splitlines()
                if line[3:].startswith(("recsys_cvae/", "beam_jobs/"))]  # fmt: skip
    return {"commit": git("rev-parse", "HEAD"), "modified_product_files": modified}


def newest_export(workdir: str) -> str:
    base = os.path.join(workdir, "export")
    versions = [int(v) for v in os.listdir(base) if v.isdigit()]
    if not versions:
        raise RuntimeError(f"no integer version folder in {base}: {sorted(os.listdir(base))}")
    return os.path.join(base, str(max(versions)))


def export_trained_on(export_dir: str) -> dict | None:
    """What fitted the served model, as the export declares it (assets.extra), if it does."""
    path = os.path.join(export_dir, "assets.extra", "export_info.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f).get("trained_on")


def product_report(workdir: str) -> dict:
    """The pipeline's own NDCG@10 for its test and cold users (for comparison only)."""
    path = os.path.join(workdir, "report", "metrics.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        splits = json.load(f).get("splits", {})
    return {
        split: {m: round(v["ndcg@10"], 4) for m, v in models.items() if "ndcg@10" in v}
        for split, models in splits.items()
        if split in ("test", "cold")
    }


# ---- the export, as TF Serving runs it ---------------------------------------------------


class ServedModel:
    """A SavedModel in a TF1 session; signatures run by the SignatureDef's tensor names."""

    HISTORY = "item_ids"

    def __init__(self, export_dir: str):
        import tensorflow as tf

        tf.get_logger().setLevel("ERROR")  # the TF1 loader's deprecation notice
        self._tf = tf
        self._graph = tf.Graph()
        self._session = tf.compat.v1.Session(graph=self._graph)
        with self._graph.as_default():
            meta = tf.compat.v1.saved_model.loader.load(self._session, ["serve"], export_dir)
        self.signatures = dict(meta.signature_def)

    def close(self) -> None:
        self._session.close()

    def attribute_inputs(self, name: str) -> dict[str, str]:
        """Input key -> `string` or `float32`, without the history input."""
        inputs = self.signatures[name].inputs
        return {
            key: self._tf.dtypes.as_dtype(info.dtype).name
            for key, info in sorted(inputs.items())
            if key != self.HISTORY
        }

    def contract_failures(self, raw_columns: tuple[str, ...]) -> list[dict]:
        """Declared inputs a client holding the raw profile cannot fill, per signature."""
        failures = []
        for name in ("recommend", "generate"):
            if name not in self.signatures:
                failures.append({"signature": name, "problem": "signature missing"})
                continue
            if "item_ids" not in self.signatures[name].outputs:
                failures.append({"signature": name, "problem": "no item_ids output"})
            takes_history = self.HISTORY in self.signatures[name].inputs
            if takes_history != (name == "recommend"):
                failures.append({"signature": name, "input": self.HISTORY,
                                 "problem": "history input expected only in recommend"})
            for key, dtype in self.attribute_inputs(name).items():
                if key not in raw_columns:
                    failures.append({"signature": name, "input": key, "dtype": dtype,
                                     "problem": "no raw profile column of that name"})  # fmt: skip
        return failures

    def top_items(
        self, name: str, profiles: list[dict[str, str]], histories: list[list[str]] | None = None
    ) -> tuple[list[list[str]], int]:
        """Each user's ranked item ids; and how many numeric values did not parse."""
        signature = self.signatures[name]
        fetch = signature.outputs["item_ids"].name
        ranked, unparsed = [], 0
        for start in range(0, len(profiles), BATCH):
            batch = profiles[start : start + BATCH]
            feed = {}
            for key, dtype in self.attribute_inputs(name).items():
                tensor = signature.inputs[key].name
                if dtype == "string":
                    feed[tensor] = np.asarray([p.get(key, "") for p in batch], dtype=object)
                else:
                    values = [_to_float(p.get(key)) for p in batch]
                    unparsed += sum(1 for p, v in zip(batch, values) if key in p and math.isnan(v))
                    feed[tensor] = np.asarray(values, dtype=np.float32)
            if histories is not None:
                rows = histories[start : start + BATCH]
                width = max(1, max(len(r) for r in rows))
                padded = np.full((len(rows), width), "", dtype=object)
                for i, row in enumerate(rows):
                    padded[i, : len(row)] = row
                feed[signature.inputs[self.HISTORY].name] = padded
            out = self._session.run(fetch, feed_dict=feed)
            ranked += [[i.decode() for i in row if i] for row in out]
        return ranked, unparsed


def _to_float(value: str | None) -> float:
    try:
        return float(value) if value not in (None, "") else math.nan
    except ValueError:
        return math.nan


# ---- baselines ---------------------------------------------------------------------------


def score(ranked: list[list[str]], truth: list[set[str]]) -> dict[str, float]:
    per_user = ranking_metrics(ranked, truth, KS)
    return {
        "ndcg@10": float(np.mean(per_user["ndcg@10"])),
        "recall@20": float(np.mean(per_user["recall@20"])),
        "users": len(truth),
    }


def top_ids(scores: np.ndarray, item_ids: np.ndarray, k: int = max(KS)) -> list[list[str]]:
    """[n, items] scores (−inf = excluded) -> each row's top-k item ids, best first."""
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.take_along_axis(part, np.argsort(-np.take_along_axis(scores, part, 1), 1), 1)
    finite = np.isfinite(np.take_along_axis(scores, order, 1))
    return [list(item_ids[row[ok]]) for row, ok in zip(order, finite)]


def matrix(histories: list[list[str]], index: dict[str, int]) -> np.ndarray:
    """[users, items] float64 0/1 of the histories (items outside `index` are dropped)."""
    x = np.zeros((len(histories), len(index)))
    for u, items in enumerate(histories):
        x[u, [index[i] for i in items if i in index]] = 1.0
    return x


def ease_warm(
    x: np.ndarray, warm_rows: np.ndarray, item_ids: np.ndarray, seed: int
) -> tuple[list[list[str]], float, dict[str, float]]:
    """EASE's rankings for the warm rows, λ tuned on a further 10% of their histories."""
    rng = np.random.default_rng([seed, 1])
    fit = x.copy()
    validation_rows, validation_truth = [], []
    for row in warm_rows:
        items = np.flatnonzero(x[row])
        held = rng.permutation(items)[: math.floor(VALIDATION_FRACTION * len(items) + 0.5)]
        if len(held) and len(held) < len(items):
            fit[row, held] = 0.0
            validation_rows.append(row)
            validation_truth.append(set(item_ids[held]))
    gram = fit.T @ fit
    history = fit[validation_rows]
    by_lambda = {}
    for l2 in EASE_LAMBDAS:
        scores = np.where(history > 0, -np.inf, history @ ease_from_gram(gram, l2))
        by_lambda[f"{l2:g}"] = score(top_ids(scores, item_ids), validation_truth)["ndcg@10"]
    best = max(EASE_LAMBDAS, key=lambda l2: by_lambda[f"{l2:g}"])
    history = x[warm_rows]
    scores = np.where(history > 0, -np.inf, history @ ease_from_gram(x.T @ x, best))
    return top_ids(scores, item_ids), best, by_lambda


def segment_keys(
    profiles: dict[str, dict[str, str]], columns: tuple[str, ...], train_users: list[str]
) -> dict[str, dict[str, str]]:
    """column -> {user -> segment}; numeric columns (every training value a number) are cut
    into quartile bins of the training users' values."""
    keys = {}
    for column in columns:
        raw = {u: p.get(column, "") for u, p in profiles.items()}
        train = [_to_float(raw[u]) for u in train_users if raw[u] != ""]
        if train and not any(math.isnan(v) for v in train):
            edges = np.quantile(train, np.linspace(0, 1, NUMERIC_BINS + 1)[1:-1])
            keys[column] = {
                u: "nan" if math.isnan(_to_float(v)) else
                f"q{int(np.searchsorted(edges, _to_float(v), side='right'))}"
                for u, v in raw.items()
            }  # fmt: skip
        else:
            keys[column] = raw
    return keys


def segment_popularity_cold(
    keys: dict[str, dict[str, str]],
    train_users: list[str],
    x_train: np.ndarray,
    global_counts: np.ndarray,
    cold_users: list[str],
    truth: list[set[str]],
    item_ids: np.ndarray,
) -> dict[str, dict]:
    """Cold scores of popularity within every single attribute and every pair of them
    (ties and unseen segments fall back to global popularity)."""
    results = {}
    tie_break = global_counts / (global_counts.max() + 1.0)
    groups = [g for size in (1, 2) for g in itertools.combinations(list(keys), size)]
    for group in groups:
        train_keys = [tuple(keys[c].get(u, "") for c in group) for u in train_users]
        cold_keys = [tuple(keys[c].get(u, "") for c in group) for u in cold_users]
        codes: dict[tuple, int] = {}
        rows = np.asarray([codes.setdefault(k, len(codes)) for k in train_keys])
        members = np.zeros((len(codes), len(train_users)))
        members[rows, np.arange(len(train_users))] = 1.0
        counts = members @ x_train  # [segments, items]
        scores = np.stack([counts[codes[k]] if k in codes else np.zeros(len(item_ids))
                           for k in cold_keys]) + tie_break  # fmt: skip
        results[" × ".join(group)] = score(top_ids(scores, item_ids), truth)
    return results


# ---- one seed ----------------------------------------------------------------------------


def evaluate_seed(
    dataset: str, raw: RawData, seed: int, base: str, extra: list[str], keep: bool,
    retries: int, world: planted_data.PlantedWorld | None = None,
) -> dict:  # fmt: skip
    folder = os.path.join(base, f"{dataset}-seed{seed}")
    data_dir, workdir, cwd = (os.path.join(folder, n) for n in ("data", "W", "cwd"))
    os.makedirs(cwd)
    split = hold_out(raw, seed)
    train_users = sorted(u for u in split.history if u in raw.profiles)
    raw.write(data_dir, split.keep_line, set(train_users))
    print(f"[{dataset} seed {seed}] {int(split.keep_line.sum()):,} training interactions, "
          f"{len(split.history)} users ({len(split.warm_truth)} warm with targets), "
          f"{len(split.cold_truth)} cold; running the pipeline ...", flush=True)  # fmt: skip
    run = run_pipeline_with_retries(data_dir, workdir, cwd, extra, retries)
    print(f"[{dataset} seed {seed}] pipeline {run['seconds']:.0f} s; scoring", flush=True)

    warm_users = sorted(split.warm_truth)
    cold_users = sorted(split.cold_truth)
    warm_truth = [split.warm_truth[u] for u in warm_users]
    cold_truth = [split.cold_truth[u] for u in cold_users]
    export_dir = newest_export(workdir)
    served = ServedModel(export_dir)
    try:
        failures = served.contract_failures(raw.user_columns)
        signature_inputs = {n: served.attribute_inputs(n) for n in ("recommend", "generate")}
        cvae_warm, unparsed_warm = served.top_items(
            "recommend", [raw.profiles.get(u, {}) for u in warm_users],
            [split.history[u] for u in warm_users],
        )  # fmt: skip
        cvae_cold, unparsed_cold = served.top_items(
            "generate", [raw.profiles[u] for u in cold_users]
        )
    finally:
        served.close()
    if unparsed_warm or unparsed_cold:
        failures.append({"problem": "numeric input with raw values that are not numbers",
                         "values": unparsed_warm + unparsed_cold})  # fmt: skip

    train_order = sorted(split.history)
    item_ids = np.asarray(sorted({i for u in train_order for i in split.history[u]}), dtype=object)
    index = {item: j for j, item in enumerate(item_ids)}
    x = matrix([split.history[u] for u in train_order], index)
    row_of = {u: r for r, u in enumerate(train_order)}
    warm_rows = np.asarray([row_of[u] for u in warm_users])
    counts = x.sum(axis=0)
    history = x[warm_rows]
    popularity_warm = top_ids(np.where(history > 0, -np.inf, counts[None, :]), item_ids)
    popularity_cold = top_ids(np.tile(counts, (len(cold_users), 1)), item_ids)
    ease, l2, by_lambda = ease_warm(x, warm_rows, item_ids, seed)
    keys = segment_keys(raw.profiles, raw.user_columns, train_users)
    x_profiled = x[[row_of[u] for u in train_users]]
    segments = segment_popularity_cold(
        keys, train_users, x_profiled, counts, cold_users, cold_truth, item_ids
    )
    best_segment = max(segments, key=lambda s: segments[s]["ndcg@10"])

    result = {
        "seed": seed,
        "pipeline_s": round(run["seconds"], 1),
        "pipeline_failed_attempts": run["failed_attempts"],
        "pipeline_command": shlex.join(run["command"]),
        "stage_table": run["stage_table"],
        "export": export_dir if keep else os.path.basename(export_dir),
        "export_trained_on": export_trained_on(export_dir),
        "signature_inputs": signature_inputs,
        "contract_failures": failures,
        "training_interactions": int(split.keep_line.sum()),
        "training_users": len(split.history),
        "warm": {
            "cvae": score(cvae_warm, warm_truth),
            "ease": score(ease, warm_truth),
            "popularity": score(popularity_warm, warm_truth),
        },
        "ease_lambda": l2,
        "ease_validation_ndcg@10": by_lambda,
        "cold": {
            "cvae": score(cvae_cold, cold_truth),
            "segment_popularity": segments[best_segment],
            "popularity": score(popularity_cold, cold_truth),
        },
        "best_segment": best_segment,
        "segments_ndcg@10": {s: round(v["ndcg@10"], 4) for s, v in segments.items()},
        "product_report_ndcg@10": product_report(workdir),
    }
    if world is not None:
        true = world.true_scores({c: [raw.profiles[u][c] for u in cold_users]
                                  for c in planted_data.ATTRIBUTES})  # fmt: skip
        oracle = score(top_ids(true, np.asarray(world.item_ids, dtype=object)), cold_truth)
        result["cold"]["oracle"] = oracle
        gap = oracle["ndcg@10"] - segments[best_segment]["ndcg@10"]
        gained = result["cold"]["cvae"]["ndcg@10"] - segments[best_segment]["ndcg@10"]
        result["gap_recovered"] = gained / gap if gap > 0 else None
    if not keep:
        shutil.rmtree(folder, ignore_errors=True)
    return result


# ---- tables ------------------------------------------------------------------------------


def row_values(run: dict) -> dict[str, float | None]:
    warm, cold = run["warm"], run["cold"]
    values = {
        "CVAE warm": warm["cvae"]["ndcg@10"],
        "EASE warm": warm["ease"]["ndcg@10"],
        "CVAE/EASE": warm["cvae"]["ndcg@10"] / warm["ease"]["ndcg@10"],
        "pop warm": warm["popularity"]["ndcg@10"],
        "CVAE cold": cold["cvae"]["ndcg@10"],
        "best seg cold": cold["segment_popularity"]["ndcg@10"],
        "pop cold": cold["popularity"]["ndcg@10"],
    }
    if "oracle" in cold:
        values["oracle cold"] = cold["oracle"]["ndcg@10"]
        values["gap recovered"] = run["gap_recovered"]
    values["pipeline s"] = run["pipeline_s"]
    return values


def summarise(runs: list[dict]) -> dict[str, dict[str, float]]:
    rows = [row_values(r) for r in runs]
    summary = {}
    for column in rows[0]:
        values = np.asarray([r[column] for r in rows if r[column] is not None], dtype=float)
        std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        summary[column] = {"mean": float(values.mean()) if len(values) else math.nan, "std": std}
    return summary


def _cell(column: str, value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if column == "pipeline s":
        return f"{value:.0f}"
    if column in ("CVAE/EASE", "gap recovered"):
        return f"{value:.3f}"
    return f"{value:.4f}"


def table(dataset: str, runs: list[dict], summary: dict) -> str:
    columns = list(summary)
    lines = [f"NDCG@10, {dataset} (warm: {runs[0]['warm']['cvae']['users']} users, cold: "
             f"{runs[0]['cold']['cvae']['users']} users at seed {runs[0]['seed']})",
             "| seed | " + " | ".join(columns) + " |",
             "|---|" + "---:|" * len(columns)]  # fmt: skip
    for run in runs:
        values = row_values(run)
        lines.append(f"| {run['seed']} | " + " | ".join(_cell(c, values[c]) for c in columns)
                     + " |")  # fmt: skip
    lines.append("| mean ± std | " + " | ".join(
        f"{_cell(c, summary[c]['mean'])} ± {_cell(c, summary[c]['std'])}" for c in columns
    ) + " |")  # fmt: skip
    details = [f"seed {r['seed']}: EASE λ = {r['ease_lambda']:g}, best segment "
               f"{r['best_segment']}"
               + (f", after {len(r['pipeline_failed_attempts'])} failed pipeline attempt(s)"
                  if r["pipeline_failed_attempts"] else "")
               for r in runs]  # fmt: skip
    return "\n".join(lines + ["", "; ".join(details)])


def unique_failures(runs: list[dict]) -> list[dict]:
    seen, out = set(), []
    for run in runs:
        for failure in run["contract_failures"]:
            key = json.dumps(failure, sort_keys=True)
            if key not in seen:
                seen.add(key)
                out.append(failure)
    return out


# ---- main --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default=f"{ML_100K},{PLANTED}")
    parser.add_argument("--seeds", default="0,1,2", help="split seeds (default 0,1,2)")
    parser.add_argument("--ml100k-dir", default=os.path.join(ROOT, "..", "shared", "datasets",
                                                             "ml-100k"))  # fmt: skip
    parser.add_argument("--planted-users", type=int, default=6000)
    parser.add_argument("--planted-items", type=int, default=1500)
    parser.add_argument("--planted-seed", type=int, default=0, help="the generator's seed")
    parser.add_argument("--pipeline-args", default="",
                        help='appended to the pipeline command, e.g. "--set train.epochs=5"')
    parser.add_argument("--retries", type=int, default=1,
                        help="reruns of a failed pipeline (fresh workdir; failures recorded)")
    parser.add_argument("--keep", action="store_true", help="keep the temp folders")
    parser.add_argument("--output", default=os.path.join(RESULTS, "deployment.json"))
    args = parser.parse_args(argv)
    datasets = [d for d in args.datasets.split(",") if d]
    unknown = set(datasets) - {ML_100K, PLANTED}
    if unknown:
        parser.error(f"--datasets: unknown {sorted(unknown)}; expected {ML_100K}, {PLANTED}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    extra = shlex.split(args.pipeline_args)

    base = tempfile.mkdtemp(prefix="bench_deployment_")
    if os.path.commonpath([os.path.realpath(base), ROOT]) == ROOT:
        raise SystemExit(f"the temp folder {base} is inside the repository; set TMPDIR")
    result = {
        "protocol": {"cold_fraction": COLD_FRACTION, "target_fraction": TARGET_FRACTION,
                     "ease_validation_fraction": VALIDATION_FRACTION,
                     "ease_lambdas": EASE_LAMBDAS, "numeric_bins": NUMERIC_BINS},
        "pipeline_args": extra,
        "product": product_version(),
        "cores": os.cpu_count(),
        "load_before": os.getloadavg(),
        "datasets": {},
    }  # fmt: skip
    tables = []
    try:
        for dataset in datasets:
            world = None
            if dataset == ML_100K:
                raw = read_ml100k(os.path.abspath(args.ml100k_dir))
                source = {"dir": os.path.abspath(args.ml100k_dir)}
            else:
                raw_dir = os.path.join(base, "planted-raw")
                world = planted_data.write_planted(raw_dir, args.planted_users,
                                                   args.planted_items, seed=args.planted_seed)
                raw = read_generic_csv(raw_dir)
                source = {"users": args.planted_users, "items": args.planted_items,
                          "seed": args.planted_seed}  # fmt: skip
            runs, errors = [], []
            for seed in seeds:
                try:
                    runs.append(evaluate_seed(dataset, raw, seed, base, extra, args.keep,
                                              args.retries, world))  # fmt: skip
                except PipelineFailed as error:  # a failed pipeline run is a result, not a crash
                    print(f"[{dataset} seed {seed}] FAILED: {str(error)[-600:]}", flush=True)
                    errors.append({"seed": seed, "error": str(error)[-3000:]})
            result["datasets"][dataset] = {"source": source, "failed_runs": errors}
            if errors:
                tables.append(f"{dataset}: pipeline failed for seeds "
                              f"{[e['seed'] for e in errors]} (see failed_runs in the JSON)")
            if not runs:
                continue
            summary = summarise(runs)
            failures = unique_failures(runs)
            result["datasets"][dataset].update(runs=runs, summary=summary,
                                               contract_failures=failures)
            tables.append(table(dataset, runs, summary))
            lines = [f"- {f.get('signature', '')} `{f.get('input', '')}` ({f.get('dtype', '')}):"
                     f" {f['problem']}" for f in failures]  # fmt: skip
            tables.append("Contract failures: " + ("none" if not failures else "\n" +
                                                   "\n".join(lines)))  # fmt: skip
            print("\n" + "\n\n".join(tables[-2:]) + "\n", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
        else:
            print(f"kept {base}")
    result["load_after"] = os.getloadavg()
    if len(datasets) > 1:
        print("\n\n".join(tables))
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {args.output}")
    return result


if __name__ == "__main__":
    main()
