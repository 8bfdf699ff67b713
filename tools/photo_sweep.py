"""Measure photo-recipe choices: train with `siamesedb train` (a short time budget), score on unseen classes.

One `run` = one training of the no-flag photo recipe with some flags changed, then N-way 1-shot on a folder of
classes the run never saw (1,000 episodes, seed 0, the 95% interval), once as `siamesedb eval oneshot` scores it and
once with test-time flips (each image embedded as itself and mirrored left-right, the two unit vectors averaged and
renormalised: what a `test_time_flip` in the encoder would give). Each run appends one JSON line to --results;
`table` prints them as Markdown. Run each `run` under the project's heavy-job lock, as every training is:

  flock /tmp/siamesedb-heavy.lock nice python tools/photo_sweep.py run fm-base --train fm6 --test fm4 --way 4 \\
      --budget 2m --results /tmp/photo/results.jsonl
  flock /tmp/siamesedb-heavy.lock nice python tools/photo_sweep.py run fm-40 --train fm6 --test fm4 --way 4 \\
      --budget 2m --results /tmp/photo/results.jsonl -- --image-size 40
  python tools/photo_sweep.py table --results /tmp/photo/results.jsonl

The data (BENCHMARKS.md "Training with no flags"): Fashion-MNIST's six training classes of the train split (fm6) and
its four other classes of the test split (fm4); `tools/make_colour_shapes.py` (train/ and test/, disjoint classes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def flip_scores(encoder_dir: Path, test: Path, way: int, shot: int, episodes: int, seed: int) -> dict:
    """N-way K-shot on `test` with and without test-time flips: {"plain": (acc, ci), "flip": (acc, ci)}."""
    import torch

    from siamesedb.data import iter_batches, scan_folder
    from siamesedb.encoder import Encoder
    from siamesedb.episodes import mean_ci95
    from siamesedb.evaluation import episode_accuracies

    encoder = Encoder.load(str(encoder_dir))
    images = scan_folder(test)
    plain, mirrored, kept_images = [], [], []
    for kept, tensor, _bad in iter_batches(images, encoder.config.preprocessing, batch_size=256):
        plain.append(encoder.encode_tensors(tensor))  # (n, D) unit vectors
        mirrored.append(encoder.encode_tensors(torch.flip(tensor, dims=(3,))))  # (n, D): the left-right mirror
        kept_images.extend(images[i] for i in kept)
    a, b = np.concatenate(plain), np.concatenate(mirrored)
    joined = a + b
    joined /= np.linalg.norm(joined, axis=1, keepdims=True)  # (N, D): the mean direction of the two views
    labels, paths = [im.label for im in kept_images], [str(im.path) for im in kept_images]
    out = {}
    for name, vectors in (("plain", a), ("flip", joined)):
        acc = episode_accuracies(vectors, labels, paths, way=way, shot=shot, queries=1, episodes=episodes, seed=seed,
                                 metric=encoder.config.metric)
        out[name] = [round(100 * v, 2) for v in mean_ci95(acc)]
    return out


def run(args: argparse.Namespace, extra: list[str]) -> None:
    out = Path(args.runs) / args.name
    if out.exists():
        sys.exit(f"{out} exists: choose another run name (a training into it would resume or mix runs)")
    siamesedb = str(Path(sys.executable).with_name("siamesedb"))
    # --epochs among the extra flags fixes the schedule (equal steps for every setting, whatever the load): no
    # budget then, since a budget re-plans the epochs when the shared machine runs slower than timed.
    budget = [] if "--epochs" in extra else ["--time-budget", args.budget]
    command = [siamesedb, "train", str(args.train), "--out", str(out), *budget, "-q", *extra]
    load = os.getloadavg()
    started = time.time()
    completed = subprocess.run(command, capture_output=True, text=True)
    minutes = (time.time() - started) / 60
    (out.parent / f"{args.name}.log").write_text(completed.stdout + completed.stderr)
    if completed.returncode:
        sys.exit(f"{args.name}: training failed (exit {completed.returncode}), see {out.parent / (args.name + '.log')}")
    config = json.loads((out / "train_config.json").read_text())
    history = json.loads((out / "history.json").read_text())  # one entry per epoch run
    steps = sum(e["steps"] for e in history)
    train_seconds = sum(e["seconds"] for e in history)
    scores = {f"{way}w{shot}s": flip_scores(out, Path(args.test), way, shot, args.episodes, args.seed)
              for way, shot in ((args.way, 1), (args.way, 5))}
    record = {
        "name": args.name, "train": str(args.train), "test": str(args.test),
        "budget": args.budget if budget else "none", "flags": extra,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)), "load": [round(v, 2) for v in load],
        "minutes": round(minutes, 2), "schedule": [config["epochs"], config["steps_per_epoch"]],
        "epochs_run": len(history), "steps": steps, "step_s": round(train_seconds / max(1, steps), 3),
        "val": [e.get("val_accuracy") for e in history],
        "settings": {k: config.get(k) for k in ("image_size", "channels", "invert", "backbone", "width", "way",
                                                 "shot", "queries", "augment", "augment_strength", "flip",
                                                 "color_jitter", "val_fraction")},
        "scores": scores,
    }
    with open(args.results, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record))


def table(args: argparse.Namespace) -> None:
    rows = [json.loads(line) for line in Path(args.results).read_text().splitlines() if line.strip()]
    keys = sorted({k for r in rows for k in r["scores"]}, key=lambda k: (int(k.split("s")[0].split("w")[1]), k))
    head = ["run", "flags", "budget", "steps run", "s/step", "min", "load"]
    for k in keys:
        head += [k, f"{k} + test-time flip"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        sched = f"{r['steps']} ({r['epochs_run']} x {r['schedule'][1]})"
        cells = [r["name"], " ".join(r["flags"]) or "(none)", r["budget"], sched, str(r["step_s"]), str(r["minutes"]),
                 str(r["load"][0])]
        for k in keys:
            s = r["scores"].get(k)
            cells += [f"{s['plain'][0]:.2f}% ± {s['plain'][1]:.2f}%", f"{s['flip'][0]:.2f}% ± {s['flip'][1]:.2f}%"] \
                if s else ["", ""]
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train one setting, score it on unseen classes, append a JSON line")
    r.add_argument("name")
    r.add_argument("--train", required=True, type=Path)
    r.add_argument("--test", required=True, type=Path)
    r.add_argument("--way", type=int, required=True, help="ways of the unseen-class episodes (1- and 5-shot)")
    r.add_argument("--budget", default="2m")
    r.add_argument("--episodes", type=int, default=1000)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--runs", default="/tmp/photo/runs")
    r.add_argument("--results", required=True)
    t = sub.add_parser("table", help="the results as a Markdown table")
    t.add_argument("--results", required=True)
    argv = sys.argv[1:]
    extra: list[str] = []
    if "--" in argv:
        extra, argv = argv[argv.index("--") + 1:], argv[: argv.index("--")]
    args = parser.parse_args(argv)
    if args.command == "run":
        run(args, extra)
    else:
        table(args)


if __name__ == "__main__":
    main()
