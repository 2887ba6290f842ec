"""The versions of one served model: which are on disk, which are loaded, which are served.

Why it is separate from the server: this is TF Serving's `AspiredVersionsManager` for one
model, the part that decides what a request for "the newest", "version 3" or label "stable"
gets, and how a new version replaces the old without a failed request. The gRPC and REST
front ends only ask `resolve(model_spec)` and `status(model_spec)`.

Version policy, as TF Serving's `model_version_policy` (default: latest 1):
  latest N   the N newest integer versions under the base path
  specific   exactly the listed versions
  all        every version on disk
A poll loads every wanted version that is not loaded yet (newest first; warmup requests
replayed before it is served), then unloads the loaded versions that are no longer wanted.
A new version is published by replacing the version map in one assignment, so a request
either sees the old map or the new one; requests already running keep their servable.
A version that fails to load (a folder still being copied, say) is retried on later polls,
`max_num_load_retries` times at least `load_retry_interval_s` apart (TF Serving's
`--max_num_load_retries`, default 5, and `--load_retry_interval_micros`, default one minute),
then reported as END with its error until its folder changes. If no wanted version could be
loaded, the newest loaded one still on disk keeps serving (TF Serving's
availability-preserving policy); a loaded version whose folder disappeared is unloaded.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field

import grpc
import tensorflow as tf
from tensorflow_serving.apis import get_model_status_pb2

from serving import metrics as M
from serving.servable import (
    RpcError,
    Servable,
    first_line,
    invalid,
    load_servable,
    provenance_summary,
    warm_up,
)

log = logging.getLogger(__name__)
State = get_model_status_pb2.ModelVersionStatus.State


@dataclass
class ModelConfig:
    """One entry of TF Serving's `model_config_list`.

    Attributes:
      name: the name clients put in `ModelSpec.name`.
      base_path: folder holding integer version folders (each a SavedModel).
      policy: "latest", "specific" or "all".
      num_versions: how many newest versions "latest" keeps loaded.
      versions: the versions "specific" loads.
      version_labels: label -> version, as TF Serving's `version_labels`.
      log_sampling_rate, log_filename_prefix: its `logging_config` (`serving.request_log`);
        rate 0: no request log.
    """

    name: str
    base_path: str
    policy: str = "latest"
    num_versions: int = 1
    versions: tuple[int, ...] = ()
    version_labels: dict[str, int] = field(default_factory=dict)
    log_sampling_rate: float = 0.0
    log_filename_prefix: str = ""


class ModelVersions:
    """Loads, serves and unloads the versions of one model (see the module docstring).

    Args:
      config: the model's name, base path, version policy and labels.
      max_batch_size, max_elements: the request caps, also applied to warmup requests.
    """

    def __init__(self, config: ModelConfig, max_batch_size: int, max_elements: int,
                 max_num_load_retries: int = 5, load_retry_interval_s: float = 60.0):
        self.config = config
        self.name = config.name
        self.max_batch_size = max_batch_size
        self.max_elements = max_elements
        self.max_num_load_retries = max_num_load_retries
        self.load_retry_interval_s = load_retry_interval_s
        self._loaded: dict[int, Servable] = {}  # replaced, never mutated, by poll()
        self._states: dict[int, tuple[int, int, str]] = {}  # version -> (state, code, message)
        # (version, mtime_nsec) that failed to load -> (failed attempts, monotonic time of the
        # last one); given up when attempts > max_num_load_retries
        self._failed: dict[tuple[int, int], tuple[int, float]] = {}
        self._poll_lock = threading.Lock()  # one poll at a time (poller thread, start())

    @property
    def available(self) -> bool:
        return bool(self._loaded)

    def versions_on_disk(self) -> dict[int, str]:
        versions = {}
        base = self.config.base_path
        for name in tf.io.gfile.listdir(base):
            name = name.rstrip("/")
            path = os.path.join(base, name)
            if name.isdigit() and tf.io.gfile.exists(os.path.join(path, "saved_model.pb")):
                versions[int(name)] = path
        return versions

    def wanted(self, on_disk: dict[int, str]) -> list[int]:
        """The versions the policy asks for, newest first."""
        newest_first = sorted(on_disk, reverse=True)
        if self.config.policy == "all":
            return newest_first
        if self.config.policy == "specific":
            return [v for v in newest_first if v in self.config.versions]
        return newest_first[: self.config.num_versions]

    def poll(self) -> None:
        """Brings the loaded versions in line with the policy and what is on disk."""
        with self._poll_lock:
            on_disk = self.versions_on_disk()
            wanted = self.wanted(on_disk)
            for version in wanted:
                if version not in self._loaded:
                    self._load(version, on_disk[version])
            keep = set(wanted) & set(self._loaded)
            still_there = set(self._loaded) & set(on_disk)
            if not keep and still_there:  # nothing wanted loaded: keep serving the newest
                keep = {max(still_there)}
            for version in sorted(set(self._loaded) - keep):
                self._states[version] = (State.UNLOADING, 0, "")
                self._loaded = {v: s for v, s in self._loaded.items() if v != version}
                self._states[version] = (State.END, 0, "")  # in-flight requests hold theirs
                M.UNLOADS.increment(self.name)
                log.info("unloaded %s version %d", self.name, version)

    def _load(self, version: int, path: str) -> None:
        stamp = (version, tf.io.gfile.stat(path).mtime_nsec)
        if stamp in self._failed:
            attempts, last = self._failed[stamp]
            if attempts > self.max_num_load_retries:
                return  # given up until the folder changes
            if time.monotonic() - last < self.load_retry_interval_s:
                return
            log.info("retrying %s version %d (retry %d of %d)", self.name, version, attempts,
                     self.max_num_load_retries)
        self._states[version] = (State.LOADING, 0, "")
        started = time.perf_counter()
        try:
            servable = load_servable(path, version)
        except Exception as error:  # noqa: BLE001  (a bad export must not stop the server)
            M.LOAD_ATTEMPTS.increment(path, "fail")
            self._load_failed(stamp, grpc.StatusCode.UNKNOWN.value[0], first_line(str(error)))
            return
        M.LOAD_ATTEMPTS.increment(path, "success")
        M.LOAD_LATENCY.increment(path, by=int((time.perf_counter() - started) * 1e6))
        started = time.perf_counter()
        try:
            warmed = warm_up(servable, self.max_batch_size, self.max_elements)
        except RpcError as error:
            M.WARMUP_LATENCY.add((time.perf_counter() - started) * 1e6, path, error.code.name)
            self._load_failed(stamp, error.code.value[0], f"warmup failed: {error.message}")
            return
        except Exception as error:  # noqa: BLE001  (a bad export must not stop the server)
            M.WARMUP_LATENCY.add((time.perf_counter() - started) * 1e6, path, "UNKNOWN")
            self._load_failed(stamp, grpc.StatusCode.UNKNOWN.value[0], first_line(str(error)))
            return
        M.WARMUP_LATENCY.add((time.perf_counter() - started) * 1e6, path, "OK")
        self._loaded = {**self._loaded, version: servable}  # one assignment: atomic switch
        self._states[version] = (State.AVAILABLE, 0, "")
        provenance = provenance_summary(path)
        log.info("serving %s version %d (%d warmup requests)%s", self.name, version, warmed,
                 f"; {provenance}" if provenance else "")

    def _load_failed(self, stamp: tuple[int, int], code: int, message: str) -> None:
        attempts = self._failed.get(stamp, (0, 0.0))[0] + 1
        self._failed[stamp] = (attempts, time.monotonic())
        if attempts <= self.max_num_load_retries:  # TF Serving keeps it LOADING while retrying
            self._states[stamp[0]] = (State.LOADING, 0, "")
            log.warning("loading %s version %d failed (%s); retrying in %.3g s", self.name,
                        stamp[0], message, self.load_retry_interval_s)
            return
        self._states[stamp[0]] = (State.END, code, message)
        log.error("loading %s version %d failed: %s", self.name, stamp[0], message)

    def _requested_version(self, model_spec) -> int | None:
        choice = model_spec.WhichOneof("version_choice")
        if choice == "version":
            return model_spec.version.value
        if choice == "version_label":
            label = model_spec.version_label
            if label not in self.config.version_labels:
                raise invalid(f"Unrecognized servable version label: {label}")
            return self.config.version_labels[label]
        return None

    def resolve(self, model_spec) -> Servable:
        """The servable a ModelSpec asks for, or NOT_FOUND / INVALID_ARGUMENT as TF Serving."""
        version = self._requested_version(model_spec)
        loaded = self._loaded
        if version is None and loaded:
            return loaded[max(loaded)]
        if version in loaded:
            return loaded[version]
        request = (f"Latest({self.name})" if version is None
                   else f"Specific({self.name}, {version})")
        raise RpcError(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: {request}")

    def status(self, model_spec) -> list[tuple[int, int, int, str]]:
        """[(version, state, error code, message)] newest first, as GetModelStatus lists them."""
        states = dict(self._states)  # written by the poller one key at a time
        if not states:
            raise RpcError(
                grpc.StatusCode.NOT_FOUND, f"Could not find any versions of model {self.name}")
        wanted = self._requested_version(model_spec)
        if wanted is not None:
            if wanted not in states:
                raise RpcError(grpc.StatusCode.NOT_FOUND,
                               f"Could not find version {wanted} of model {self.name}")
            states = {wanted: states[wanted]}
        return [(v, *states[v]) for v in sorted(states, reverse=True)]


def read_model_config_file(path: str) -> list[ModelConfig]:
    """TF Serving's `--model_config_file` (a ModelServerConfig text proto) -> ModelConfigs.

    Relative base paths are resolved against the config file's folder. Only the
    `model_config_list` form with platform "tensorflow" is served.
    """
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    try:
        with open(path) as f:
            config = text_format.Parse(f.read(), model_server_config_pb2.ModelServerConfig())
    except (OSError, text_format.ParseError) as error:
        raise ValueError(f"--model-config-file {path}: {first_line(str(error))}") from None
    if not config.HasField("model_config_list") or not config.model_config_list.config:
        raise ValueError(f"--model-config-file {path}: expected model_config_list {{ config ... }}")
    models = []
    for entry in config.model_config_list.config:
        where = f"--model-config-file {path}: model {entry.name or '?'}"
        if not entry.name or not entry.base_path:
            raise ValueError(f"{where}: every config needs a name and a base_path")
        if entry.model_platform not in ("", "tensorflow"):
            raise ValueError(f"{where}: model_platform must be tensorflow")
        policy = entry.model_version_policy.WhichOneof("policy_choice") or "latest"
        num_versions = entry.model_version_policy.latest.num_versions or 1
        versions = tuple(entry.model_version_policy.specific.versions)
        base = entry.base_path if os.path.isabs(entry.base_path) else os.path.join(
            os.path.dirname(os.path.abspath(path)), entry.base_path)
        logging = entry.logging_config
        prefix = logging.log_collector_config.filename_prefix
        if prefix and not os.path.isabs(prefix):
            prefix = os.path.join(os.path.dirname(os.path.abspath(path)), prefix)
        models.append(ModelConfig(entry.name, base, policy, num_versions, versions,
                                  dict(entry.version_labels),
                                  logging.sampling_config.sampling_rate, prefix))
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ValueError(f"--model-config-file {path}: model names repeat: {names}")
    return models
