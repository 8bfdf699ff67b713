"""Build throughput on real data: `SiameseDB.build` over Omniglot's 13,180 evaluation images, against decode-only
and encode-only throughput measured in the same run (a pipeline can go no faster than its slower stage).

Stages: decode-only = read + decode + preprocess every file (`iter_batches`, in process or with worker processes);
encode-only = the pre-decoded tensors through `Encoder.encode_tensors` (the same call, same batch size, the build
uses; "intra-op threads" = the same with the CPU lanes switched off, as the encoder worked before them);
build = `SiameseDB.build` into a fresh folder (read once, hash, decode, encode, SQLite + FAISS writes).

The machine may be shared: the settings are measured in rounds (every setting once per round, after one warm-up
round), so a burst of outside load falls on all of them alike, and each line prints the median over the rounds.
The build's vectors are checked against encode-only's (same images, same order): the pipeline must not change them.

Run:  python tools/bench_build.py [--data PATH] [--runs 5] [--workers 0 1 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from siamesedb.data import iter_batches, scan_folder
from siamesedb.datasets import omniglot
from siamesedb.db import SiameseDB
from siamesedb.encoder import Encoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="Folder holding omniglot/images_evaluation.zip (or the zip).")
    parser.add_argument("--encoder", default="default")
    parser.add_argument("--runs", type=int, default=5, help="Timed rounds (after one warm-up round).")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--limit", type=int, default=None, help="Only the first N images (a quick look).")
    args = parser.parse_args()

    folder = omniglot("evaluation", source=args.data)
    images = scan_folder(folder)
    if args.limit:
        # A build indexes a whole folder: copy the first N images into a scratch folder of the same layout.
        subset = Path(tempfile.mkdtemp(prefix="bench-build-data-"))
        for im in images[: args.limit]:
            target = subset / im.label / im.path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(im.path, target)
        folder, images = subset, scan_folder(subset)
    encoder = Encoder.load(args.encoder, device="cpu")
    n = len(images)
    print(f"# {n} images, encoder {encoder.fingerprint} ({encoder.config.backbone}, input "
          f"{encoder.config.preprocessing.size}), torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} cpus, {platform.processor() or platform.machine()}, {time.strftime('%Y-%m-%d')}, "
          f"load average at start {os.getloadavg()[0]:.1f}")

    # Encode-only input: the whole set preprocessed once, in scan order.
    tensors = [t for _, t, _ in iter_batches(images, encoder.config.preprocessing, batch_size=args.batch_size)]
    reference: list[np.ndarray] = []

    def encode_only() -> None:
        reference[:] = [np.concatenate([encoder.encode_tensors(t, batch_size=args.batch_size) for t in tensors])]

    scratch = Path(tempfile.mkdtemp(prefix="bench-build-"))
    built: dict[int, np.ndarray] = {}

    def decode_only(workers: int) -> Callable[[], None]:
        def run() -> None:
            for _ in iter_batches(images, encoder.config.preprocessing, batch_size=args.batch_size, workers=workers):
                pass
        return run

    def build(workers: int) -> Callable[[], None]:
        def run() -> None:
            shutil.rmtree(scratch / "index", ignore_errors=True)
            with SiameseDB.build(folder, path=scratch / "index", encoder=encoder, workers=workers,
                                 batch_size=args.batch_size) as db:
                assert len(db) == n, len(db)
                built[workers] = db.store.vectors()[1]
        return run

    def encode_intra_op() -> None:
        # The encoder before lanes: one forward per batch, torch's own intra-op threads. Same vectors.
        encoder.cpu_lanes = False
        try:
            for t in tensors:
                encoder.encode_tensors(t, batch_size=args.batch_size)
        finally:
            encoder.cpu_lanes = True

    settings: list[tuple[str, Callable[[], None]]] = [("encode-only", encode_only),
                                                      ("encode-only intra-op", encode_intra_op)]
    for workers in args.workers:
        settings.append((f"decode-only workers={workers}", decode_only(workers)))
        settings.append((f"build workers={workers}", build(workers)))
    seconds: dict[str, list[float]] = {name: [] for name, _ in settings}
    for round_ in range(args.runs + 1):  # round 0 warms up: page cache, torch kernels, process start-up paths
        for name, fn in settings:
            started = time.perf_counter()
            fn()
            if round_:
                seconds[name].append(time.perf_counter() - started)

    median = {name: statistics.median(s) for name, s in seconds.items()}
    encode_rate = n / median["encode-only"]
    print(f"encode-only                   {encode_rate:8.0f} images/s  ({median['encode-only']:.2f} s)")
    print(f"encode-only, intra-op threads {n / median['encode-only intra-op']:8.0f} images/s  "
          f"({median['encode-only intra-op']:.2f} s)  (lanes off: the encoder before this change)")
    for workers in args.workers:
        decode_rate = n / median[f"decode-only workers={workers}"]
        build_rate = n / median[f"build workers={workers}"]
        # Vectors in id order = scan order; the build must give what the encoder gives on its own.
        same = np.array_equal(built[workers], reference[0])
        print(f"decode-only   workers={workers}       {decode_rate:8.0f} images/s  "
              f"({median[f'decode-only workers={workers}']:.2f} s)")
        print(f"build         workers={workers}       {build_rate:8.0f} images/s  "
              f"({median[f'build workers={workers}']:.2f} s)  = {build_rate / min(decode_rate, encode_rate):.2f} x "
              f"the slower stage (vectors identical to encode-only: {same})")
    print(f"# load average at end {os.getloadavg()[0]:.1f}")
    shutil.rmtree(scratch, ignore_errors=True)
    if args.limit:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
