"""DeepMiner's unit ranking: which units of the explained layer drive the class score.

For unit u and class c: activation = spatial max of u's map; contribution = activation x weight.
For the mammography model the weight is the classifier's ``fc.weight[c, u]``; with global max
pooling the contributions then sum (with the bias) to the class logit exactly. The MRI model has
no linear read-out after its last conv block, so its weight is the Grad-CAM weight (spatial mean
of d score / d map), and the contribution is a first-order estimate; ``weight_source`` says which.
Ranking is by contribution, signed: a unit with a large activation and a negative weight argues
*against* the class and ranks last (the seed ranked by contribution where activation was meant
in some places, and mixed signs; this module keeps the raw activation alongside).
"""

from __future__ import annotations

import numpy as np


def rank_units(activations: np.ndarray, weights: np.ndarray, k: int, unit_labels: dict,
               weight_source: str) -> list[dict]:
    """activations (U,), weights (U,) for the target class -> the top-k units by contribution."""
    contributions = activations * weights
    order = np.argsort(-contributions, kind="stable")[:k]
    labelled = unit_labels.get("units", {})
    return [{"unit": int(u), "rank": rank + 1, "activation": float(activations[u]), "weight": float(weights[u]),
             "contribution": float(contributions[u]), "weight_source": weight_source,
             "labels": list(labelled.get(str(int(u)), {}).get("labels", [])),
             "concepts": list(labelled.get(str(int(u)), {}).get("concepts", []))}
            for rank, u in enumerate(order)]
