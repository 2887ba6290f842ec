"""The closed form shared by the EASE baseline and the CVAE's blend (`recsys_cvae.model.ease`)."""

from __future__ import annotations

import numpy as np
import pytest

from recsys_cvae.model.ease import ease_from_gram


def interactions(seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((60, 8)) < np.linspace(0.1, 0.6, 8)).astype(np.float64)


@pytest.mark.parametrize("dropout", [0.0, 0.33, 0.5])
def test_the_closed_form_meets_the_constrained_least_squares_optimality_conditions(dropout):
    """B minimises ‖X − XB‖² + Σ_j Λ_j ‖B_j‖² subject to diag(B) = 0, with Λ = λ + p/(1−p) ·
    diag(XᵀX) (EDLAE's expected dropout loss, Steck 2020, eq. 6): its gradient (XᵀX + Λ)B − XᵀX
    vanishes off the diagonal, where only the constraint's multipliers act."""
    x = interactions()
    gram = x.T @ x
    weights = ease_from_gram(gram, 4.0, dropout)
    penalty = 4.0 + dropout / (1.0 - dropout) * np.diag(gram)
    gradient = (gram + np.diag(penalty)) @ weights - gram
    off_diagonal = ~np.eye(len(gram), dtype=bool)
    np.testing.assert_allclose(gradient[off_diagonal], 0.0, atol=1e-9)
    assert np.all(np.diag(weights) == 0.0)


def test_dropout_shrinks_popular_items_more_than_one_lambda_does():
    x = interactions()
    gram = x.T @ x
    ease, edlae = ease_from_gram(gram, 4.0), ease_from_gram(gram, 4.0, 0.5)
    popular, rare = int(np.argmax(np.diag(gram))), int(np.argmin(np.diag(gram)))
    assert np.abs(edlae[popular]).sum() / np.abs(ease[popular]).sum() < (
        np.abs(edlae[rare]).sum() / np.abs(ease[rare]).sum())
    assert np.array_equal(ease, ease_from_gram(gram, 4.0, 0.0)) and not np.allclose(ease, edlae)


def test_a_rate_outside_zero_to_one_is_refused():
    with pytest.raises(ValueError, match="dropout must be in"):
        ease_from_gram(np.eye(3), 1.0, 1.0)
