"""Build throughput on real data: `SiameseDB.build` over Omniglot's 13,180 evaluation images, against decode-only
and encode-only throughput measured in the same run (a pipeline can go no faster than its slower stage).

Stages: decode-only = read + decode + preprocess every file (`iter_batches`, in process or with worker processes);
encode-only = the pre-decoded tensors through `Encoder.encode_tensors` (the same call, same batch size, the build
uses; "intra-op threads" = the same with the CPU lanes switched off, as the encoder worked before them);
build = `SiameseDB.build` into a fresh folder (read once, hash, decode, encode, SQLite + FAISS writes).

The machine may be shared: the settings are measured in rounds (every setting once per round, after one warm-up
round), so a burst of outside load falls on all of them alike, and each line prints the median over the rounds.
The build's vectors are checked against encode-only's (same images, same order): the pipeline must not change them.

Large photos (--photos N): N generated 4000x3000 photo-like JPEGs (smooth colour field, flat discs, noise; quality
90) in two label folders: decode + preprocess per image with the full decode vs JPEG draft mode (decoding at the
smallest DCT scale covering 2x the input, `Preprocessing.draft_size`), their mean pixel difference after the resize,
and a build of the folder. --photos-only skips the Omniglot part.

Ray (--ray, issue 18): the in-process build (default workers) against `build_with_ray` on a local Ray started once
(its start-up timed apart), in rounds as above; the Ray build's vectors are compared with the in-process build's.

Run:  python tools/bench_build.py [--data PATH] [--runs 5] [--workers 0 1 2] [--photos 24 [--photos-only]] [--ray]
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

from siamesedb.data import iter_batches, load_image, scan_folder
from siamesedb.datasets import omniglot
from siamesedb.db import SiameseDB
from siamesedb.encoder import Encoder


def photo_jpeg(width: int, height: int, seed: int) -> bytes:
    """A photo-like JPEG: a smooth colour field, discs of flat colour (edges) and sensor-like noise."""
    import io

    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    field = rng.integers(0, 256, (height // 100 + 2, width // 100 + 2, 3), dtype=np.uint8)
    image = Image.fromarray(field).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(60):
        x, y, r = int(rng.integers(0, width)), int(rng.integers(0, height)), int(rng.integers(20, width // 6))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    noisy = np.asarray(image, np.int16) + rng.normal(0, 12, (height, width, 3)).astype(np.int16)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def bench_photos(count: int, encoder: Encoder, runs: int, batch_size: int) -> None:
    """Full decode vs draft decode of large JPEGs (per image, in rounds), their difference, and a build."""
    scratch = Path(tempfile.mkdtemp(prefix="bench-build-photos-"))
    try:
        for i in range(count):
            target = scratch / "photos" / f"item{i % 2}" / f"photo{i:03d}.jpg"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(photo_jpeg(4000, 3000, seed=i))
        paths = sorted((scratch / "photos").rglob("*.jpg"))
        prep = encoder.config.preprocessing
        full = [prep.to_array(load_image(p)) for p in paths]
        draft = [prep.to_array(load_image(p, prep.draft_size)) for p in paths]
        difference = float(np.mean([np.abs(a - b).mean() for a, b in zip(full, draft)])) * 255
        settings = {"full decode": None, "draft decode": prep.draft_size}
        seconds: dict[str, list[float]] = {name: [] for name in settings}
        built: list[float] = []
        for round_ in range(runs + 1):
            for name, size in settings.items():
                started = time.perf_counter()
                for p in paths:
                    prep.to_array(load_image(p, size))
                if round_:
                    seconds[name].append(time.perf_counter() - started)
            started = time.perf_counter()
            shutil.rmtree(scratch / "index", ignore_errors=True)
            with SiameseDB.build(scratch / "photos", path=scratch / "index", encoder=encoder, workers=0,
                                 batch_size=batch_size) as db:
                assert len(db) == count, len(db)
            if round_:
                built.append(time.perf_counter() - started)
        full_ms = statistics.median(seconds["full decode"]) / count * 1000
        draft_ms = statistics.median(seconds["draft decode"]) / count * 1000
        print(f"# {count} photo-like JPEGs 4000x3000 (quality 90), input {prep.size}, channels {prep.channels}, "
              f"keep_aspect {prep.keep_aspect}; draft covers {prep.draft_size}")
        print(f"photo decode + preprocess, full   {full_ms:7.1f} ms/image")
        print(f"photo decode + preprocess, draft  {draft_ms:7.1f} ms/image  = {full_ms / draft_ms:.2f}x faster; mean "
              f"pixel difference after the resize {difference:.3f}/255")
        print(f"photo build (draft), workers=0    {count / statistics.median(built):7.1f} images/s "
              f"({1000 * statistics.median(built) / count:.1f} ms/image)")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def bench_ray(folder: Path, n: int, encoder: Encoder, runs: int, batch_size: int) -> None:
    """In-process build vs Ray build of one folder, in rounds after a warm-up round; vectors compared."""
    import ray

    from siamesedb.ray_build import build_with_ray

    started = time.perf_counter()
    ray.init(include_dashboard=False, logging_level="WARNING")
    init_seconds = time.perf_counter() - started
    resources = ray.cluster_resources()
    print(f"# {n} images, encoder {encoder.fingerprint}, {os.cpu_count()} cpus, {time.strftime('%Y-%m-%d %H:%M')}, "
          f"ray {ray.__version__} local: {resources.get('CPU', 0):g} CPU, {resources.get('GPU', 0):g} GPU; "
          f"load average at start {os.getloadavg()[0]:.1f}")
    scratch = Path(tempfile.mkdtemp(prefix="bench-build-ray-"))
    settings = {
        "in-process build (default workers)": lambda path: SiameseDB.build(folder, path=path, encoder=encoder,
                                                                          batch_size=batch_size),
        "ray build (local)": lambda path: build_with_ray(folder, path=path, encoder=encoder, batch_size=batch_size),
    }
    seconds: dict[str, list[float]] = {name: [] for name in settings}
    vectors: dict[str, np.ndarray] = {}
    try:
        for round_ in range(runs + 1):
            for name, build in settings.items():
                shutil.rmtree(scratch / "index", ignore_errors=True)
                started = time.perf_counter()
                with build(scratch / "index") as db:
                    elapsed = time.perf_counter() - started
                    assert len(db) == n and db.last_report.added == n, (len(db), db.last_report.added)
                    vectors[name] = db.store.vectors()[1]  # id order = scan order in both
                if round_:
                    seconds[name].append(elapsed)
    finally:
        ray.shutdown()
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"ray.init (local, once)        {init_seconds:8.1f} s")
    for name, times in seconds.items():
        median = statistics.median(times)
        print(f"{name:<36} {n / median:8.0f} images/s  ({median:.2f} s; rounds {', '.join(f'{t:.1f}' for t in times)})")
    base, other = vectors.values()
    print(f"ray / in-process: {statistics.median(seconds['in-process build (default workers)']) / statistics.median(seconds['ray build (local)']):.2f}x; "
          f"vectors identical: {np.array_equal(base, other)} (max |difference| {float(np.abs(base - other).max()):.2g})")
    print(f"# load average at end {os.getloadavg()[0]:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="Folder holding omniglot/images_evaluation.zip (or the zip).")
    parser.add_argument("--encoder", default="default")
    parser.add_argument("--runs", type=int, default=5, help="Timed rounds (after one warm-up round).")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--limit", type=int, default=None, help="Only the first N images (a quick look).")
    parser.add_argument("--photos", type=int, default=0, help="Also time N generated 4000x3000 JPEGs (draft decode).")
    parser.add_argument("--photos-only", action="store_true", help="Only the large-photo part.")
    parser.add_argument("--ray", action="store_true", help="Only: in-process build vs a local-Ray build (issue 18).")
    args = parser.parse_args()
    if args.photos:
        bench_photos(args.photos, Encoder.load(args.encoder, device="cpu"), args.runs, args.batch_size)
        if args.photos_only:
            return

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
    if args.ray:
        bench_ray(folder, n, encoder, args.runs, args.batch_size)
        if args.limit:
            shutil.rmtree(folder, ignore_errors=True)
        return
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
