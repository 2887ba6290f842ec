"""The Beam jobs through the PortableRunner, as Flink, Spark and Dataflow receive them.

Beam's own Python job service (`local_job_service_main`) takes the pipeline proto and the
staged artefacts; SDK harnesses run in separate processes started by the EXTERNAL worker
pool (`beam_jobs.worker_pool`). The real CLI runs from a folder outside the repository,
once on the DirectRunner and once through that path, and the outputs must be byte-identical.
The pool runs with the interpreter's folder off PATH, which is how the 300-second
`DEADLINE_EXCEEDED` of Beam's own pool came about (`beam_jobs/worker_pool.py`).
"""

from __future__ import annotations

import filecmp
import os
import socket
import subprocess
import sys
import time

import pytest

from tests.beam_jobs.test_candidates import build_toy_export
from tests.serving.test_client import free_port
from tests.test_new_user_files import run_cli


def _wait_listening(port: int, process: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, "the service exited before listening"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listened on port {port} within {timeout_s} s")


@pytest.fixture(scope="module")
def portable_args(tmp_path_factory):
    """Beam flags for a job service and a worker pool on 127.0.0.1, stopped afterwards."""
    job_port, pool_port = free_port(), free_port()
    logs = tmp_path_factory.mktemp("portable_logs")
    # PATH without this interpreter's folder: the pool must start harnesses with it anyway
    env = {**os.environ, "PATH": os.pathsep.join(
        p for p in os.environ.get("PATH", "").split(os.pathsep)
        if p != os.path.dirname(sys.executable))}
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", module, *args], env=env, cwd=str(logs),
            stdout=open(logs / f"{name}.log", "w"), stderr=subprocess.STDOUT)
        for name, module, args in (
            ("job_service", "apache_beam.runners.portability.local_job_service_main",
             ["--port", str(job_port)]),
            ("worker_pool", "beam_jobs.worker_pool", ["--port", str(pool_port)]))]
    try:
        _wait_listening(job_port, processes[0])
        _wait_listening(pool_port, processes[1])
        yield ["--", "--runner=PortableRunner", f"--job_endpoint=localhost:{job_port}",
               "--environment_type=EXTERNAL", f"--environment_config=127.0.0.1:{pool_port}"]
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=30)


def _same_tree(left: str, right: str) -> list[str]:
    """Files that differ or exist on one side only (empty: byte-identical trees)."""
    comparison = filecmp.dircmp(left, right)
    differences = [*comparison.left_only, *comparison.right_only, *comparison.funny_files]
    _, mismatch, errors = filecmp.cmpfiles(left, right, comparison.common_files, shallow=False)
    differences += mismatch + errors
    for sub in comparison.common_dirs:
        differences += [os.path.join(sub, d) for d in _same_tree(
            os.path.join(left, sub), os.path.join(right, sub))]
    return differences


@pytest.mark.slow
def test_feature_job_through_the_portable_runner_matches_the_direct_runner(
        portable_args, tmp_path):
    from recsys_cvae.datasets.synthetic import write_synthetic

    raw = write_synthetic(str(tmp_path / "raw"), num_users=120, num_items=60, seed=3)
    home = tmp_path / "home"
    home.mkdir()
    for name, beam in (("direct", []), ("portable", portable_args)):
        result = run_cli(home, "features", "--data-dir", raw, "--workdir",
                         str(tmp_path / name), "-q", *beam, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
    assert _same_tree(str(tmp_path / "direct" / "features"),
                      str(tmp_path / "portable" / "features")) == []


@pytest.mark.slow
def test_candidates_job_through_the_portable_runner_matches_the_direct_runner(
        portable_args, features_dir, tmp_path):
    export = str(tmp_path / "export" / "1")
    build_toy_export(features_dir, export)
    home = tmp_path / "home"
    home.mkdir()
    for name, beam in (("direct", []), ("portable", portable_args)):
        result = run_cli(home, "candidates", "--features-dir", features_dir, "--export-dir",
                         export, "--candidates-dir", str(tmp_path / name), "-q", *beam,
                         timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
    assert os.listdir(tmp_path / "portable")
    assert _same_tree(str(tmp_path / "direct"), str(tmp_path / "portable")) == []


def test_a_job_endpoint_nobody_listens_on_is_one_line(tmp_path):
    from recsys_cvae.datasets.synthetic import write_synthetic

    raw = write_synthetic(str(tmp_path / "raw"), num_users=20, num_items=10, seed=0)
    result = run_cli(tmp_path, "features", "--data-dir", raw, "--workdir", str(tmp_path / "w"),
                     "--", "--runner=PortableRunner",
                     f"--job_endpoint=localhost:{free_port()}", timeout=120)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("recsys-cvae features: error: no Beam job service at "
                                "--job_endpoint=localhost:"), result.stderr
