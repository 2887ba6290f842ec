"""EASE's closed form (Steck, 2019), with EDLAE's dropout emphasis (Steck, 2020): the linear
algebra the baseline and the CVAE's blend share.

Why here, in `model/`: the CVAE's item-item branch is initialised from it (`training.fit`)
and blended with it after training (`training.ease_blend`), and the EASE baseline
(`baselines.linear`) fits it directly. One formula, one place, below all three.

    B = I − P · diagMat(1 / diag(P)),   P = (XᵀX + Λ)⁻¹,   diag(B) = 0
    Λ = λI                                    (EASE)
    Λ = λI + p / (1 − p) · diagMat(diag(XᵀX))  (full-rank EDLAE, dropout rate p)

EDLAE's Λ is what training a zero-diagonal linear autoencoder on inputs dropped out at rate p
regularises with, in expectation: popular items (large diag(XᵀX)) are shrunk more than a
single λ can. The EASE baseline keeps p = 0; the CVAE's blend can try p > 0
(`model.linear_blend_dropouts`; alone, EDLAE ranks ML-100K's deployment split 0.5–0.8% better
than EASE, but blended with the CVAE it did not beat the EASE blend, so it is off by default).
"""

from __future__ import annotations

import numpy as np


def ease_from_gram(gram: np.ndarray, l2: float, dropout: float = 0.0) -> np.ndarray:
    """B [num_items, num_items] from the Gram matrix XᵀX (float64, not modified): EASE's,
    or EDLAE's when `dropout` p is in (0, 1)."""
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    regularised = gram.copy()
    diagonal = np.diag_indices_from(regularised)
    regularised[diagonal] += l2 + dropout / (1.0 - dropout) * np.diag(gram)
    inverse = np.linalg.inv(regularised)
    weights = inverse / (-np.diag(inverse))
    weights[diagonal] = 0.0
    return weights
