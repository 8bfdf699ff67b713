"""Milvus index types: which ones a collection may be built with, their build parameters, the search knobs each
takes, the metric types, Milvus's request limits, and how the index-type strings the rest of siamesedb speaks (FAISS factory strings Flat, IVF<n>,Flat, HNSW<M>) map onto them.

Metric: "cosine" is Milvus's IP (inner product), not COSINE: SiameseDB's vectors are already L2-normalised and the
FAISS backend scores with the inner product, so IP gives the same numbers as FAISS (COSINE would normalise again:
extra work, and different scores for a vector that is not exactly unit-length). "euclidean" is L2, whose Milvus
distance is the squared distance (the backend turns it into minus the distance).
"""

from __future__ import annotations

import re

from siamesedb.errors import InvalidInputError

METRIC_TYPES = {"cosine": "IP", "euclidean": "L2"}  # siamesedb metric -> Milvus metric type
INDEX_TYPES = ("FLAT", "IVF_FLAT", "HNSW", "GPU_CAGRA", "GPU_IVF_FLAT")
# Build parameters when the caller names none: Milvus's own documented defaults / FAISS-like sizes.
DEFAULT_BUILD_PARAMS = {
    "FLAT": {},
    "IVF_FLAT": {"nlist": 1024},
    "HNSW": {"M": 32, "efConstruction": 200},  # the FAISS backend's graph is HNSW32
    "GPU_CAGRA": {},
    "GPU_IVF_FLAT": {"nlist": 1024},
}
MAX_TOPK = 16_384  # Milvus's limits on topk and on queries per search request
MAX_NQ = 16_384
# Which search knobs an index type takes, and what a search uses when neither the call nor the handle names one
# (the FAISS backend's measured auto defaults: nprobe 16, efSearch 64).
SEARCH_KNOBS = {"FLAT": (), "IVF_FLAT": ("nprobe",), "GPU_IVF_FLAT": ("nprobe",), "HNSW": ("ef_search",),
                "GPU_CAGRA": ("ef_search",)}
STARTING_DEFAULTS = {"nprobe": 16, "ef_search": 64}


def milvus_index_type(factory: str) -> tuple[str, dict[str, int]]:
    """(Milvus index type, build params) for a FAISS factory string or a Milvus type name."""
    if factory.upper() in INDEX_TYPES:
        kind = factory.upper()
        return kind, dict(DEFAULT_BUILD_PARAMS[kind])
    if factory == "Flat":
        return "FLAT", {}
    if match := re.fullmatch(r"IVF(\d+),Flat", factory):
        return "IVF_FLAT", {"nlist": int(match.group(1))}
    if match := re.fullmatch(r"HNSW(\d+)(,Flat)?", factory):
        return "HNSW", {"M": int(match.group(1)), "efConstruction": 200}
    raise InvalidInputError(
        f"index type {factory!r} has no Milvus counterpart; use Flat, IVF<n>,Flat, HNSW<M> or a Milvus type "
        f"({', '.join(INDEX_TYPES)})"
    )

