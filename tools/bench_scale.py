"""Scale: 1,000,000 items in 100,000 classes of clustered 64-d vectors, brought in with `add_vectors`.

Measures build-from-vectors time, open time, peak RSS against the raw vector bytes, and classification throughput
(prototype and kNN) with top-1 accuracy as a sanity check. Each phase runs in its own fresh process, so its peak RSS
(getrusage ru_maxrss) is its own; the interpreter + model baseline (import siamesedb, load the default encoder) is
measured the same way in the same run. One printed line per setting; timed settings are the median of --runs after
one warm-up call.

Data: class centres ~ N(0, I) in 64-d; each item = its centre + N(0, sigma^2 I) (sigma 0.35 by default), generated in
chunks straight into one preallocated (N, 64) float32 array, the raw vectors the budget is stated against. Queries
are fresh draws around the centres of randomly chosen classes.

Run:  python tools/bench_scale.py [--items 1000000] [--classes 100000] [--queries 1000] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DIM = 64


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def step_peak_mb() -> float:
    """Peak RSS since the last `reset_step_peak` (Linux VmHWM)."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM")) / 1024


def reset_step_peak() -> None:
    with open("/proc/self/clear_refs", "w") as fh:  # "5" resets the peak RSS to the current RSS (Linux >= 4.0)
        fh.write("5")


def make_data(items: int, classes: int, sigma: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(centres (C, 64), codes (N,) int32, vectors (N, 64) float32), the vectors filled 64k rows at a time."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, DIM), dtype=np.float32)
    codes = (np.arange(items) % classes).astype(np.int32)  # every class gets items // classes (+1) members
    rng.shuffle(codes)
    vectors = np.empty((items, DIM), dtype=np.float32)
    for start in range(0, items, 65536):
        stop = min(items, start + 65536)
        vectors[start:stop] = centres[codes[start:stop]]
        vectors[start:stop] += sigma * rng.standard_normal((stop - start, DIM), dtype=np.float32)
    return centres, codes, vectors


def queries_for(centres: np.ndarray, n: int, sigma: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed + 1)
    truth = rng.integers(0, len(centres), n)
    return centres[truth] + sigma * rng.standard_normal((n, DIM), dtype=np.float32), truth


def median_time(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def phase(args: argparse.Namespace) -> dict:
    """One phase in this (fresh) process; returns what it measured."""
    from siamesedb.db import SiameseDB
    from siamesedb.encoder import Encoder

    encoder = Encoder.load("default", device="cpu")
    out: dict = {}
    if args.phase == "baseline":
        pass
    elif args.phase == "build":
        _, codes, vectors = make_data(args.items, args.classes, args.sigma, args.seed)
        names = [f"class{c:06d}" for c in range(args.classes)]
        labels = [names[c] for c in codes]  # N references to C shared strings
        del codes
        started = time.perf_counter()
        db = SiameseDB.create(args.dir, encoder=encoder, factory=args.factory)
        # Split the peak: adding (store + FAISS in memory) vs the final save of the FAISS file.
        save = db._save

        def timed_save() -> None:
            out["add_peak_rss_mb"] = step_peak_mb()
            reset_step_peak()
            save()
            out["save_peak_rss_mb"] = step_peak_mb()

        db._save = timed_save
        db.add_vectors(vectors, labels)
        db.close()
        out["build_s"] = time.perf_counter() - started
    else:  # open + classify
        centres, _, _ = make_data(args.classes, args.classes, args.sigma, args.seed)  # same centres, tiny
        queries, truth = queries_for(centres, args.queries, args.sigma, args.seed)
        del centres
        reset_step_peak()
        started = time.perf_counter()
        db = SiameseDB.open(args.dir, device="cpu")
        out["open_s"] = time.perf_counter() - started
        out["open_peak_rss_mb"] = step_peak_mb()
        reset_step_peak()
        started = time.perf_counter()
        db._class_table()  # prototypes of every class, streamed from the store once (then cached)
        out["class_table_s"] = time.perf_counter() - started
        want = [f"class{c:06d}" for c in truth]
        for method in ("prototype", "knn"):
            predictions: list = []

            def classify() -> None:
                predictions[:] = db.classify_vectors(queries, method, k=args.k, top=5)

            seconds = median_time(classify, args.runs)
            out[f"{method}_qps"] = args.queries / seconds
            out[f"{method}_accuracy"] = float(np.mean([p.label == w for p, w in zip(predictions, want)]))
        out["classify_peak_rss_mb"] = step_peak_mb()
        db.close()
    # Resetting VmHWM resets ru_maxrss too: the phase's peak is the largest of its steps' peaks.
    out["peak_rss_mb"] = max([peak_rss_mb()] + [v for k, v in out.items() if k.endswith("_peak_rss_mb")])
    return out


def run_phase(name: str, args: argparse.Namespace, folder: Path) -> dict:
    command = [sys.executable, __file__, "--phase", name, "--dir", str(folder)]
    for option in ("items", "classes", "queries", "k", "runs", "sigma", "seed", "factory"):
        command += [f"--{option}", str(getattr(args, option))]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ})
    if done.returncode != 0:
        sys.exit(f"phase {name} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--classes", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("-k", "--k", type=int, default=10, help="Neighbours that vote (knn).")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sigma", type=float, default=0.35)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--factory", default="Flat")
    parser.add_argument("--phase", choices=["baseline", "build", "classify"], help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(phase(args)))
        return

    raw_mb = args.items * DIM * 4 / 2**20
    print(f"# {args.items:,} items, {args.classes:,} classes, {DIM}-d float32 ({raw_mb:.0f} MiB raw), factory "
          f"{args.factory}, {args.queries} queries, {os.cpu_count()} cpus, {platform.machine()}, "
          f"{time.strftime('%Y-%m-%d')}, load average at start {os.getloadavg()[0]:.1f}")
    scratch = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    try:
        base = run_phase("baseline", args, scratch / "unused")
        built = run_phase("build", args, scratch / "index")
        used = run_phase("classify", args, scratch / "index")
        size_mb = sum(f.stat().st_size for f in (scratch / "index").rglob("*") if f.is_file()) / 2**20
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    budget = 2 * raw_mb + base["peak_rss_mb"]
    print(f"baseline (interpreter + torch + model)    peak RSS {base['peak_rss_mb']:7.0f} MiB")
    print(f"build from vectors (add_vectors)          {built['build_s']:7.1f} s  {args.items / built['build_s']:9.0f} "
          f"items/s  peak RSS {built['peak_rss_mb']:6.0f} MiB (budget 2 x raw + baseline = {budget:.0f}; "
          f"index folder {size_mb:.0f} MiB)")
    print(f"  of which: adding (store + FAISS in memory) peak RSS {built['add_peak_rss_mb']:6.0f} MiB; "
          f"saving vectors.faiss peak RSS {built['save_peak_rss_mb']:6.0f} MiB")
    print(f"open                                      {used['open_s']:7.2f} s  peak RSS {used['open_peak_rss_mb']:6.0f} MiB")
    print(f"class table (all prototypes, streamed)    {used['class_table_s']:7.2f} s")
    for method in ("prototype", "knn"):
        print(f"classify {method:<9} top-5{f' k={args.k}' if method == 'knn' else '':<6}           "
              f"{used[f'{method}_qps']:9.0f} queries/s  top-1 accuracy {used[f'{method}_accuracy']:.3f}")
    print(f"open + classify phase                     peak RSS {used['peak_rss_mb']:7.0f} MiB (budget {budget:.0f}); "
          f"after open, class table + classify peak RSS {used['classify_peak_rss_mb']:.0f} MiB")
    print(f"# load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
