"""Which exact CPU kernel a FAISS search runs (FAISS's scan or BLAS), set per search from the batch size, and
FAISS's thread count for one call.

Chosen by measurement (tools/bench_exact.py, BENCHMARKS.md "Exact search kernels"; 2-core shared CPU, 64-d, 10k /
100k / 1M vectors, 1 / 100 / 1,000 queries, FAISS at 1 and 2 threads):
- from SMALL_BATCH queries on: FAISS's exhaustive search with BLAS forced (distance_compute_blas_threshold 0; FAISS's
  own threshold of queries x dim >= 128000 means no BLAS below 2,000 queries at 64-d) in database blocks of 4096, at
  any thread count: 1.4-3.9x FAISS's own settings, and faster than the torch matmul + top-k everywhere;
- below SMALL_BATCH: FAISS's own SIMD scan (no BLAS), on ONE thread for a Flat index: a single query searched 1M
  vectors in 10.8 ms on one thread, 20.3 ms on two (BLAS forced: 40 ms), and beat torch (13.9 ms) too.
The BLAS settings are process-wide FAISS variables, set before every search (cheap): the choice depends only on
the batch size, so a query gets the same floats from any thread. (Two threads searching at once with batches on
either side of SMALL_BATCH may briefly run one with the other's setting: only speed changes, never the ids.)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import faiss

SMALL_BATCH = 20  # FAISS's historical BLAS threshold; measured: 1 query (scan wins) and 100 (BLAS wins)
CPU_BLAS_THRESHOLD: int | None = 0  # None: leave FAISS's own settings alone
CPU_BLAS_DATABASE_BS: int | None = 4096
FAISS_BLAS_DEFAULT = (faiss.cvar.distance_compute_blas_threshold, faiss.cvar.distance_compute_blas_database_bs)


def exact_kernel(queries: int) -> str:
    """The kernel an exhaustive search of this many queries runs: "faiss-blas" or "faiss-scan" (FAISS's own scan,
    one thread for a Flat index)."""
    return "faiss-scan" if queries < SMALL_BATCH or CPU_BLAS_THRESHOLD is None else "faiss-blas"


def tune_cpu_blas(queries: int) -> str:
    """Set FAISS's BLAS variables for an exhaustive search of `queries` queries; returns `exact_kernel(queries)`."""
    kernel = exact_kernel(queries)
    if kernel == "faiss-blas":
        threshold, block = CPU_BLAS_THRESHOLD, CPU_BLAS_DATABASE_BS or FAISS_BLAS_DEFAULT[1]
    else:
        threshold, block = FAISS_BLAS_DEFAULT
    if faiss.cvar.distance_compute_blas_threshold != threshold:
        faiss.cvar.distance_compute_blas_threshold = threshold
    if faiss.cvar.distance_compute_blas_database_bs != block:
        faiss.cvar.distance_compute_blas_database_bs = block
    return kernel


@contextmanager
def faiss_threads(threads: int | None) -> Iterator[None]:
    """Run FAISS with `threads` OpenMP threads in this thread only (OpenMP's count is per calling thread), then
    restore; None changes nothing."""
    before = faiss.omp_get_max_threads()
    if threads is None or threads == before:
        yield
        return
    faiss.omp_set_num_threads(threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)
