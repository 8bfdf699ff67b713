"""Training step speed on the CPU, float32 against bfloat16 autocast, for the backbones the recipe picks.

One "step" is what `siamesedb train` does per step with the prototypical loss: forward a whole episode through the
encoder (L2-normalised), the loss, backward, Adam. Random inputs (speed does not depend on the pixels). Per setting:
warm-up steps, then `--repeats` timed blocks of `--steps` steps for each precision, interleaved (fp32, bf16, fp32, ...)
so a neighbour's load hits both alike; the median block time per step and the ratio fp32 / bf16 are printed.

Run:  flock /tmp/siamesedb-heavy.lock python tools/bench_train_bf16.py [--steps 5] [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from siamesedb.encoder import Encoder, EncoderConfig
from siamesedb.data import Preprocessing
from siamesedb.losses import PrototypicalLoss
from siamesedb.training import cpu_supports_bf16

# (name, backbone, width, (H, W), channels, way, shot + queries): the recipe's defaults per domain
SETTINGS = [
    ("conv4-28 (glyphs, 60-way 5+5)", "conv4", 64, (28, 28), 1, 60, 10),
    ("conv4-56 (60-way 5+5)", "conv4", 64, (56, 56), 1, 60, 10),
    ("resnet w16 56px rgb (20-way 5+5)", "resnet", 16, (56, 56), 3, 20, 10),
    ("resnet w16 64px rgb (20-way 5+5)", "resnet", 16, (64, 64), 3, 20, 10),
    ("signet w16 64x128 (16-way 5+5)", "signet", 16, (64, 128), 1, 16, 10),
]


def make_step(backbone: str, width: int, size: tuple[int, int], channels: int, way: int, per_class: int, bf16: bool):
    torch.manual_seed(0)
    config = EncoderConfig(backbone=backbone, embedding_dim=64, width=width,
                           preprocessing=Preprocessing(size=size, channels=channels))
    encoder = Encoder(config, device="cpu")
    encoder.net.train()
    loss_fn = PrototypicalLoss(10.0)
    optimizer = torch.optim.Adam(encoder.net.parameters(), lr=1e-3)
    shot = 5
    batch = torch.rand(way * per_class, channels, *size)  # (way * (shot + queries), C, H, W)
    support_labels = torch.arange(way).repeat_interleave(shot)
    query_labels = torch.arange(way).repeat_interleave(per_class - shot)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            emb = encoder.embed(batch)  # (N, 64) float32 (embed casts back)
        loss = loss_fn(emb[: way * shot], support_labels, emb[way * shot :], query_labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def seconds_per_step(step, steps: int) -> float:
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="Steps per timed block.")
    parser.add_argument("--repeats", type=int, default=5, help="Timed blocks per precision (median taken).")
    parser.add_argument("--warmup", type=int, default=3, help="Untimed steps per precision first.")
    parser.add_argument("--only", nargs="*", default=None, help="Run only settings whose name contains one of these.")
    parser.add_argument("--json", default=None, help="Also write the results here.")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"bf16 support detected: {cpu_supports_bf16()}")
    results = []
    for name, backbone, width, size, channels, way, per_class in SETTINGS:
        if args.only and not any(part in name for part in args.only):
            continue
        steps = {p: make_step(backbone, width, size, channels, way, per_class, bf16=p == "bf16") for p in ("fp32", "bf16")}
        for step in steps.values():
            for _ in range(args.warmup):
                step()
        times: dict[str, list[float]] = {"fp32": [], "bf16": []}
        for _ in range(args.repeats):
            for precision, step in steps.items():
                times[precision].append(seconds_per_step(step, args.steps))
        fp32, bf16 = statistics.median(times["fp32"]), statistics.median(times["bf16"])
        row = {"setting": name, "fp32_s_per_step": round(fp32, 4), "bf16_s_per_step": round(bf16, 4),
               "speedup": round(fp32 / bf16, 2)}
        results.append(row)
        print(f"{name:36s} fp32 {fp32 * 1000:7.1f} ms/step   bf16 {bf16 * 1000:7.1f} ms/step   x{fp32 / bf16:.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
