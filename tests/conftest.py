"""Shared fixtures: data is generated, never downloaded."""

from __future__ import annotations

import pytest

import recsys_cvae  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)


@pytest.fixture(scope="session")
def features_dir(tmp_path_factory) -> str:
    """Features built by the real Beam job from small synthetic data.

    300 users with attribute-driven tastes over 120 items; the splits follow the default
    FeaturesConfig (train, validation and test with fold-in/targets, cold start).
    """
    from beam_jobs.features import build_features
    from recsys_cvae.config import FeaturesConfig
    from recsys_cvae.datasets.synthetic import write_synthetic

    raw_dir = write_synthetic(
        str(tmp_path_factory.mktemp("raw")), num_users=300, num_items=120, seed=0
    )
    out = str(tmp_path_factory.mktemp("features"))
    build_features(raw_dir, out, FeaturesConfig(), save_main_session=False, quiet=True)
    return out


@pytest.fixture()
def toy_dirs(tmp_path) -> tuple[str, str, str]:
    """(features, candidates, report): a 5-item catalogue and two models' candidates."""
    from tests.builders import write_toy_dirs

    return write_toy_dirs(tmp_path)
