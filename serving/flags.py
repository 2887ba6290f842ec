"""The embedded server's command-line flags, shared by `python -m serving.server` and
`recsys-cvae serve`.

Why a module of its own: the CLI builds its parser for every subcommand; this module imports
nothing heavy (no TensorFlow, no grpc), so `recsys-cvae --help` stays fast. The flag names
follow `tensorflow_model_server`'s (`--model_config_file` -> `--model-config-file`, ...).
"""

from __future__ import annotations

import argparse

MIB = 1024 * 1024


def _label(text: str) -> tuple[str, int]:
    name, _, version = text.partition("=")
    if not name or not version.isdigit():
        raise argparse.ArgumentTypeError(f"expected LABEL=VERSION (e.g. stable=3), got {text!r}")
    return name, int(version)


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """The server's flags except --model-base-path (shared with `recsys-cvae serve`)."""
    parser.add_argument(
        "--model-config-file", help="TF Serving ModelServerConfig text file naming several "
        "models (instead of --model-base-path/--model-name)")
    parser.add_argument("--model-name", default="recsys_cvae", help="name clients ask for")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: all)")
    parser.add_argument("--port", type=int, default=8500, help="gRPC port (0: any free port)")
    parser.add_argument(
        "--rest-api-port", type=int, default=None,
        help="also serve the REST API on this port (0: any free port; default: no REST)")
    parser.add_argument(
        "--rest-api-num-threads", type=int, default=0,
        help="REST requests answered at once, by that many worker threads; open and idle "
        "keep-alive connections wait without one (TF Serving's --rest_api_num_threads; "
        "default 0: 4, not TF Serving's 4 per CPU: Python's interpreter lock serialises most "
        "of a request, and more threads only queue for it)")
    parser.add_argument(
        "--rest-api-timeout-in-ms", type=int, default=30000,
        help="how long a REST connection may stay idle, or take to send a request (TLS "
        "handshake included), before it is closed (TF Serving's --rest_api_timeout_in_ms; "
        "default 30000)")
    parser.add_argument(
        "--monitoring-config-file",
        help="TF Serving MonitoringConfig text file; prometheus_config { enable: true } serves "
        "TF Serving's metrics on the REST port at its path (default "
        "/monitoring/prometheus/metrics)")
    parser.add_argument(
        "--max-num-load-retries", type=int, default=5,
        help="times a version that failed to load is tried again (TF Serving's "
        "--max_num_load_retries; default 5)")
    parser.add_argument(
        "--load-retry-interval-micros", type=int, default=60_000_000,
        help="wait between those tries (TF Serving's --load_retry_interval_micros; default "
        "one minute)")
    parser.add_argument("--poll-interval-s", type=float, default=2.0, help="version scan period")
    parser.add_argument(
        "--max-batch-size", type=int, default=1024, help="largest batch one request may carry")
    parser.add_argument(
        "--max-message-mib", type=int, default=16, help="request/response size cap in MiB")
    parser.add_argument(
        "--version-label", type=_label, action="append", default=[], metavar="LABEL=VERSION",
        help="a version label clients may ask for (repeatable)")
    parser.add_argument(
        "--enable-batching", action="store_true",
        help="merge concurrent small requests into one model call")
    parser.add_argument(
        "--batch-size", type=int, default=32, help="rows per merged call (with batching)")
    parser.add_argument(
        "--batch-timeout-ms", type=float, default=2.0,
        help="how long a request waits for others to batch with (with batching)")
    parser.add_argument(
        "--batching-parameters-file",
        help="TF Serving BatchingParameters text file (max_batch_size, batch_timeout_micros, "
        "enable_large_batch_splitting, ...) instead of --batch-size/--batch-timeout-ms "
        "(with --enable-batching)")
    parser.add_argument("--ssl-cert", help="PEM certificate (chain): serve TLS only")
    parser.add_argument("--ssl-key", help="PEM private key of --ssl-cert")
    parser.add_argument(
        "--ssl-client-ca",
        help="PEM CA certificate: clients must present a certificate it signed (mutual TLS, "
        "as TF Serving's ssl_config client_verify)")
    parser.add_argument("--max-workers", type=int, default=8, help="RPC threads")
    parser.add_argument("--grace-s", type=float, default=10.0, help="shutdown grace period")


def server_kwargs(args: argparse.Namespace) -> dict:
    """ModelServer keyword arguments from the flags of `add_server_arguments`."""
    return dict(
        model_name=args.model_name, host=args.host, port=args.port,
        poll_interval_s=args.poll_interval_s, max_batch_size=args.max_batch_size,
        max_message_bytes=args.max_message_mib * MIB, version_labels=dict(args.version_label),
        rest_api_port=args.rest_api_port, model_config_file=args.model_config_file,
        enable_batching=args.enable_batching, batch_size=args.batch_size,
        batch_timeout_s=args.batch_timeout_ms / 1000, ssl_cert=args.ssl_cert,
        ssl_key=args.ssl_key, ssl_client_ca=args.ssl_client_ca, max_workers=args.max_workers,
        rest_api_num_threads=args.rest_api_num_threads,
        rest_api_timeout_s=args.rest_api_timeout_in_ms / 1000,
        monitoring_config_file=args.monitoring_config_file,
        max_num_load_retries=args.max_num_load_retries,
        load_retry_interval_s=args.load_retry_interval_micros / 1e6,
        batching_parameters_file=args.batching_parameters_file,
    )


