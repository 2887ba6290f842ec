"""How long each stage of a run took, how much CPU it used and its peak memory.

Why: `recsys-cvae pipeline` prints this table after the metrics, so a user sees where the
time goes on their data (features or training?) before reaching for a bigger machine.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from recsys_cvae.memory import PeakMemory, release_free_memory

log = logging.getLogger("recsys_cvae")


@dataclass
class StageTimer:
    """Records each stage's duration, CPU time and peak memory, for the table `pipeline` prints.

    CPU seconds are this process's and its finished children's user + system time (on a
    shared machine wall time grows with the load, CPU time much less). Peak memory is the
    resident memory of this process and its children during the stage (`PeakMemory`), so a
    stage that runs Beam worker processes is counted whole.
    """

    seconds: dict[str, float] = field(default_factory=dict)
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    peak_bytes: dict[str, int | None] = field(default_factory=dict)

    def run(self, name: str, fn: Callable, *args, **kwargs):
        log.info("── %s ──", name)
        start, cpu_start = time.perf_counter(), _cpu_seconds()
        with PeakMemory() as peak:
            result = fn(*args, **kwargs)
        self.seconds[name] = time.perf_counter() - start
        self.cpu_seconds[name] = _cpu_seconds() - cpu_start
        # The stages share this process: hand what the finished stage freed back to the OS,
        # so the next stage's peak is not its own plus the allocator's leftovers. (Between
        # stages: a collection over a large heap is not the stage's own time.)
        release_free_memory()
        self.peak_bytes[name] = peak.bytes
        log.info("%s done in %.1f s (CPU %.1f s, peak RSS %s GB)", name, self.seconds[name],
                 self.cpu_seconds[name], _gigabytes(peak.bytes))  # fmt: skip
        return result

    def table(self) -> str:
        """Markdown: one row per stage, then the total (sums; the largest stage peak)."""
        lines = ["| stage | seconds | CPU seconds | peak RSS GB |", "|---|---:|---:|---:|"]
        lines += [
            f"| {name} | {s:.1f} | {self.cpu_seconds.get(name, 0.0):.1f} | "
            f"{_gigabytes(self.peak_bytes.get(name))} |"
            for name, s in self.seconds.items()
        ]
        peaks = [b for b in self.peak_bytes.values() if b is not None]
        total_peak = _gigabytes(max(peaks)) if peaks else "-"
        lines.append(
            f"| total | {sum(self.seconds.values()):.1f} | "
            f"{sum(self.cpu_seconds.values()):.1f} | {total_peak} |"
        )
        return "\n".join(lines)


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its waited-for children."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def _gigabytes(value: int | None) -> str:
    return "-" if value is None else f"{value / 1e9:.2f}"
