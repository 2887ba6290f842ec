"""tf.distribute strategies by name, and which process of a cluster is the chief.

`default` (one device), `mirrored` (all local GPUs; without GPUs the CPU is split into
`num_logical_cpus` logical devices, which only works before TensorFlow initialises its
devices, i.e. in a fresh process), `multi_worker` (MultiWorkerMirroredStrategy from
TF_CONFIG), `auto` (multi_worker when TF_CONFIG names several workers, mirrored with several
GPUs, else default).
"""

from __future__ import annotations

import json
import os

import tensorflow as tf

STRATEGIES = ("auto", "default", "mirrored", "multi_worker")
COLLECTIVES = {"auto": "AUTO", "ring": "RING", "nccl": "NCCL"}


def choose_strategy(name: str, num_logical_cpus: int = 2, collective: str = "ring",
                    bytes_per_pack: int = 32 << 20) -> tf.distribute.Strategy:
    """The tf.distribute strategy called `name` (see the module docstring); `collective`
    and `bytes_per_pack` set how `multi_worker` all-reduces (`TrainConfig`)."""
    name = resolve_strategy_name(name)
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy(
            communication_options=communication_options(collective, bytes_per_pack))
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        return tf.distribute.MirroredStrategy()
    devices = _logical_cpus(num_logical_cpus)
    return tf.distribute.MirroredStrategy(
        devices=devices, cross_device_ops=tf.distribute.ReductionToOneDevice()
    )


def communication_options(
    collective: str, bytes_per_pack: int
) -> tf.distribute.experimental.CommunicationOptions:
    """CommunicationOptions for `train.collective` (auto, ring, nccl) and its pack size."""
    if collective not in COLLECTIVES:
        raise ValueError(f"train.collective must be one of {list(COLLECTIVES)}, "
                         f"got {collective!r}")
    implementation = getattr(tf.distribute.experimental.CommunicationImplementation,
                             COLLECTIVES[collective])
    return tf.distribute.experimental.CommunicationOptions(
        bytes_per_pack=bytes_per_pack, implementation=implementation)


def resolve_strategy_name(name: str) -> str:
    """`default`, `mirrored` or `multi_worker`: what `name` (possibly `auto`) means here."""
    if name not in STRATEGIES:
        raise ValueError(f"train.strategy must be one of {list(STRATEGIES)}, got {name!r}")
    if name != "auto":
        return name
    cluster = json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {})
    if sum(len(cluster.get(kind, [])) for kind in ("chief", "worker")) > 1:
        return "multi_worker"
    if len(tf.config.list_physical_devices("GPU")) > 1:
        return "mirrored"
    return "default"


def _logical_cpus(count: int) -> list[str]:
    """Splits the first CPU into `count` logical devices; returns their names."""
    if count < 1:
        raise ValueError(f"train.num_logical_cpus must be at least 1, got {count}")
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(count)]
        )
    except RuntimeError:
        pass  # devices already initialised: fine if they were split the same way before
    logical = tf.config.list_logical_devices("CPU")
    if len(logical) < count:
        raise RuntimeError(
            f"strategy 'mirrored' needs {count} logical CPU devices but TensorFlow already "
            f"initialised {len(logical)}; choose the strategy in a fresh process before any "
            "TensorFlow op runs"
        )
    return [device.name for device in logical[:count]]


def worker_name(strategy: tf.distribute.Strategy) -> str | None:
    """None on the chief (or without a cluster), else e.g. `worker_2`."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return None
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    if resolver.task_type == "chief" or (not has_chief and resolver.task_id == 0):
        return None
    return f"{resolver.task_type}_{resolver.task_id}"
