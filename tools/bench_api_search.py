"""API search at raw speed: `SiameseDB.search_vectors` with every hit's label read, against raw FAISS on the same
vectors in the same process.

Data: tools/bench_scale.py's clustered 64-d vectors (1M items in 100k classes by default) brought in with
`add_vectors` into a Flat index with the default encoder. Raw FAISS: an IndexFlatIP over the vectors the store holds,
searched with BLAS forced (distance_compute_blas_threshold 0, database blocks of 4096) for a batch, FAISS's own
settings on one thread for a single query: the fastest raw settings measured by tools/bench_exact.py. API: every
hit's label and path read (`[hit.label for row in results for hit in row]`) from the in-memory item table (built
here directly, as enough lookups at one store version would; its build time is printed). Interleaved runs (the
order flips each run) after a warm-up, median; k = 10.

Run:  python tools/bench_api_search.py [--items 1000000] [--classes 100000] [--queries 1000] [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from bench_scale import make_data, queries_for
from siamesedb.db import SiameseDB
from siamesedb.encoder import Encoder
from siamesedb.item_table import ItemTable

K = 10


def interleaved(first, second, runs: int) -> tuple[float, float]:
    first(), second()
    samples: tuple[list[float], list[float]] = ([], [])
    for run in range(runs):
        order = ((0, first), (1, second)) if run % 2 == 0 else ((1, second), (0, first))
        for which, fn in order:
            started = time.perf_counter()
            fn()
            samples[which].append(time.perf_counter() - started)
    return statistics.median(samples[0]), statistics.median(samples[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--classes", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--singles", type=int, default=50, help="Single-query calls per timed sample.")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--sigma", type=float, default=0.35)
    args = parser.parse_args()
    print(f"# {args.items:,} items, {args.classes:,} classes, 64-d, Flat, k={K}, {args.queries} queries, faiss threads "
          f"{faiss.omp_get_max_threads()}, {os.cpu_count()} cpus, {platform.machine()}, {time.strftime('%Y-%m-%d')}, "
          f"load average at start {os.getloadavg()[0]:.1f}", flush=True)
    centres, codes, vectors = make_data(args.items, args.classes, args.sigma, seed=0)
    queries, _ = queries_for(centres, args.queries, args.sigma, seed=0)
    queries = np.ascontiguousarray(queries / np.linalg.norm(queries, axis=1, keepdims=True), dtype=np.float32)
    names = [f"class{c:06d}" for c in range(args.classes)]
    scratch = Path(tempfile.mkdtemp(prefix="bench-api-search-"))
    try:
        db = SiameseDB.create(scratch / "index", encoder=Encoder.load("default"), factory="Flat", device="cpu")
        started = time.perf_counter()
        db.add_vectors(vectors, [names[c] for c in codes])
        print(f"add_vectors {args.items:,} rows: {time.perf_counter() - started:.1f} s", flush=True)
        del vectors, codes
        ids, stored = db.store.vectors()
        raw = faiss.IndexFlatIP(64)
        raw.add(stored)  # the vectors exactly as the store (and the API's index) hold them
        del stored
        blas = (faiss.cvar.distance_compute_blas_threshold, faiss.cvar.distance_compute_blas_database_bs)

        def raw_batch() -> None:
            faiss.cvar.distance_compute_blas_threshold, faiss.cvar.distance_compute_blas_database_bs = 0, 4096
            raw.search(queries, K)

        def raw_single() -> None:
            faiss.cvar.distance_compute_blas_threshold, faiss.cvar.distance_compute_blas_database_bs = blas
            threads = faiss.omp_get_max_threads()
            faiss.omp_set_num_threads(1)
            for q in queries[: args.singles]:
                raw.search(q[None], K)
            faiss.omp_set_num_threads(threads)

        def api_batch() -> None:
            results = db.search_vectors(queries, k=K)
            labels = [hit.label for row in results for hit in row]
            assert len(labels) == args.queries * K

        def api_single() -> None:
            for q in queries[: args.singles]:
                labels = [hit.label for row in db.search_vectors(q[None], k=K) for hit in row]
                assert len(labels) == K

        api_batch()  # labels from SQLite: the first lookup at this store version
        started = time.perf_counter()
        with db.store.snapshot():
            db._item_table = ItemTable.from_store(db.store)  # what enough lookups at one version trigger
        print(f"item table build: {time.perf_counter() - started:.2f} s (cached until the next write)", flush=True)
        raw_s, api_s = interleaved(raw_batch, api_batch, args.runs)
        print(f"batch of {args.queries}: raw FAISS {args.queries / raw_s:8.0f} q/s ({raw_s * 1000:8.1f} ms)  "
              f"API with labels {args.queries / api_s:8.0f} q/s ({api_s * 1000:8.1f} ms)  = {api_s / raw_s:.3f}x raw",
              flush=True)
        raw_s, api_s = interleaved(raw_single, api_single, args.runs)
        print(f"single queries:  raw FAISS {args.singles / raw_s:8.0f} q/s ({raw_s / args.singles * 1000:8.2f} ms)  "
              f"API with labels {args.singles / api_s:8.0f} q/s ({api_s / args.singles * 1000:8.2f} ms)  = "
              f"{api_s / raw_s:.3f}x raw", flush=True)
        db.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"# load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
