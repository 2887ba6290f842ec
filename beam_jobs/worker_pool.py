"""Beam's EXTERNAL SDK worker pool, bound to one address and starting harnesses with this Python.

Why not `python -m apache_beam.runners.worker.worker_pool_main` as it is: that pool listens
on every interface (`[::]`) and starts each SDK harness as `python -c ...`, whatever `python`
is first on PATH. Run from a virtualenv that is not activated, that `python` has no Beam: the
harness dies on its first import, the runner waits for it, and the job ends 300 s later
with `DEADLINE_EXCEEDED: Stream removed`, nowhere saying why (the reason is only in the
pool's own log). This module is the same servicer with both fixed: it listens on
`--host` (127.0.0.1 by default) and puts this interpreter's folder first on PATH for the
harnesses it starts, each in its own process as on a cluster's SDK containers.

    python -m beam_jobs.worker_pool --port 50000
    recsys-cvae features ... -- --runner=PortableRunner --job_endpoint=localhost:8099 \\
        --environment_type=EXTERNAL --environment_config=localhost:50000
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import sys
import threading
from collections.abc import Sequence

import grpc
from apache_beam.portability.api import beam_fn_api_pb2_grpc
from apache_beam.runners.worker.worker_pool_main import (
    BeamFnExternalWorkerPoolServicer,
    kill_process_gracefully,
)
from apache_beam.utils import thread_pool_executor


def start(host: str = "127.0.0.1", port: int = 0) -> tuple[str, grpc.Server]:
    """Starts the pool; returns ("host:port", server). Harnesses run as separate processes."""
    folder = os.path.dirname(sys.executable)
    if os.environ.get("PATH", "").split(os.pathsep)[0] != folder:
        os.environ["PATH"] = folder + os.pathsep + os.environ.get("PATH", "")
    server = grpc.server(thread_pool_executor.shared_unbounded_instance(),
                         options=[("grpc.http2.max_pings_without_data", 0),
                                  ("grpc.http2.max_ping_strikes", 0),
                                  ("grpc.so_reuseport", 0)])  # one pool a port
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as error:  # grpc says only "Failed to bind"; in use, or not ours
        raise OSError(f"the worker pool cannot listen on {host}:{port} "
                      "(is another process using the port?)") from error
    pool = BeamFnExternalWorkerPoolServicer(use_process=True, data_buffer_time_limit_ms=-1)
    beam_fn_api_pb2_grpc.add_BeamFnExternalWorkerPoolServicer_to_server(pool, server)
    server.start()
    # as Beam's own pool does: no harness outlives the pool
    atexit.register(lambda: [kill_process_gracefully(p) for p in pool._worker_processes.values()])
    return f"{host}:{bound}", server


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m beam_jobs.worker_pool",
        description="Beam SDK worker pool for --environment_type=EXTERNAL: each harness a "
                    "separate process of this Python.")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; 0.0.0.0 for a "
                             "runner on another machine)")
    parser.add_argument("--port", type=int, default=50000,
                        help="port to listen on (default 50000; 0 picks a free one)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        address, server = start(args.host, args.port)
    except OSError as error:
        print(f"worker pool: error: {error}", file=sys.stderr)
        return 1
    print(f"worker pool listening on {address}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.stop(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
