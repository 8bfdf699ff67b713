"""Milvus Lite (siamesedb.backends.milvus) against the FAISS backend's index (siamesedb's VectorIndex) and raw numpy
brute force, on the same clustered vectors: inserts/s, queries/s at batch 1 and batch 100, recall@10 against exact
search — for each index type pair (--index-types): Milvus FLAT vs FAISS "Flat"; Milvus IVF_FLAT (nlist 1024) vs
FAISS "IVF1024,Flat", both nprobe 16; Milvus HNSW (M 32, efConstruction 200) vs FAISS "HNSW32" (what `auto` picks at
100k), both ef_search 64 (the FAISS backend's auto defaults, which MilvusBackend starts with too).

Data: tools/bench_search.py's clustered unit vectors (Gaussian blobs, classes gathered in groups), 100,000 x 64 and
1,000 fresh queries from the same blobs by default; k = 10. Truth: float64 numpy brute force.
Timing: one warm-up per engine, then --runs timed runs in rotating order (load drift hits all alike), median.
Batch 1 times the first --single queries one at a time; batch 100 times all queries in batches of 100.

--server-uri URI adds a Milvus server (standalone or cluster) beside Milvus Lite: the same collection per index type
(dropped at the end), and --writers 1,2,4: single-item adds/s with that many concurrent writer processes on one
server collection (each add reserves its ids through the collection's log: backends/milvus/meta.py), median of
--runs.

Run:  python tools/bench_milvus.py                 # 100k x 64, FLAT + IVF_FLAT + HNSW
      python tools/bench_milvus.py --n 20000 --runs 3 --index-types FLAT
      python tools/bench_milvus.py --index-types FLAT --server-uri http://127.0.0.1:19530 --writers 1,2,4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
from bench_search import clustered, recall_at_k  # the same generator as tools/bench_search.py

from siamesedb.backends.milvus import MilvusBackend
from siamesedb.backends.faiss.index import VectorIndex

K = 10
NLIST = 1024
# Milvus index type -> (its build params, the FAISS factory it is compared with, the search knob both use)
PAIRS = {
    "FLAT": ({}, "Flat", {}),
    "IVF_FLAT": ({"nlist": NLIST}, f"IVF{NLIST},Flat", {"nprobe": 16}),
    "HNSW": ({"M": 32, "efConstruction": 200}, "HNSW32", {"ef_search": 64}),
}


def exact_top_k(corpus: np.ndarray, queries: np.ndarray, k: int = K) -> np.ndarray:
    """Row ids (nq, k) of the k largest inner products, in float64 (the truth recall is measured against)."""
    scores = queries.astype(np.float64) @ corpus.astype(np.float64).T
    top = np.argpartition(-scores, k, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, top, 1), axis=1)
    return np.take_along_axis(top, order, 1)


def numpy_search(corpus: np.ndarray):
    """Raw numpy float32 brute force: (queries (b, D)) -> ids (b, k)."""

    def search(queries: np.ndarray) -> np.ndarray:
        scores = queries @ corpus.T  # (b, n) float32
        top = np.argpartition(-scores, K, axis=1)[:, :K]
        order = np.argsort(-np.take_along_axis(scores, top, 1), axis=1)
        return np.take_along_axis(top, order, 1)

    return search


def rates(engines: dict, queries: np.ndarray, single: int, runs: int) -> dict[str, tuple[float, float]]:
    """{engine: (q/s at batch 1, q/s at batch 100)}: medians of `runs` rotating-order runs after one warm-up."""
    batch1 = {name: [] for name in engines}
    batch100 = {name: [] for name in engines}
    names = list(engines)
    for name in names:  # warm-up
        engines[name](queries[:1]), engines[name](queries[:100])
    for run in range(runs):
        for name in names[run % len(names) :] + names[: run % len(names)]:
            search = engines[name]
            started = time.perf_counter()
            for i in range(single):
                search(queries[i : i + 1])
            batch1[name].append(single / (time.perf_counter() - started))
            started = time.perf_counter()
            for start in range(0, len(queries), 100):
                search(queries[start : start + 100])
            batch100[name].append(len(queries) / (time.perf_counter() - started))
    return {name: (statistics.median(batch1[name]), statistics.median(batch100[name])) for name in names}


WRITER = """
import json, sys, time
import numpy as np
from siamesedb.backends.milvus import MilvusBackend
uri, name, dim, adds, start, w = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), sys.argv[6]
backend = MilvusBackend(uri, name, dim)
vectors = np.random.default_rng(int(w)).normal(size=(adds, dim)).astype(np.float32)
while time.time() < start:
    time.sleep(0.005)
began = time.perf_counter()
for i in range(adds):
    backend.add(None, ["w" + w], [f"{w}/{i}"], [f"{w}/{i}"], vectors[i : i + 1])
print(json.dumps({"seconds": time.perf_counter() - began, "ended": time.time()}))
"""


def writer_rate(uri: str, dim: int, writers: int, adds: int) -> float:
    """Single-item adds/s of `writers` concurrent processes on one fresh server collection (all start together;
    from the common start to the last one's end)."""
    name = f"bench_writers_{uuid.uuid4().hex[:8]}"
    MilvusBackend(uri, name, dim).close()
    start = time.time() + 3 + writers  # every process connected before the first add
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, uri, name, str(dim), str(adds), str(start), str(w)],
                              stdout=subprocess.PIPE, text=True) for w in range(writers)]
    ended = max(json.loads(proc.communicate()[0])["ended"] for proc in procs)
    backend = MilvusBackend(uri, name, dim, must_exist=True)
    try:
        assert backend.count() == writers * adds and len(set(backend.vectors()[0].tolist())) == writers * adds
    finally:
        backend.drop()
    return writers * adds / (ended - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--single", type=int, default=200, help="Queries timed one at a time per run.")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--insert-batch", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--index-types", default="FLAT,IVF_FLAT,HNSW", help=f"Comma-separated, of {', '.join(PAIRS)}.")
    parser.add_argument("--server-uri", default=None, help="Also a Milvus server: search q/s, and --writers.")
    parser.add_argument("--writers", default="", help="Comma-separated writer counts for the adds/s (needs "
                        "--server-uri), e.g. 1,2,4")
    parser.add_argument("--writer-adds", type=int, default=100, help="Single-item adds per writer per run.")
    args = parser.parse_args()
    kinds = [kind.strip() for kind in args.index_types.split(",")]
    if any(kind not in PAIRS for kind in kinds):
        parser.error(f"--index-types: choose from {', '.join(PAIRS)}")

    import faiss
    import milvus_lite
    import pymilvus

    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs; pymilvus {pymilvus.__version__}, milvus-lite {milvus_lite.__version__}, "
          f"faiss {faiss.__version__}, numpy {np.__version__}")
    rng = np.random.default_rng(args.seed)
    centres = max(10, args.n // 100)
    corpus, _ = clustered(args.n, args.dim, centres=centres, spread=0.6, rng=rng)
    rng = np.random.default_rng(args.seed)  # the same seed regenerates the same centres first
    queries, _ = clustered(args.queries, args.dim, centres=centres, spread=0.6, rng=rng)
    queries = queries[np.random.default_rng(args.seed + 1).permutation(len(queries))]
    print(f"data: {args.n:,} x {args.dim} clustered unit vectors ({centres} classes), {len(queries)} queries, k={K}")
    truth = exact_top_k(corpus, queries)
    ids = np.arange(args.n, dtype=np.int64)
    labels = [f"class{i % centres}" for i in range(args.n)]
    paths = [f"/data/{i}.png" for i in range(args.n)]
    hashes = ["0" * 64] * args.n

    engines: dict = {}
    built: dict[str, str] = {}
    backends: list[MilvusBackend] = []
    if args.server_uri and args.writers:
        for writers in [int(w) for w in args.writers.split(",")]:
            runs = [writer_rate(args.server_uri, args.dim, writers, args.writer_adds) for _ in range(args.runs)]
            print(f"server writers {writers}: {statistics.median(runs):,.1f} adds/s (single-item adds, "
                  f"{writers} x {args.writer_adds}, median of {args.runs}: "
                  + ", ".join(f"{r:.1f}" for r in runs) + ")", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_milvus_") as folder:
        for kind in kinds:
            if args.server_uri:
                build_params, _, knobs = PAIRS[kind]
                server = MilvusBackend(args.server_uri, f"bench_{kind.lower()}_{uuid.uuid4().hex[:8]}", args.dim,
                                       metric="cosine", index_type=kind, build_params=build_params,
                                       search_defaults=knobs)
                backends.append(server)
                started = time.perf_counter()
                for start in range(0, args.n, args.insert_batch):
                    stop = start + args.insert_batch
                    server.add(ids[start:stop], labels[start:stop], paths[start:stop], hashes[start:stop],
                               corpus[start:stop])
                server_insert = args.n / (time.perf_counter() - started)
                server.search(queries[:1], K)
                engines[f"milvus-server {kind}"] = (lambda m: lambda q: m.search(q, K)[1])(server)
                built[f"milvus-server {kind}"] = f"{server_insert:,.0f}"
            build_params, factory, knobs = PAIRS[kind]
            milvus = MilvusBackend(Path(folder) / "bench.db", kind.lower(), args.dim, metric="cosine",
                                   index_type=kind, build_params=build_params, search_defaults=knobs)
            backends.append(milvus)
            started = time.perf_counter()
            for start in range(0, args.n, args.insert_batch):
                stop = start + args.insert_batch
                milvus.add(ids[start:stop], labels[start:stop], paths[start:stop], hashes[start:stop],
                           corpus[start:stop])
            milvus_insert = args.n / (time.perf_counter() - started)
            started = time.perf_counter()
            milvus.search(queries[:1], K)  # the first search after writes flushes Lite (and builds its index)
            flush_s = time.perf_counter() - started
            assert milvus.count() == args.n and milvus.search_defaults == knobs

            index = VectorIndex(args.dim, factory)
            started = time.perf_counter()
            if not index.is_trained:
                index.train(corpus)
            for start in range(0, args.n, args.insert_batch):
                index.add(corpus[start : start + args.insert_batch], ids[start : start + args.insert_batch])
            if knobs:
                index.set_search_defaults(**knobs)
            faiss_insert = args.n / (time.perf_counter() - started)
            print(f"{kind}: inserts/s (batches of {args.insert_batch:,}): Milvus Lite {milvus_insert:,.0f} (then "
                  f"{flush_s:.1f} s for the flush + index before the first search), FAISS {factory} "
                  f"{faiss_insert:,.0f} incl. training ({faiss_insert / milvus_insert:.0f}x)", flush=True)
            knob = " ".join(f"{name} {value}" for name, value in knobs.items())
            engines[f"milvus-lite {kind}"] = (lambda m: lambda q: m.search(q, K)[1])(milvus)
            engines[f"faiss {factory}"] = (lambda i: lambda q: i.search(q, K)[1])(index)
            built[f"milvus-lite {kind}"] = f"{milvus_insert:,.0f} + {flush_s:.1f} s {knob}".rstrip()
            built[f"faiss {factory}"] = f"{faiss_insert:,.0f} {knob}".rstrip()
        engines["numpy"] = numpy_search(corpus)
        built["numpy"] = "-"

        recalls = {name: recall_at_k(search(queries), truth) for name, search in engines.items()}
        measured = rates(engines, queries, args.single, args.runs)
        print(f"{'engine':<24} {'inserts/s':>26} {'q/s batch 1':>12} {'q/s batch 100':>14} {'recall@10':>10}")
        for name, (one, hundred) in measured.items():
            print(f"{name:<24} {built[name]:>26} {one:>12,.0f} {hundred:>14,.0f} {recalls[name]:>10.4f}")
        for milvus in backends:
            milvus.drop() if not milvus.lite else milvus.close()

if __name__ == "__main__":
    main()
