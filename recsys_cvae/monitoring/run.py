"""`recsys-cvae monitor`: read both sources, compare, write the files, say the verdict.

Exit status 0 when every check passes and 3 when one fails (1 stays "could not run"), so a
scheduler or the promotion gate can act on it without parsing anything.
"""

from __future__ import annotations

from recsys_cvae.config import MonitorConfig
from recsys_cvae.monitoring.drift import compare
from recsys_cvae.monitoring.outputs import read_recommendations
from recsys_cvae.monitoring.page import failures, write

FAILED_STATUS = 3


def run_monitor(reference: str, current: str, out_dir: str, thresholds: MonitorConfig,
                users_file: str = "") -> int:
    """Compares `current` with `reference`; writes monitor.json and monitor.html in
    `out_dir`; prints each check and the verdict; returns the exit status."""
    result = compare(read_recommendations(reference, users_file),
                     read_recommendations(current, users_file), thresholds)
    data, page = write(result, out_dir)
    print("| check | value | limit | verdict |\n|---|---:|---:|---|")
    for check in result["checks"]:
        value = "—" if check["value"] is None else f"{check['value']:.4f}"
        where = f" ({check['where']})" if check.get("where") else ""
        print(f"| {check['name']}{where} | {value} | {check['relation']} {check['limit']:.4f} "
              f"| {'pass' if check['passed'] else 'FAIL'} |")
    print(f"\nMonitor: {page} (JSON: {data})")
    if not result["passed"]:
        print("monitor: FAILED " + "; ".join(failures(result)))
        return FAILED_STATUS
    print("monitor: every check passed")
    return 0
