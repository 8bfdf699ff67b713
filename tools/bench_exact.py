"""Exact search kernels against FAISS Flat with its own settings, per collection size, batch size and thread count.

Kernels (all exact inner product over the same unit vectors, k = 10):
  faiss-default  IndexFlatIP, FAISS's own BLAS settings (BLAS only from queries x dim >= 128000)
  faiss-blas     IndexFlatIP, BLAS forced (distance_compute_blas_threshold 0) in database blocks of 4096
  torch          siamesedb.torch_search.TorchExactSearch on the CPU (chunked matmul + top-k)
  index          siamesedb's VectorIndex("Flat").search, which picks its kernel (what the API runs)
Each kernel's ids are compared with faiss-default's (share of (query, rank) positions equal; float ties may swap).

Data: clustered unit vectors (tools/bench_search.py's generator). Every setting: one warm-up, then --runs timed
calls, median; kernels interleaved within each run so load drift hits all alike. Threads: faiss.omp_set_num_threads
and torch.set_num_threads both set to each value of --threads.

Run:  python tools/bench_exact.py [--sizes 10000 100000 1000000] [--queries 1 100 1000] [--threads 1 2] [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import faiss
import numpy as np
import torch

from bench_search import clustered, unit
from siamesedb.backends.faiss.index import VectorIndex
from siamesedb.backends.faiss.torch_search import TorchExactSearch

K = 10


def set_blas(threshold: int, database_bs: int) -> None:
    faiss.cvar.distance_compute_blas_threshold = threshold
    faiss.cvar.distance_compute_blas_database_bs = database_bs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--queries", type=int, nargs="+", default=[1, 100, 1000])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--min-sample-s", type=float, default=0.2, help="Repeat a fast call until a sample lasts this.")
    args = parser.parse_args()
    default = (faiss.cvar.distance_compute_blas_threshold, faiss.cvar.distance_compute_blas_database_bs)
    print(f"# exact kernels, {args.dim}-d, k={K}, {os.cpu_count()} cpus, {platform.processor() or platform.machine()}, "
          f"faiss {faiss.__version__}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}, "
          f"load average at start {os.getloadavg()[0]:.1f}")
    rng = np.random.default_rng(0)
    for n in args.sizes:
        corpus, centres = clustered(n, args.dim, max(10, n // 10), 0.7, rng)
        ids = np.arange(1, n + 1, dtype=np.int64) * 3  # ids that are not positions
        flat = faiss.IndexIDMap2(faiss.IndexFlatIP(args.dim))
        flat.add_with_ids(corpus, ids)
        exact_torch = TorchExactSearch(corpus, ids, device="cpu")
        api = VectorIndex(args.dim, "Flat")
        api.add(corpus, ids)
        for nq in args.queries:
            queries = unit(centres[rng.integers(0, len(centres), nq)] + rng.normal(size=(nq, args.dim)).astype(np.float32) * 0.1)

            def faiss_with(setting):
                def run():
                    set_blas(*setting)
                    return flat.search(queries, K)
                return run

            kernels = {
                "faiss-default": faiss_with(default),
                "faiss-blas": faiss_with((0, 4096)),
                "torch": lambda: exact_torch.search(queries, K),
                "index": lambda: api.search(queries, K),
            }
            for threads in args.threads:
                faiss.omp_set_num_threads(threads)
                torch.set_num_threads(threads)
                found = {name: fn() for name, fn in kernels.items()}  # warm-up, and the ids compared
                started = time.perf_counter()
                kernels["faiss-default"]()
                repeats = max(1, int(args.min_sample_s / max(1e-6, time.perf_counter() - started)))
                samples: dict[str, list[float]] = {name: [] for name in kernels}
                for run in range(args.runs):
                    order = list(kernels.items()) if run % 2 == 0 else list(reversed(kernels.items()))
                    for name, fn in order:
                        started = time.perf_counter()
                        for _ in range(repeats):
                            fn()
                        samples[name].append((time.perf_counter() - started) / repeats)
                set_blas(*default)
                base = statistics.median(samples["faiss-default"])
                truth = found["faiss-default"][1]
                for name in kernels:
                    seconds = statistics.median(samples[name])
                    same = float(np.mean(found[name][1] == truth))
                    print(f"n={n:<8} queries={nq:<5} threads={threads}  {name:<14} {nq / seconds:10.0f} q/s  "
                          f"{seconds * 1000:9.2f} ms  {base / seconds:5.2f}x faiss-default  ids equal {same:.4f}",
                          flush=True)
    print(f"# index kernel rule: {kernels.__name__}.exact_kernel; load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
