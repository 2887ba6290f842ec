"""A server on a free port serving the tiny SavedModel of `tests.builders.TinyRecommender`.

One server is shared by the read-only tests; tests that add versions use their own base.
"""

from __future__ import annotations

import pytest

from tests.builders import V1_SCORES, save_version


@pytest.fixture(scope="session")
def model_base_path(tmp_path_factory) -> str:
    """A base path holding version 1 only (tests that add versions use their own copy)."""
    base = str(tmp_path_factory.mktemp("base"))
    save_version(base, 1, V1_SCORES)
    return base


@pytest.fixture(scope="session")
def server(model_base_path):
    """One ModelServer on 127.0.0.1 and a free port, shared by the read-only tests."""
    from serving.server import ModelServer

    model_server = ModelServer(model_base_path, port=0, poll_interval_s=60.0, max_batch_size=8,
                               version_labels={"stable": 1})
    model_server.start()
    yield model_server
    model_server.stop(grace_s=1.0)


@pytest.fixture(scope="session")
def target(server) -> str:
    return f"127.0.0.1:{server.port}"
