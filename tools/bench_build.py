"""Build throughput on real data: `SiameseDB.build` over Omniglot's 13,180 evaluation images, against decode-only
and encode-only throughput measured in the same run (the pipeline can go no faster than its slower stage).

Each setting: one warm-up run, then --runs timed runs; prints the median, one line per setting.

Run:  python tools/bench_build.py [--data PATH] [--runs 3] [--workers 0 2]
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

import torch

from siamesedb.data import iter_batches, scan_folder
from siamesedb.datasets import omniglot
from siamesedb.db import SiameseDB
from siamesedb.encoder import Encoder


def timed(fn, runs: int) -> float:
    fn()  # warm-up: page cache, torch kernels, process pool start-up paths
    seconds = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="Folder holding omniglot/images_evaluation.zip (or the zip).")
    parser.add_argument("--encoder", default="default")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()

    folder = omniglot("evaluation", source=args.data)
    images = scan_folder(folder)
    encoder = Encoder.load(args.encoder, device="cpu")
    n = len(images)
    print(f"# {n} images, encoder {encoder.fingerprint} ({encoder.config.backbone}, input "
          f"{encoder.config.preprocessing.size}), torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} cpus, {platform.processor() or platform.machine()}, {time.strftime('%Y-%m-%d')}")

    # Encode-only: the whole set preprocessed once, then timed through the encoder alone.
    tensors = [t for _, t, _ in iter_batches(images, encoder.config.preprocessing, batch_size=args.batch_size)]

    def encode_only() -> None:
        for t in tensors:
            encoder.encode_tensors(t)

    encode_s = timed(encode_only, args.runs)
    print(f"encode-only                     {n / encode_s:8.0f} images/s  ({encode_s:.2f} s)")

    for workers in args.workers:
        def decode_only() -> None:
            for _ in iter_batches(images, encoder.config.preprocessing, batch_size=args.batch_size, workers=workers):
                pass

        decode_s = timed(decode_only, args.runs)
        print(f"decode-only      workers={workers}      {n / decode_s:8.0f} images/s  ({decode_s:.2f} s)")

        scratch = Path(tempfile.mkdtemp(prefix="bench-build-"))

        def build() -> None:
            shutil.rmtree(scratch / "index", ignore_errors=True)
            with SiameseDB.build(folder, path=scratch / "index", encoder=encoder, workers=workers,
                                 batch_size=args.batch_size) as db:
                assert len(db) == n, len(db)

        build_s = timed(build, args.runs)
        slower = min(n / decode_s, n / encode_s)
        print(f"build (pipeline) workers={workers}      {n / build_s:8.0f} images/s  ({build_s:.2f} s)  "
              f"= {n / build_s / slower:.2f} x the slower stage")
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
