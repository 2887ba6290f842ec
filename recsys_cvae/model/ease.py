"""EASE's closed form (Steck, 2019): the linear algebra the baseline and the CVAE's blend share.

Why here, in `model/`: the CVAE's item-item branch is initialised from it (`training.fit`)
and blended with it after training (`training.ease_blend`), and the EASE baseline
(`baselines.linear`) fits it directly. One formula, one place, below all three.

    B = I − P · diagMat(1 / diag(P)),   P = (XᵀX + λI)⁻¹,   diag(B) = 0
"""

from __future__ import annotations

import numpy as np


def ease_from_gram(gram: np.ndarray, l2: float) -> np.ndarray:
    """EASE's B [num_items, num_items] from the Gram matrix XᵀX (float64, not modified)."""
    regularised = gram.copy()
    regularised[np.diag_indices_from(regularised)] += l2
    inverse = np.linalg.inv(regularised)
    weights = inverse / (-np.diag(inverse))
    weights[np.diag_indices_from(weights)] = 0.0
    return weights
