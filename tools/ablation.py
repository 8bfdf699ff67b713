"""Training ablation on Omniglot: each setting trained on images_background for the same number of steps, then scored
on images_evaluation with Lake's 20-way 1-shot within-alphabet task and the unstructured 20-way 1-shot task.

One line per setting (and a JSON line appended to --results), so the choice of loss, resolution and schedule for the
default encoder rests on measurement. Settings are TrainConfig overrides on top of --base.

Run:  python tools/ablation.py [--data PATH] [--steps 300] [--episodes 400] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from siamesedb.datasets import omniglot
from siamesedb.evaluation import evaluate_oneshot
from siamesedb.training import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]

SETTINGS: dict[str, dict] = {
    "proto-28": {"loss": "proto"},
    "proto-28-scale30": {"loss": "proto", "proto_scale": 30.0},
    "proto-28-noaug": {"loss": "proto", "augment": False},
    "contrastive-28": {"loss": "contrastive", "batch_size": 128},
    "triplet-28": {"loss": "triplet", "batch_size": 128, "per_class": 4},
    "proto-40": {"loss": "proto", "image_size": 40},
    "proto-28-rot4": {"loss": "proto", "rotate_classes": True},
    "proto-28-euclid": {"loss": "proto", "normalize_train": False, "proto_scale": 1.0},
    "proto-28-w128": {"loss": "proto", "width": 128},
    "proto-28-bf16": {"loss": "proto", "precision": "bf16"},  # bfloat16 autocast on the CPU (every other row: float32)
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None)
    parser.add_argument("--steps", type=int, default=300, help="Optimiser steps per setting (100 per epoch).")
    parser.add_argument("--episodes", type=int, default=400)
    parser.add_argument("--only", nargs="*", default=None, help="Run only these settings.")
    parser.add_argument("--out", default=str(ROOT / "runs" / "ablation"))
    parser.add_argument("--results", default=str(ROOT / "runs" / "ablation" / "results.jsonl"))
    args = parser.parse_args()

    background = omniglot("background", source=args.data)
    evaluation = omniglot("evaluation", source=args.data)
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"# {args.steps} steps per setting, {args.episodes} episodes, device {device}, {time.strftime('%Y-%m-%d %H:%M')}")
    for name, overrides in SETTINGS.items():
        if args.only and name not in args.only:
            continue
        config = TrainConfig(**{"epochs": max(1, args.steps // 100), "steps_per_epoch": min(100, args.steps),
                                "seed": 0, "precision": "fp32", **overrides})
        started = time.perf_counter()
        encoder = train(background, Path(args.out) / name, config, progress=False)
        minutes = (time.perf_counter() - started) / 60
        within = evaluate_oneshot(evaluation, encoder, way=20, shot=1, episodes=args.episodes, within_group=True)
        unstructured = evaluate_oneshot(evaluation, encoder, way=20, shot=1, episodes=args.episodes)
        record = {"setting": name, "overrides": overrides, "steps": args.steps, "train_minutes": round(minutes, 2),
                  "device": device, "within_20w1s": within.accuracy, "within_ci95": within.ci95,
                  "unstructured_20w1s": unstructured.accuracy, "unstructured_ci95": unstructured.ci95,
                  "date": time.strftime("%Y-%m-%d")}
        with open(args.results, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        print(f"{name:<20} train {minutes:5.1f} min  within-alphabet 20w1s {within.accuracy:6.2%} ± {within.ci95:.2%}"
              f"  unstructured 20w1s {unstructured.accuracy:6.2%} ± {unstructured.ci95:.2%}", flush=True)


if __name__ == "__main__":
    main()
