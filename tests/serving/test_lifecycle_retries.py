"""Version lifecycle as TF Serving's: failed loads are retried (--max_num_load_retries,
--load_retry_interval_micros) and versions whose folder disappears are unloaded."""

from __future__ import annotations

import os
import shutil
import time

import grpc
import pytest
from tensorflow_serving.apis import model_pb2

from serving.servable import RpcError
from serving.versions import ModelConfig, ModelVersions, State
from tests.builders import V1_SCORES, V2_SCORES, save_version

ANY = model_pb2.ModelSpec(name="m")


def state_of(model: ModelVersions, version: int) -> int:
    return {v: state for v, state, _, _ in model.status(ANY)}[version]


def copy_half(source: str, target: str) -> str:
    """A version folder as a slow copy leaves it: saved_model.pb there, variables not yet."""
    os.makedirs(os.path.join(target, "variables"))
    shutil.copy(os.path.join(source, "saved_model.pb"), target)
    shutil.copy(os.path.join(source, "variables", "variables.index"),
                os.path.join(target, "variables"))
    return target


def test_a_version_copied_in_slowly_is_loaded_on_a_retry(tmp_path):
    base, scratch = tmp_path / "base", tmp_path / "scratch"
    base.mkdir()
    scratch.mkdir()
    save_version(str(base), 1, V1_SCORES)
    model = ModelVersions(ModelConfig("m", str(base)), 64, 1 << 20,
                          max_num_load_retries=3, load_retry_interval_s=0.2)
    model.poll()
    full = save_version(str(scratch), 2, V2_SCORES)
    half = copy_half(full, str(base / "2"))
    model.poll()
    assert state_of(model, 2) == State.LOADING  # failed once, retries left
    assert model.resolve(ANY).version == 1  # the old version keeps serving
    # the copy finishes inside variables/: the version folder's own mtime does not change
    stamp = os.stat(half).st_mtime_ns
    for name in os.listdir(os.path.join(full, "variables")):
        shutil.copy(os.path.join(full, "variables", name), os.path.join(half, "variables"))
    assert os.stat(half).st_mtime_ns == stamp
    model.poll()  # too soon: the retry interval has not passed
    assert state_of(model, 2) == State.LOADING
    time.sleep(0.25)
    model.poll()
    assert state_of(model, 2) == State.AVAILABLE and model.resolve(ANY).version == 2


def test_retries_end_after_the_limit_with_the_error(tmp_path):
    base, scratch = tmp_path / "base", tmp_path / "scratch"
    base.mkdir()
    scratch.mkdir()
    copy_half(save_version(str(scratch), 1, V1_SCORES), str(base / "1"))
    model = ModelVersions(ModelConfig("m", str(base)), 64, 1 << 20,
                          max_num_load_retries=2, load_retry_interval_s=0.0)
    for _ in range(5):
        model.poll()
    version, state, code, message = model.status(ANY)[0]
    assert (version, state) == (1, State.END) and code != 0 and message


def test_a_version_whose_folder_disappears_is_unloaded(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    save_version(str(base), 1, V1_SCORES)
    model = ModelVersions(ModelConfig("m", str(base)), 64, 1 << 20)
    model.poll()
    assert model.resolve(ANY).version == 1
    shutil.rmtree(base / "1")
    model.poll()
    assert state_of(model, 1) == State.END
    with pytest.raises(RpcError) as raised:
        model.resolve(ANY)
    assert raised.value.code == grpc.StatusCode.NOT_FOUND
