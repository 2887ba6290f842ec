"""The pipeline's stage table: seconds and peak memory per stage, and the benchmark's parser."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from recsys_cvae.memory import PeakMemory
from recsys_cvae.pipeline.stage_timer import StageTimer
from tests.builders import REPO

linux_only = pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")


def load_bench_e2e():
    spec = importlib.util.spec_from_file_location(
        "bench_e2e", os.path.join(REPO, "benchmarks", "bench_e2e.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@linux_only
def test_peak_memory_counts_this_process_and_its_children():
    with PeakMemory() as idle:
        pass
    # 200 MB touched in this process, then 300 MB in a child: both show as peaks.
    with PeakMemory() as own:
        block = np.ones(200_000_000 // 8)
        del block
    child = "import numpy as np, time; a = np.ones(300_000_000 // 8); time.sleep(0.5)"
    with PeakMemory(interval_s=0.05) as tree:
        subprocess.run([sys.executable, "-c", child], check=True)
    assert own.bytes >= idle.bytes + 190e6
    assert tree.bytes >= 300e6


@linux_only
def test_stage_table_round_trips_through_the_benchmark_parser():
    def busy() -> None:  # 100 MB touched, then 0.4 s of this process's CPU
        np.ones(100_000_000 // 8).sum()
        start = time.process_time()
        while time.process_time() - start < 0.4:
            pass

    timer = StageTimer()
    timer.run("features", busy)
    timer.run("train", lambda: None)
    table = timer.table()
    assert table.splitlines()[0] == "| stage | seconds | CPU seconds | peak RSS GB |"
    stages = load_bench_e2e().parse_stage_table("Stage durations\n" + table + "\n\nMetrics")
    assert list(stages) == ["features", "train", "total"]
    assert stages["features"]["peak_gb"] >= 0.09
    assert stages["features"]["cpu_seconds"] >= 0.4 - 0.05  # rounded to 0.1 s in the table
    assert stages["train"]["cpu_seconds"] < stages["features"]["cpu_seconds"]
    # The total's peak is the largest stage peak; its seconds the sum (each rounded to 0.1 s).
    assert stages["total"]["peak_gb"] == max(s["peak_gb"] for s in stages.values())
    assert stages["total"]["seconds"] == pytest.approx(
        stages["features"]["seconds"] + stages["train"]["seconds"], abs=0.15
    )


def test_stage_table_without_memory_readings_shows_dashes():
    timer = StageTimer(
        seconds={"export": 2.0}, cpu_seconds={"export": 1.5}, peak_bytes={"export": None}
    )
    assert timer.table().splitlines()[2:] == [
        "| export | 2.0 | 1.5 | - |",
        "| total | 2.0 | 1.5 | - |",
    ]
    stages = load_bench_e2e().parse_stage_table("Stage durations\n" + timer.table())
    assert stages["export"] == {"seconds": 2.0, "cpu_seconds": 1.5, "peak_gb": None}


def test_benchmark_parses_the_older_three_column_table():
    table = "| stage | seconds | peak RSS GB |\n|---|---:|---:|\n| train | 9.0 | 1.84 |\n"
    table += "| total | 9.0 | 1.84 |\n"
    stages = load_bench_e2e().parse_stage_table("Stage durations\n" + table)
    assert stages["train"] == {"seconds": 9.0, "cpu_seconds": None, "peak_gb": 1.84}


def test_cpu_seconds_count_a_busy_stage():
    measured = {}

    def spin():
        start = time.process_time()
        sum(i * i for i in range(3_000_000))
        measured["cpu"] = time.process_time() - start

    timer = StageTimer()
    timer.run("spin", spin)
    # The stage's CPU time is the loop's own (whatever the machine's load), give or take
    # the sampler thread and rounding.
    assert timer.cpu_seconds["spin"] == pytest.approx(measured["cpu"], abs=0.15)
    assert measured["cpu"] > 0.05


def test_benchmark_parses_keras_epoch_lines_and_names_a_missing_table():
    bench = load_bench_e2e()
    output = (
        "Epoch 1/3\n41/41 - 21s - loss: 1136.3 - 21s/epoch - 514ms/step\n"
        "Epoch 2/3\n41/41 - 19s - loss: 1054.3 - 19s/epoch - 454ms/step\n"
        "Epoch 3/4\n9/9 - 2s - loss: 1001.0\n"
        "Epoch 4/4\n58/58 - 116s - loss: 990.0 - 116s/epoch - 2s/step\n"
    )
    # 41 steps x 0.514 s = 21.07 s; without a step time, or with one rounded to whole
    # seconds (2 s/step), the epoch's own seconds.
    assert bench.parse_epoch_seconds(output) == [21.07, 18.61, 2.0, 116.0]
    with pytest.raises(ValueError, match="Stage durations"):
        bench.parse_stage_table(output)


@pytest.mark.slow
def test_bench_e2e_runs_the_pipeline_at_a_tiny_scale(tmp_path):
    # 200 users, 846 items: the whole pipeline in a fresh process, every stage measured.
    result = load_bench_e2e().main(
        ["--scale", "0.001", "--epochs", "1", "--workdir", str(tmp_path),
         "--output", str(tmp_path / "bench.json")]
    )  # fmt: skip
    assert {"features", "train", "export", "candidates", "evaluate", "total"} <= set(
        result["stages"]
    )
    assert all(s["peak_gb"] and s["peak_gb"] > 0.05 for s in result["stages"].values())
    # one epoch of the strong protocol's CVAE, one of the served refit on all users
    assert len(result["epoch_seconds"]) == 2
    # The CVAE and both baselines were scored on the test users.
    assert len(result["metrics"]["test"]) == 3 and "popularity" in result["metrics"]["test"]


def test_release_free_memory_hands_freed_heap_back_to_the_os():
    """Freed small allocations below a live one stay resident until malloc_trim."""
    script = (
        "import gc, json\n"
        "from recsys_cvae.memory import release_free_memory, tree_rss_bytes\n"
        "blocks = [bytearray(60_000) for _ in range(5_000)]\n"  # 300 MB on malloc's heap
        "del blocks[:-1]; gc.collect()\n"
        "freed = tree_rss_bytes()\n"
        "release_free_memory()\n"
        "print(json.dumps([freed, tree_rss_bytes()]))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, cwd=REPO)  # fmt: skip
    before, after = json.loads(out.stdout)
    assert before - after > 200e6
