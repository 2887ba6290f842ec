"""The item graph's ideal low-pass filter (`recsys_cvae.model.low_pass`, GF-CF's construction)."""

from __future__ import annotations

import numpy as np
import pytest

from recsys_cvae.model.low_pass import low_pass_from_gram


def two_tastes(seed: int = 5) -> np.ndarray:
    """40 users × 12 items: users 0–19 mostly take items 0–5, users 20–39 items 6–11."""
    rng = np.random.default_rng(seed)
    taste = np.repeat([[0.7] * 6 + [0.05] * 6, [0.05] * 6 + [0.7] * 6], 20, axis=0)
    return (rng.random(taste.shape) < taste).astype(np.float64)


def statistics(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    totals = np.maximum(x.sum(1, keepdims=True), 1.0)
    return (x / totals).T @ x, x.sum(0)


def test_the_filter_is_the_projection_on_the_leading_singular_directions_of_r():
    """S = D^−β V Vᵀ D^β with V the top right singular vectors of R = D_u^−½ X D_i^−β,
    computed here from the SVD of R itself rather than from the Gram matrix."""
    x = two_tastes()
    gram, degrees = statistics(x)
    for rank, exponent in ((2, 0.3), (5, 0.5), (3, 0.0)):
        r = x / np.sqrt(x.sum(1, keepdims=True)) / degrees[None, :] ** exponent
        leading = np.linalg.svd(r, full_matrices=False)[2][:rank].T
        expected = (leading / degrees[:, None] ** exponent) @ (
            leading.T * degrees[None, :] ** exponent)
        low_pass = low_pass_from_gram(gram, degrees, rank, exponent)
        np.testing.assert_allclose(low_pass, expected, atol=1e-10)
        np.testing.assert_allclose(low_pass @ low_pass, low_pass, atol=1e-10)  # a projection


def test_a_history_in_one_taste_scores_that_taste_above_the_other():
    x = two_tastes()
    low_pass = low_pass_from_gram(*statistics(x), rank=2, exponent=0.3)
    history = np.zeros(12)
    history[[0, 1]] = 1.0
    scores = history @ low_pass
    assert scores[2:6].min() > scores[6:].max()


def test_items_never_seen_do_not_divide_by_zero_and_bad_settings_are_refused():
    x = two_tastes()
    x[:, 11] = 0.0
    assert np.isfinite(low_pass_from_gram(*statistics(x), rank=2, exponent=0.3)).all()
    with pytest.raises(ValueError, match="rank must be in"):
        low_pass_from_gram(*statistics(x), rank=12, exponent=0.3)
    with pytest.raises(ValueError, match="exponent must be in"):
        low_pass_from_gram(*statistics(x), rank=2, exponent=1.5)


def test_the_cosine_taper_weights_the_leading_directions_down_smoothly():
    """Tapered S = D^−β V W Vᵀ D^β, W = diag(½(1 + cos(π i / rank))): the first direction
    whole, later ones less, and no longer a projection."""
    from recsys_cvae.model.low_pass import cosine_taper, low_pass_factors

    taper = cosine_taper(4)
    np.testing.assert_allclose(taper, [1.0, 0.5 + 0.5 * np.cos(np.pi / 4), 0.5,
                                       0.5 + 0.5 * np.cos(3 * np.pi / 4)])
    x = two_tastes()
    gram, degrees = statistics(x)
    left, right = low_pass_factors(gram, degrees, 4, 0.3)
    tapered = low_pass_from_gram(gram, degrees, 4, 0.3, tapered=True)
    np.testing.assert_allclose(tapered, (left * taper) @ right, atol=1e-12)
    assert not np.allclose(tapered @ tapered, tapered)
    np.testing.assert_allclose(low_pass_from_gram(gram, degrees, 1, 0.3, tapered=True),
                               low_pass_from_gram(gram, degrees, 1, 0.3), atol=1e-12)
