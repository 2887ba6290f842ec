"""Pipeline options shared by every Beam job in this package."""

from __future__ import annotations

import socket

from apache_beam.options.pipeline_options import (
    PipelineOptions,
    PortableOptions,
    SetupOptions,
    StandardOptions,
)


def pipeline_options(pipeline_args: list[str] | None, save_main_session: bool) -> PipelineOptions:
    """PipelineOptions from the pass-through flags, on the DirectRunner unless told otherwise.

    Why: with no `--runner`, recent Beam releases pick the Prism runner, which downloads a
    binary at start-up — impossible on machines without internet access, and a surprise on
    those with it. The DirectRunner is what the README promises for local runs.
    """
    options = PipelineOptions(pipeline_args or [])
    standard = options.view_as(StandardOptions)
    if not standard.runner:
        standard.runner = "DirectRunner"
    options.view_as(SetupOptions).save_main_session = save_main_session
    _check_job_endpoint(options.view_as(PortableOptions).job_endpoint)
    return options


def _check_job_endpoint(endpoint: str | None, timeout_s: float = 5.0) -> None:
    """Fails in one line when nothing listens at `--job_endpoint`.

    Why: the PortableRunner waits for the job service without a word (here it still waited
    after two minutes), which reads as a hung job rather than a wrong address.
    """
    if not endpoint or endpoint == "embed" or ":" not in endpoint:
        return
    host, _, port = endpoint.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as error:
        raise ConnectionError(
            f"no Beam job service at --job_endpoint={endpoint} ({error}); start one, e.g. "
            "python -m apache_beam.runners.portability.local_job_service_main --port "
            f"{port}") from None
