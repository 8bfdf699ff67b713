"""The main job end to end on real data: Omniglot's evaluation alphabets (characters the encoder never saw).

1. unpack Omniglot's evaluation set (from ../shared/data, --data PATH, or the official repository);
2. `siamesedb build` an index of two reference drawings per character (drawers 01 and 02: 659 classes, 1,318 items);
3. `siamesedb query`, `classify` and `calibrate` + `verify` one new drawing by another drawer, as a user would;
4. accuracy over a batch of held-out drawings (drawers 03..20): 659-way and 20-way within-alphabet classification,
   verification accept/reject rates;
5. `siamesedb eval oneshot --within-group`: Lake's 20-way one-shot task with a 95% confidence interval.

Run:  python tools/demo.py [--data PATH] [--queries 400] [--episodes 400]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from siamesedb.data import group_of, scan_folder
from siamesedb.datasets import omniglot
from siamesedb.db import SiameseDB
from siamesedb.evaluation import drawer_of

ROOT = Path(__file__).resolve().parents[1]
SUPPORT_DRAWERS = ("01", "02")


def run_cli(*args: str) -> None:
    """Run one `siamesedb` command, echoing it first so the reader sees exactly what a user would type."""
    print(f"\n$ siamesedb {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, "-m", "siamesedb", *args], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="Folder holding omniglot/images_evaluation.zip (or the zip).")
    parser.add_argument("--index", default=str(ROOT / "indexes" / "omniglot-demo"), help="Where to build the index.")
    parser.add_argument("--work", default=str(ROOT / "runs" / "demo"), help="Scratch folder for the support set.")
    parser.add_argument("--queries", type=int, default=400, help="Held-out drawings to score in the batch.")
    parser.add_argument("--episodes", type=int, default=400, help="Episodes of the one-shot evaluation.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.perf_counter()

    print("== 1. Omniglot evaluation set (20 alphabets the default encoder was never trained on)")
    evaluation = omniglot("evaluation", source=args.data)
    images = scan_folder(evaluation)
    print(f"{evaluation}: {len(images)} drawings of {len({im.label for im in images})} characters")

    # The support set: drawers 01 and 02 of every character. Everything else is held out as queries.
    support_dir = Path(args.work) / "support"
    shutil.rmtree(support_dir, ignore_errors=True)
    held_out = []
    for im in images:
        if drawer_of(im.path) in SUPPORT_DRAWERS:
            target = support_dir / im.label / im.path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(im.path, target)
        else:
            held_out.append(im)
    shutil.rmtree(args.index, ignore_errors=True)

    print("\n== 2. Build the index: two reference drawings per character")
    run_cli("build", str(support_dir), "--index", args.index, "--quiet")
    run_cli("calibrate", "--index", args.index)
    run_cli("info", "--index", args.index)

    rng = np.random.default_rng(args.seed)
    example = held_out[rng.integers(len(held_out))]
    print(f"\n== 3. One new drawing by drawer {drawer_of(example.path)}: {example.label}")
    run_cli("query", str(example.path), "--index", args.index, "-k", "5")
    run_cli("classify", str(example.path), "--index", args.index, "--top", "3")
    run_cli("verify", str(example.path), "--index", args.index, "--label", example.label)
    other = next(im.label for im in images if group_of(im.label) == group_of(example.label) and im.label != example.label)
    run_cli("verify", str(example.path), "--index", args.index, "--label", other)

    print(f"\n== 4. Accuracy over {args.queries} held-out drawings (drawers 03-20)")
    batch = [held_out[i] for i in rng.choice(len(held_out), size=min(args.queries, len(held_out)), replace=False)]
    with SiameseDB.open(args.index) as db:
        vectors = db.encoder.encode([im.path for im in batch])
        truth = np.asarray([im.label for im in batch], dtype=object)
        all_way = db.classify_vectors(vectors, method="prototype")
        knn = db.classify_vectors(vectors, method="knn", k=5)
        classes_by_group = defaultdict(list)
        for label in db.labels():
            classes_by_group[group_of(label)].append(label)
        within, genuine_ok, impostor_ok = [], [], []
        for vector, im in zip(vectors, batch):
            # 20-way within the query's own alphabet: its class plus 19 others of the same alphabet.
            rivals = [c for c in classes_by_group[group_of(im.label)] if c != im.label]
            episode = [im.label, *(rivals[i] for i in rng.choice(len(rivals), size=min(19, len(rivals)), replace=False))]
            within.append(db.classify_vectors(vector[None], classes=episode)[0].label == im.label)
            genuine_ok.append(db.verify_vector(vector, im.label).accepted)
            impostor_ok.append(not db.verify_vector(vector, episode[1]).accepted)
        n_classes = len(db.labels())
    print(f"{n_classes}-way classification, prototype: {np.mean([p.label for p in all_way] == truth):.1%}")
    print(f"{n_classes}-way classification, 5-NN vote: {np.mean([p.label for p in knn] == truth):.1%}")
    print(f"20-way within-alphabet classification: {np.mean(within):.1%}")
    print(f"verification: genuine accepted {np.mean(genuine_ok):.1%}, impostors (same alphabet) rejected "
          f"{np.mean(impostor_ok):.1%}")

    print("\n== 5. Lake's one-shot task: 20-way 1-shot within alphabet, drawer-disjoint support and queries")
    run_cli("eval", "oneshot", str(evaluation), "--within-group", "--way", "20", "--shot", "1",
            "--episodes", str(args.episodes), "--seed", str(args.seed), "--quiet")
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s; index at {args.index}")


if __name__ == "__main__":
    main()
