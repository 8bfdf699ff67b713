"""The FAISS factory policy: which factory strings are valid (checked without building an index), the `auto` rule
that picks one from the collection size and a memory budget, and the search defaults an `auto` index starts with.

Metrics: the manifest and VectorIndex name FAISS's two as "inner_product" (cosine encoders) and "l2" (Euclidean
ones); METRIC_OF_ENCODER turns the vocabulary above the seam into them.
"""

from __future__ import annotations

import math
import re

import faiss

from siamesedb.errors import InvalidInputError

# Index metrics as VectorIndex names them, and the FAISS metric each one searches with.
INDEX_METRICS = {"inner_product": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
METRIC_OF_ENCODER = {"cosine": "inner_product", "euclidean": "l2"}  # siamesedb metric -> index metric

AUTO = "auto"  # factory value resolved by choose_factory from the collection size and a memory budget
FLAT_BELOW = 10_000  # below this many vectors exact search is < 1 ms a query at 64-d: no approximation needed
IVF_FLAT_BELOW = 1_000_000  # autofaiss's ivf_flat_threshold: above it, IVF,Flat scans too many full vectors
DEFAULT_MEMORY_BUDGET = 4 * 2**30  # bytes the index may use when the caller names no budget
HNSW_EF_LARGE_FROM = 500_000  # from this many vectors an auto HNSW index searches with efSearch 128, not 64
_ID_MAP_BYTES = 24  # IndexIDMap2 per vector: the int64 id plus its entry in the reverse hash map (estimate)
_PQ_SIZES = (64, 48, 32, 24, 16, 12, 8, 4)  # bytes per PQ code tried, largest (most accurate) first


def faiss_reason(exc: Exception) -> str:
    """FAISS's own message without the C++ signature and source location, on one line."""
    text = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    # "Error in <signature> at /path/File.cpp:57: Error: 'cond' failed: what went wrong"
    match = re.search(r" at \S+:\d+: (?:Error: )?(.*)$", text)
    reason = match.group(1) if match else text
    return reason.split("' failed: ", 1)[1] if "' failed: " in reason else reason


def parse_factory(dimension: int, factory: str, metric: str = "inner_product") -> faiss.Index:
    """`faiss.index_factory(dimension, factory, metric)`: an empty FAISS index, or InvalidInputError naming FAISS's
    reason for a string it cannot build."""
    try:
        return faiss.index_factory(int(dimension), factory, INDEX_METRICS[metric])
    except RuntimeError as exc:
        raise InvalidInputError(f"bad FAISS factory string {factory!r}: {faiss_reason(exc)}") from None


def check_factory(factory: str, dimension: int) -> None:
    """Refuse a factory string FAISS cannot build at `dimension` ("auto" is fine: resolve_factory picks one).
    FAISS parses the string into an empty index, untrained and unfilled: no copy of any vector is made."""
    if int(dimension) < 1:
        raise InvalidInputError(f"dimension must be positive, got {dimension}")
    if factory != AUTO:
        parse_factory(dimension, factory)


def resolve_factory(factory: str, dimension: int, expected_items: int = 0,
                    memory_budget: int | None = None) -> tuple[str, dict[str, int]]:
    """(factory, search defaults): "auto" -> choose_factory's pick for `expected_items` vectors and its
    auto_search_defaults; any other string as given with none. Checked either way."""
    if factory == AUTO:
        factory = choose_factory(expected_items, dimension, memory_budget)
        defaults = auto_search_defaults(factory, expected_items)
    else:
        defaults = {}
    check_factory(factory, dimension)
    return factory, defaults


def ivf_lists(n_vectors: int) -> int:
    """Inverted lists for an IVF index over n vectors: FAISS's guideline of 4*sqrt(n), as a power of two, capped
    so k-means gets the 39 training points per centroid FAISS asks for (at least one list)."""
    n = max(1, int(n_vectors))
    target = 2 ** round(math.log2(4 * math.sqrt(n)))
    cap = 2 ** int(math.floor(math.log2(max(1, n // 39))))
    return int(max(1, min(target, cap)))


def estimated_bytes(factory: str, n_vectors: int, dim: int) -> int:
    """Rough memory an index of this factory takes for n vectors (the rule's arithmetic, not a measurement)."""
    n, per_id = int(n_vectors), _ID_MAP_BYTES
    if factory == "Flat":
        return n * (4 * dim + per_id)
    if match := re.fullmatch(r"HNSW(\d+)", factory):
        # Level 0 keeps 2*M int32 links per vector; upper levels add ~1/M of that, folded into the 8*M.
        return n * (4 * dim + 8 * int(match.group(1)) + per_id)
    if match := re.fullmatch(r"IVF(\d+),Flat", factory):
        return n * (4 * dim + per_id) + int(match.group(1)) * 4 * dim
    if match := re.fullmatch(r"IVF(\d+),PQ(\d+)", factory):
        return n * (int(match.group(2)) + per_id) + int(match.group(1)) * 4 * dim + 256 * 4 * dim
    raise InvalidInputError(f"no memory estimate for factory {factory!r}")


def choose_factory(n_vectors: int, dim: int, memory_budget: int | None = None) -> str:
    """The `--factory auto` rule, after autofaiss's (`get_optimal_index_keys_v2`), with exactness preferred:

    1. fewer than FLAT_BELOW vectors: `Flat` (exact; brute force is fast at this size and removes natively);
    2. an HNSW graph if one with M >= 8 fits the budget: `HNSW{M}`, M = min(32, what fits);
    3. below IVF_FLAT_BELOW vectors, `IVF{nlist},Flat` if full vectors fit (nlist from `ivf_lists`);
    4. else `IVF{nlist},PQ{m}` with the largest code size m (dividing dim) that fits.

    `memory_budget` is in bytes (default DEFAULT_MEMORY_BUDGET); a budget nothing fits in is an error.
    """
    n, dim = int(n_vectors), int(dim)
    if n < 0 or dim < 1:
        raise InvalidInputError(f"need a non-negative size and a positive dimension, got {n} and {dim}")
    budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else int(memory_budget)
    if budget <= 0:
        raise InvalidInputError(f"memory budget must be positive, got {budget}")
    if n < FLAT_BELOW:
        return "Flat"
    m_hnsw = int((budget / n - 4 * dim - _ID_MAP_BYTES) // 8)
    if m_hnsw >= 8:
        return f"HNSW{min(m_hnsw, 32)}"
    nlist = ivf_lists(n)
    if n < IVF_FLAT_BELOW and estimated_bytes(f"IVF{nlist},Flat", n, dim) <= budget:
        return f"IVF{nlist},Flat"
    for m in _PQ_SIZES:
        if m <= dim // 2 and dim % m == 0 and estimated_bytes(f"IVF{nlist},PQ{m}", n, dim) <= budget:
            return f"IVF{nlist},PQ{m}"
    raise InvalidInputError(
        f"no index type fits {n} {dim}-d vectors in {budget} bytes (the smallest, IVF{nlist},PQ4, needs about "
        f"{estimated_bytes(f'IVF{nlist},PQ4', n, dim)}); raise the memory budget"
    )


def auto_search_defaults(factory: str, n_vectors: int = 0) -> dict[str, int]:
    """Search parameters an `auto` index over n vectors starts with, by measurement (tools/bench_search.py on
    clustered 64-d vectors, BENCHMARKS.md "Search"): FAISS's own (nprobe 1, efSearch 16) gave recall@10 0.96 / 0.96
    at 100k; nprobe 16 gave 1.000 at 100k and 1M; efSearch 64 gave 0.983 at 100k but 0.929 at 1M, where 128 gave
    0.966."""
    if match := re.match(r"IVF(\d+)", factory):
        return {"nprobe": min(int(match.group(1)), 16)}
    if factory.startswith("HNSW"):
        return {"ef_search": 128 if n_vectors >= HNSW_EF_LARGE_FROM else 64}
    return {}
