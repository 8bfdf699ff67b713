"""Search speed and recall on clustered 64-d vectors: siamesedb's batched search against raw FAISS on the *same*
index, recall@10 of each approximate index type against exact search, and the CPU BLAS settings of FAISS's
exhaustive search.

Data: Gaussian blobs around random unit centres, normalised (shaped like real embeddings, not uniform noise);
--queries fresh draws from the same blobs, k = 10. Each setting: one warm-up, then --runs timed runs, median;
siamesedb and raw FAISS runs are interleaved so load drift hits both alike. One printed line per setting.

Run:  python tools/bench_search.py                   # 100k vectors
      python tools/bench_search.py --million         # also 1M (HNSW / IVF builds take minutes on 2 cores)
      python tools/bench_search.py --tune-blas-only  # only the BLAS settings of exhaustive search
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import faiss
import numpy as np

from siamesedb.backends.faiss import kernels
from siamesedb.backends.faiss.factory import auto_search_defaults, choose_factory, ivf_lists
from siamesedb.backends.faiss.index import VectorIndex
from siamesedb.backends.faiss.structure import search_parameters

K = 10


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def clustered(n: int, dim: int, centres: int, spread: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) unit vectors: Gaussian blobs around `centres` unit class centres, and the (centres, dim) centres.

    Like real embeddings the classes are not spread uniformly: the centres themselves gather around centres/20
    "group" directions (alphabets, product lines), so neighbouring classes overlap and approximate search has
    to tell them apart. Members sit at cosine ~0.75 to each other, classes of one group at ~0.5.
    """
    groups = unit(rng.normal(size=(max(1, centres // 20), dim)))
    middle = unit(groups[rng.integers(0, len(groups), centres)] + rng.normal(size=(centres, dim)) / np.sqrt(dim))
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):  # in slices: bounded temporaries at 1M
        stop = min(n, start + 100_000)
        block = middle[rng.integers(0, centres, stop - start)]
        block += (spread / np.sqrt(dim)) * rng.normal(size=block.shape).astype(np.float32)
        out[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out, middle


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(np.intersect1d(a, b)) for a, b in zip(found, truth))
    return hits / truth.size


def timed(fn, runs: int) -> float:
    fn()
    seconds = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def interleaved(first, second, runs: int, min_sample_s: float = 0.3) -> tuple[float, float, float, float]:
    """(wall first, wall second, CPU first, CPU second): median seconds per call, sampled alternately (the order
    flips every run) after one warm-up each. A sample repeats a fast call until it lasts about `min_sample_s`.
    CPU time (this process's) is what the overhead ratio uses: on a machine shared with other jobs, wall time
    mostly measures the scheduler; with one FAISS thread, CPU time is the work done."""
    started = time.perf_counter()
    first(), second()
    repeats = max(1, int(min_sample_s / max(1e-6, (time.perf_counter() - started) / 2)))
    wall: dict[int, list[float]] = {0: [], 1: []}
    cpu: dict[int, list[float]] = {0: [], 1: []}
    for run in range(runs):
        order = ((0, first), (1, second)) if run % 2 == 0 else ((1, second), (0, first))
        for which, fn in order:
            started, started_cpu = time.perf_counter(), time.process_time()
            for _ in range(repeats):
                fn()
            wall[which].append((time.perf_counter() - started) / repeats)
            cpu[which].append((time.process_time() - started_cpu) / repeats)
    med = statistics.median
    return med(wall[0]), med(wall[1]), med(cpu[0]), med(cpu[1])


def set_blas(threshold: int, database_bs: int) -> None:
    faiss.cvar.distance_compute_blas_threshold = threshold
    faiss.cvar.distance_compute_blas_database_bs = database_bs


def tune_blas(corpus: np.ndarray, queries: np.ndarray, runs: int) -> None:
    """Exhaustive search with FAISS's default BLAS settings vs BLAS forced at several database block sizes, for
    1,000 / 100 / 10 queries at once, raw FAISS (IndexFlatIP), FAISS's own thread count."""
    flat = faiss.IndexFlatIP(corpus.shape[1])
    flat.add(corpus)
    default = (faiss.cvar.distance_compute_blas_threshold, faiss.cvar.distance_compute_blas_database_bs)
    threads = faiss.omp_get_max_threads()
    settings = [("faiss default", default)] + [(f"blas database_bs={bs}", (0, bs)) for bs in (1024, 4096, 16384, 65536)]
    for nq in (len(queries), 100, 10):
        base = None
        for name, (threshold, database_bs) in settings:
            for t in sorted({1, threads}):
                faiss.omp_set_num_threads(t)
                set_blas(threshold, database_bs)
                seconds = timed(lambda: flat.search(queries[:nq], K), runs)
                base = base or seconds
                print(f"blas  n={len(corpus)} queries={nq:<5} {name:<24} threads={t}  median {seconds * 1000:8.1f} ms"
                      f"  {nq / seconds:9.0f} q/s  speed-up vs default {base / seconds:5.2f}x", flush=True)
    faiss.omp_set_num_threads(threads)
    set_blas(*default)


def db_overhead(corpus: np.ndarray, queries: np.ndarray, factories: list[str], runs: int) -> None:
    """The front door's search against raw FAISS on the SiameseDB's own FAISS object: the call itself (FAISS plus
    the result wrapper; labels and paths are read lazily), and the call with every Hit built (one SQLite lookup
    for all hits' labels and paths, then the Hit objects)."""
    import tempfile

    from siamesedb.db import SiameseDB

    labels = [f"class{i % 1000:04d}" for i in range(len(corpus))]
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        db = SiameseDB.create(f"{folder}/db", encoder="default", factory="Flat", device="cpu")
        for first in range(0, len(corpus), 100_000):
            db.add_vectors(corpus[first : first + 100_000], labels[first : first + 100_000])
        print(f"# SiameseDB of {len(db)} vectors filled in {time.perf_counter() - started:.1f} s", flush=True)
        for factory in factories:
            if factory != db.index.factory:
                db.reindex(factory)
            raw = db.index._index
            t_ours, t_raw, cpu_ours, cpu_raw = interleaved(
                lambda: db.search_vectors(queries, K), lambda: raw.search(queries, K), runs
            )
            # The same search with every Hit built (labels and paths read from SQLite): what iterating costs.
            t_all, t_raw2, cpu_all, cpu_raw2 = interleaved(
                lambda: [list(hits) for hits in db.search_vectors(queries, K)], lambda: raw.search(queries, K), runs
            )
            print(f"db     n={len(db)} {factory:<16} defaults {db.index.search_defaults}  SiameseDB.search_vectors "
                  f"{len(queries) / t_ours:9.0f} q/s  raw FAISS {len(queries) / t_raw:9.0f} q/s  "
                  f"overhead CPU {cpu_ours / cpu_raw:5.3f}x wall {t_ours / t_raw:5.3f}x  |  every Hit read "
                  f"{len(queries) / t_all:9.0f} q/s  overhead CPU {cpu_all / cpu_raw2:5.3f}x wall {t_all / t_raw2:5.3f}x",
                  flush=True)
        db.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[100_000], help="Collection sizes.")
    parser.add_argument("--million", action="store_true", help="Add a 1,000,000-vector run.")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tune-blas-only", action="store_true")
    parser.add_argument("--no-blas", action="store_true", help="Skip the BLAS settings table.")
    parser.add_argument("--types", nargs="+", default=None, help="Factories (default: auto's and the usual ones).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="FAISS (OpenMP) threads (default: FAISS's own).")
    parser.add_argument("--db", nargs="*", default=None, metavar="FACTORY",
                        help="Also time SiameseDB.search_vectors (hits with labels and paths from SQLite) against raw "
                             "FAISS, on an index of these types (default encoder, vectors added with add_vectors).")
    args = parser.parse_args()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    sizes = args.n + ([1_000_000] if args.million else [])
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, faiss {faiss.__version__}, "
          f"{faiss.omp_get_max_threads()} FAISS threads, load average {os.getloadavg()[0]:.1f}, "
          f"index BLAS settings threshold={kernels.CPU_BLAS_THRESHOLD} database_bs={kernels.CPU_BLAS_DATABASE_BS}")
    for n in sizes:
        rng = np.random.default_rng(args.seed)
        corpus, _ = clustered(n, args.dim, centres=max(10, n // 100), spread=0.6, rng=rng)
        # Queries: fresh draws from the same blobs (the same seed regenerates the same centres first).
        queries, _ = clustered(args.queries, args.dim, centres=max(10, n // 100), spread=0.6,
                               rng=np.random.default_rng(args.seed))
        if not args.no_blas or args.tune_blas_only:
            tune_blas(corpus, queries, args.runs)
        if args.tune_blas_only:
            continue
        ids = np.arange(n, dtype=np.int64)
        started = time.perf_counter()
        exact = VectorIndex.from_vectors(corpus, ids, factory="Flat")
        _, truth = exact.search(queries, K)
        nlist = ivf_lists(n)
        auto = choose_factory(n, args.dim)
        types = args.types or ["Flat", "HNSW32", f"IVF{nlist},Flat", f"IVF{nlist},PQ16", f"IVF{nlist},PQ32"]
        grids = {
            "Flat": [{}],
            "HNSW": [{"ef_search": e} for e in (16, 32, 64, 128, 256)],
            "IVF": [{"nprobe": p} for p in (1, 8, 16, 32, 64, 128)],
        }
        print(f"# n={n}: auto chooses {auto} with {auto_search_defaults(auto, n)}; exact ground truth in "
              f"{time.perf_counter() - started:.1f} s", flush=True)
        for factory in types:
            started = time.perf_counter()
            index = exact if factory == "Flat" else VectorIndex.from_vectors(corpus, ids, factory=factory)
            built = time.perf_counter() - started
            raw = index._index  # the very FAISS object VectorIndex searches
            kind = "HNSW" if factory.startswith("HNSW") else "IVF" if factory.startswith("IVF") else "Flat"
            for params in grids[kind]:
                faiss_params, keep = search_parameters(index._parts(), params.get("nprobe"), params.get("ef_search"), None)

                def ours():
                    return index.search(queries, K, **params)

                def theirs():
                    return raw.search(queries, K, params=faiss_params)

                t_ours, t_raw, cpu_ours, cpu_raw = interleaved(ours, theirs, args.runs)
                _, found = ours()
                _, found_raw = theirs()
                assert np.array_equal(found, found_raw), "siamesedb and raw FAISS disagree"
                label = ", ".join(f"{key}={value}" for key, value in params.items()) or "exact"
                print(f"search n={n} {factory:<16} {label:<14} recall@{K} {recall_at_k(found, truth):.4f}  "
                      f"siamesedb {len(queries) / t_ours:9.0f} q/s  raw FAISS {len(queries) / t_raw:9.0f} q/s  "
                      f"overhead CPU {cpu_ours / cpu_raw:5.3f}x wall {t_ours / t_raw:5.3f}x  (build {built:.1f} s)",
                      flush=True)
                del keep
            if factory != "Flat":
                del index
        if args.db is not None:
            db_overhead(corpus, queries, args.db or ["Flat"], args.runs)
        if n <= 200_000:
            from siamesedb.backends.faiss.torch_search import TorchExactSearch

            torch_exact = TorchExactSearch(corpus, ids, device="cpu")
            t_torch, t_flat, _, _ = interleaved(lambda: torch_exact.search(queries, K),
                                                lambda: exact.search(queries, K), args.runs)
            print(f"torch n={n} exact torch search on CPU {len(queries) / t_torch:9.0f} q/s vs siamesedb Flat "
                  f"{len(queries) / t_flat:9.0f} q/s (the GPU path's code, run on the CPU for reference)", flush=True)


if __name__ == "__main__":
    main()
