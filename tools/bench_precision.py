"""Encoding precision on the CPU: float32 vs bfloat16 autocast (EncoderConfig.precision) for one encoder.

Input: Omniglot's 13,180 evaluation images, preprocessed once. Measured in one run, interleaved in rounds (one
warm-up round, then --runs; median): images/s of `Encoder.encode_tensors` (the call build / add / query use, CPU lanes
on, all of the encoder's test-time views); the cosine of each bf16 vector to its float32 vector (min / mean); and
20-way 1-shot accuracy, within alphabet (Lake's drawer protocol) and unstructured, --episodes episodes, seed 0, on
the same vectors (the protocol `siamesedb eval oneshot` runs). Also int8 if --int8: dynamic quantisation of the Linear
layers (torch.ao.quantization.quantize_dynamic; Conv-4's convolutions stay float32).

Run:  python tools/bench_precision.py [--encoder default] [--runs 5] [--episodes 1000] [--int8]
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time

import numpy as np
import torch

from siamesedb.data import iter_batches, scan_folder
from siamesedb.datasets import omniglot
from siamesedb.encoder import Encoder, EncoderConfig, cpu_has_native_bf16
from siamesedb.evaluation import episode_accuracies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default="default")
    parser.add_argument("--data", default=None, help="Folder holding omniglot/images_evaluation.zip (or the zip).")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--episodes", type=int, default=1000)
    parser.add_argument("--int8", action="store_true", help="Also dynamic int8 quantisation of the Linear layers.")
    args = parser.parse_args()

    base = Encoder.load(args.encoder, device="cpu")
    images = scan_folder(omniglot("evaluation", source=args.data))
    tensors = [t for _, t, _ in iter_batches(images, base.config.preprocessing, batch_size=256)]
    labels, paths = [im.label for im in images], [str(im.path) for im in images]
    print(f"# {len(images)} images, encoder {base.fingerprint} ({base.config.backbone}, views "
          f"{5 if base.config.test_time_shift else 1}), torch {torch.__version__} threads {torch.get_num_threads()}, "
          f"native bf16 {cpu_has_native_bf16()}, {os.cpu_count()} cpus, {platform.machine()}, "
          f"{time.strftime('%Y-%m-%d')}, load average at start {os.getloadavg()[0]:.1f}")

    encoders = {"float32": base}
    bf16 = Encoder(EncoderConfig.from_dict({**base.config.to_dict(), "precision": "bfloat16"}),
                   net=copy.deepcopy(base.net), device="cpu")
    encoders["bfloat16"] = bf16
    if args.int8:
        quantised = torch.ao.quantization.quantize_dynamic(copy.deepcopy(base.net).eval(), {torch.nn.Linear},
                                                           dtype=torch.qint8)
        encoders["int8 (Linear, dynamic)"] = Encoder(base.config, net=quantised, device="cpu")
    vectors: dict[str, np.ndarray] = {}
    seconds: dict[str, list[float]] = {name: [] for name in encoders}
    for round_ in range(args.runs + 1):
        for name, encoder in encoders.items():
            started = time.perf_counter()
            vectors[name] = np.concatenate([encoder.encode_tensors(t) for t in tensors])
            if round_:
                seconds[name].append(time.perf_counter() - started)
    reference = vectors["float32"]
    base_rate = len(images) / statistics.median(seconds["float32"])
    for name in encoders:
        rate = len(images) / statistics.median(seconds[name])
        cosine = np.sum(vectors[name] * reference, axis=1)
        accuracy = {}
        for within in (True, False):
            acc = episode_accuracies(vectors[name], labels, paths, way=20, shot=1, queries=1,
                                     episodes=args.episodes, within_group=within, seed=0)
            accuracy[within] = (acc.mean(), 1.96 * acc.std(ddof=1) / np.sqrt(len(acc)))
        print(f"{name:<24} {rate:7.0f} images/s ({rate / base_rate:.2f}x float32)  cosine to float32 min "
              f"{cosine.min():.6f} mean {cosine.mean():.6f}  20-way 1-shot within alphabet "
              f"{accuracy[True][0]:.2%} +- {accuracy[True][1]:.2%}, unstructured {accuracy[False][0]:.2%} +- "
              f"{accuracy[False][1]:.2%}", flush=True)
    print(f"# load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
