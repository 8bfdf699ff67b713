"""Old home of the array maths and result types, kept so `from siamesedb import query; query.X` keeps working.

Moved: metrics, scores, normalize, top-k, prototypes, rankings and ROC / EER / FAR thresholds to
`siamesedb.scoring`; the verification rules (registry, `verification_score`, leave-one-out calibration scores) to
`siamesedb.rules`; `Hit`, `SearchResults`, `Prediction`, `Verification` and `json_default` to `siamesedb.results`.
"""

from __future__ import annotations

import numpy as np

from siamesedb.results import Hit, Prediction, SearchResults, Verification, json_default  # noqa: F401
from siamesedb.rules import (  # noqa: F401
    VERIFY_RULES,
    genuine_impostor_scores,
    reference_consistency,
    reference_spread,
    verification_score,
)
from siamesedb.scoring import (  # noqa: F401
    METRICS,
    Ranking,
    brute_force_search,
    check_metric,
    class_prototypes,
    eer_threshold,
    far_threshold,
    normalize,
    pair_scores,
    prototypes_from_sums,
    rank_by_knn,
    rank_by_prototype,
    roc_points,
    score_matrix,
)


def scores_for(metric: str, queries: np.ndarray, corpus: np.ndarray) -> np.ndarray:
    """The old name and argument order of `scoring.score_matrix(queries, corpus, metric)`."""
    return score_matrix(queries, corpus, metric)
