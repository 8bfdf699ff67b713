"""CPU encoding in channels-last (NHWC) against torch's default NCHW layout (`Encoder.channels_last`), per backbone.

For each net the recipes use, at each batch size: images/s of `Encoder.encode_tensors` (the call build / add / query
and the server's batches use, all test-time views) with channels-last off and on, interleaved in rounds (one
warm-up round, then --runs; median), their ratio, and how far the vectors move (largest absolute difference of any
coordinate, smallest cosine between the two vectors of one image). The shipped default uses its real weights and
Omniglot images if the data is there (else random images); the others are untrained nets of each recipe's shape on
random images (speed does not depend on the weights).

Run:  python tools/bench_layout.py [--runs 5] [--batches 1 8 64] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np
import torch

from siamesedb.encoder import Encoder, EncoderConfig
from siamesedb.images import Preprocessing

# (name, backbone, channels, (height, width), width) as the recipes choose them (recipe.py)
NETS = [
    ("default (conv4, 28x28 grey, 5 views)", "default", 1, (28, 28), 64),
    ("conv4 glyph recipe, 1 view", "conv4", 1, (28, 28), 64),
    ("signet signature recipe, 64x128", "signet", 1, (64, 128), 16),
    ("resnet photo recipe, 64x64 RGB", "resnet", 3, (64, 64), 16),
]


def make(backbone: str, channels: int, size: tuple[int, int], width: int) -> Encoder:
    if backbone == "default":
        return Encoder.load("default", device="cpu")
    config = EncoderConfig(backbone=backbone, embedding_dim=64, width=width,
                           preprocessing=Preprocessing(size=size, channels=channels))
    return Encoder(config, device="cpu")


def images_for(encoder: Encoder, n: int, data: str | None) -> torch.Tensor:
    prep = encoder.config.preprocessing
    if encoder.config.name == "default" or encoder.config.test_time_shift:
        try:
            from siamesedb.data import scan_folder
            from siamesedb.datasets import omniglot

            paths = [im.path for im in scan_folder(omniglot("evaluation", source=data))[:n]]
            return torch.stack([encoder.preprocess(p) for p in paths])
        except Exception:  # noqa: BLE001 - no data here: random images time the same
            pass
    generator = torch.Generator().manual_seed(0)
    return torch.rand((n, prep.channels, *prep.size), generator=generator)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--data", default=None, help="Folder holding omniglot/images_evaluation.zip (or the zip).")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cpus, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f} at "
          f"start; median of {args.runs} rounds after a warm-up", flush=True)
    print("| net | batch | NCHW images/s | NHWC images/s | ratio | max abs diff | min cosine |", flush=True)
    print("|---|---:|---:|---:|---:|---:|---:|", flush=True)
    for name, backbone, channels, size, width in NETS:
        encoder = make(backbone, channels, size, width)
        for batch in args.batches:
            images = images_for(encoder, batch, args.data)
            repeats = max(1, 256 // batch)  # calls per sample: enough work to time small batches
            rates: dict[bool, list[float]] = {False: [], True: []}
            vectors = {}
            for round_ in range(args.runs + 1):
                for layout in (False, True):
                    encoder.channels_last = layout
                    started = time.perf_counter()
                    for _ in range(repeats):
                        vectors[layout] = encoder.encode_tensors(images)
                    if round_:  # round 0 warms up (and makes the channels-last copy)
                        rates[layout].append(repeats * batch / (time.perf_counter() - started))
            nchw, nhwc = statistics.median(rates[False]), statistics.median(rates[True])
            diff = float(np.abs(vectors[True] - vectors[False]).max())
            cosine = float(((vectors[True] * vectors[False]).sum(1)
                            / np.linalg.norm(vectors[True], axis=1) / np.linalg.norm(vectors[False], axis=1)).min())
            print(f"| {name} | {batch} | {nchw:,.0f} | {nhwc:,.0f} | {nhwc / nchw:.2f}x | {diff:.1e} | {cosine:.7f} |",
                  flush=True)
    print(f"# load average {os.getloadavg()[0]:.2f} at the end", flush=True)


if __name__ == "__main__":
    main()
