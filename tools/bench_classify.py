"""Prototype classification through the API over many classes, against raw FAISS top-1 over the same prototypes.

Data: tools/bench_scale.py's clustered 64-d vectors (1M items in 100k classes by default) brought in with
`add_vectors` into a Flat index with the default encoder; queries are fresh draws around random class centres.
The class table (every class's prototype, cached per store version) is built once before timing, as a serving
process holds it.

Timed, interleaved (the order rotates each run) after a warm-up, median of --runs:
- raw FAISS: `IndexFlatIP` over the class table's prototypes, k = 1, BLAS forced (threshold 0, database blocks of
  4096), the fastest raw exact settings tools/bench_exact.py measured for a batch: the baseline;
- `db.classify_vectors(queries, method="prototype")`, every prediction's label read (the default: full rankings,
  built lazily);
- the same with `top=5` (the FAISS search over the prototypes the CLI uses when printing).
Then, untimed against the others: reading one full ranking of every class (`list(p.ranking)`) and a top-5 prefix
(`p.ranking[:5]`) per prediction, and the eager full ranking the API built before rankings became lazy (one
(queries, classes) score matrix, a stable argsort and a list of (label, score) tuples per query; on --before
queries only: at 100k classes it holds 100k Python tuples per query).

Run:  python tools/bench_classify.py [--items 1000000] [--classes 100000] [--queries 1000] [--runs 5]
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


def interleaved(fns: list, runs: int) -> list[float]:
    for fn in fns:
        fn()
    samples: list[list[float]] = [[] for _ in fns]
    for run in range(runs):
        for step in range(len(fns)):
            which = (run + step) % len(fns)
            started = time.perf_counter()
            fns[which]()
            samples[which].append(time.perf_counter() - started)
    return [statistics.median(s) for s in samples]


def eager_full_ranking(queries: np.ndarray, prototypes: np.ndarray, names: list[str]) -> list[list[tuple[str, float]]]:
    """query.rank_by_prototype before it became lazy (cosine)."""
    scores = queries @ prototypes.T
    order = np.argsort(-scores, axis=1, kind="stable")
    return [[(names[j], float(row[j])) for j in idx] for row, idx in zip(scores, order)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--classes", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--before", type=int, default=20, help="Queries for the eager full ranking (0: skip).")
    parser.add_argument("--sigma", type=float, default=0.35)
    args = parser.parse_args()
    print(f"# {args.items:,} items, {args.classes:,} classes, 64-d, Flat, {args.queries} queries, faiss threads "
          f"{faiss.omp_get_max_threads()}, {os.cpu_count()} cpus, {platform.machine()}, {time.strftime('%Y-%m-%d')}, "
          f"load average at start {os.getloadavg()[0]:.1f}", flush=True)
    centres, codes, vectors = make_data(args.items, args.classes, args.sigma, seed=0)
    queries, truth = queries_for(centres, args.queries, args.sigma, seed=0)
    queries = np.ascontiguousarray(queries / np.linalg.norm(queries, axis=1, keepdims=True), dtype=np.float32)
    names = [f"class{c:06d}" for c in range(args.classes)]
    want = np.asarray([names[c] for c in truth], dtype=object)
    scratch = Path(tempfile.mkdtemp(prefix="bench-classify-"))
    try:
        db = SiameseDB.create(scratch / "index", encoder=Encoder.load("default"), factory="Flat", device="cpu")
        started = time.perf_counter()
        db.add_vectors(vectors, [names[c] for c in codes])
        print(f"add_vectors {args.items:,} rows: {time.perf_counter() - started:.1f} s", flush=True)
        del vectors, codes
        started = time.perf_counter()
        db.classify_vectors(queries[:2], method="prototype")  # builds and caches the class table
        print(f"class table + first call: {time.perf_counter() - started:.2f} s", flush=True)
        classes, prototypes = db._prototypes()  # the cached table's arrays
        raw = faiss.IndexFlatIP(prototypes.shape[1])
        raw.add(np.ascontiguousarray(prototypes, dtype=np.float32))
        out: dict[str, list] = {}

        def raw_top1() -> None:
            faiss.cvar.distance_compute_blas_threshold, faiss.cvar.distance_compute_blas_database_bs = 0, 4096
            out["raw"] = raw.search(queries, 1)[1][:, 0]

        def api_default() -> None:
            predictions = db.classify_vectors(queries, method="prototype")
            out["api"] = [p.label for p in predictions]
            out["predictions"] = predictions

        def api_top5() -> None:
            out["top5"] = [p.label for p in db.classify_vectors(queries, method="prototype", top=5)]

        t_raw, t_api, t_top = interleaved([raw_top1, api_default, api_top5], args.runs)
        raw_labels = np.asarray([classes[i] for i in out["raw"]], dtype=object)
        nq = len(queries)
        print(f"raw FAISS top-1 over {len(classes):,} prototypes: {nq / t_raw:,.0f} q/s ({t_raw * 1e3:.1f} ms), "
              f"accuracy {np.mean(raw_labels == want):.3f}")
        print(f"classify_vectors(prototype), labels read: {nq / t_api:,.0f} q/s ({t_api * 1e3:.1f} ms), "
              f"{t_api / t_raw:.3f}x raw time, accuracy {np.mean(np.asarray(out['api'], dtype=object) == want):.3f}, "
              f"same labels as raw {np.mean(np.asarray(out['api'], dtype=object) == raw_labels):.4f}")
        print(f"classify_vectors(prototype, top=5): {nq / t_top:,.0f} q/s ({t_top * 1e3:.1f} ms), "
              f"{t_top / t_raw:.3f}x raw time")
        predictions = out["predictions"][:20]
        started = time.perf_counter()
        prefixes = [p.ranking[:5] for p in predictions]
        t_prefix = (time.perf_counter() - started) / len(predictions)
        started = time.perf_counter()
        full = [list(p.ranking) for p in predictions]
        t_full = (time.perf_counter() - started) / len(predictions)
        assert all(f[:5] == pre and f[0] == (p.label, p.score) for f, pre, p in zip(full, prefixes, predictions))
        print(f"reading a ranking afterwards: top-5 prefix {t_prefix * 1e3:.2f} ms, all {len(classes):,} classes "
              f"{t_full * 1e3:.1f} ms per prediction")
        if args.before:
            before = queries[: args.before]
            eager_full_ranking(before[:2], prototypes, classes)
            started = time.perf_counter()
            eager = eager_full_ranking(before, prototypes, classes)
            t_before = (time.perf_counter() - started) / len(before)
            same = [e[0][0] for e in eager] == out["api"][: args.before]
            print(f"before (eager full ranking, {args.before} queries): {1 / t_before:,.0f} q/s "
                  f"({t_before * 1e3:.1f} ms per query), same labels {same}")
        db.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
