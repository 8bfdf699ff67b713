"""Distil the five-view default encoder (the teacher) into a one-view student: one forward pass per image.

Steps (each printed as it runs; BENCHMARKS.md "One-view student" has the measurements):
1. load the teacher (`default-5view` when installed, else `default`) and Omniglot's background alphabets; hold out
   the same 96 classes as the teacher's training (val_fraction 0.1, seed 0) for validation, never the evaluation
   alphabets;
2. the teacher's five-view vectors of the training images and of their 90/180/270-degree copies (the classes the
   teacher was trained on), cached in OUT/teacher_targets.safetensors under the teacher's fingerprint;
3. `siamesedb.distill.distill`: the student starts from the teacher's weights, one view, and learns the cached
   vectors (cosine + relational + a little prototypical loss, half of each batch slightly distorted), validated on the held-out
   classes every --eval-every steps; the best validated weights are saved to OUT/student;
4. its `verify A B` threshold (tools/pair_threshold.py, the same held-out classes) is written into OUT/student;
5. with --install: the teacher is kept as siamesedb/models/default-5view and the student becomes
   siamesedb/models/default (only do this once the evaluation alphabets say the student matches the teacher).

The shipped `default-1view` is two such runs (`make distill-default`): 3,000 steps from the teacher's weights keeping
the best held-out accuracy, then 3,000 more from that student keeping the closest to the teacher:

      python tools/distill_default.py --out runs/distill-default --select accuracy
      python tools/distill_default.py --out runs/distill-long --init runs/distill-default/student \
          --cache runs/distill-default --install-as default-1view

Run:  python tools/distill_default.py [--out runs/distill-default] [--steps 3000] [--install-as NAME] [--install]
      python tools/distill_default.py --compare STUDENT TEACHER     # the evaluation alphabets, both encoders

--compare encodes Omniglot's 13,180 evaluation images with each encoder, interleaved in rounds (one warm-up, then
--rounds; median images/s of `Encoder.encode_tensors`, the call build / add / query use, all test-time views), and
scores the vectors on the episodes `siamesedb eval oneshot` draws (20-way 1-shot, 1,000 episodes, seed 0, within
alphabet and unstructured): each encoder's accuracy +- 95% CI, and the paired difference (same episodes) +- its CI.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from siamesedb.data import group_of, iter_batches, scan_folder  # noqa: E402
from siamesedb.distill import DistillConfig, distill, teacher_targets  # noqa: E402
from siamesedb.encoder import MODELS_DIR, Encoder  # noqa: E402
from siamesedb.training import _split_classes, cpu_supports_bf16  # noqa: E402

TEACHER_NAME = "default-5view"
STUDENT_NAME = "default-omniglot-1view"


def log(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)


def decode(images, preprocessing) -> torch.Tensor:
    chunks = []
    for kept, tensor, bad in iter_batches(images, preprocessing, batch_size=1024, workers=2):
        if bad:
            raise SystemExit(f"unreadable background images: {bad[:3]}")
        chunks.append(tensor)
    return torch.cat(chunks)


def cached_targets(path: Path, teacher: Encoder, images: torch.Tensor, what: str) -> torch.Tensor:
    """The teacher's vectors of `images`, from `path` when it holds them for this teacher and these images."""
    key = {"teacher": teacher.fingerprint, "what": what, "count": str(len(images)),
           "pixels": f"{float(images.double().sum()):.6e}"}
    if path.exists():
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            meta = handle.metadata() or {}
        if all(meta.get(k) == v for k, v in key.items()):
            log(f"teacher targets ({what}) from the cache {path}")
            return tensors["targets"]
    log(f"computing the teacher's vectors ({what}, {len(images)} images, "
        f"{5 if teacher.config.test_time_shift else 1} views each)")
    targets = teacher_targets(teacher, images, log=log)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"targets": targets.contiguous()}, str(path), metadata=key)
    return targets


def compare(names: list[str], rounds: int, episodes: int) -> None:
    """Images/s and one-shot accuracy of encoders on the evaluation alphabets, measured in one run."""
    import os
    import statistics

    from siamesedb.datasets import omniglot
    from siamesedb.evaluation import episode_accuracies

    encoders = {name: Encoder.load(name) for name in names}
    images = scan_folder(omniglot("evaluation"))
    first = next(iter(encoders.values()))
    assert all(e.config.preprocessing == first.config.preprocessing for e in encoders.values())
    tensors = [t for _, t, _ in iter_batches(images, first.config.preprocessing, batch_size=256)]
    labels, paths = [im.label for im in images], [str(im.path) for im in images]
    log(f"{len(images)} evaluation images; torch threads {torch.get_num_threads()}, {os.cpu_count()} cpus, "
        f"load average {os.getloadavg()[0]:.1f}")
    seconds: dict[str, list[float]] = {name: [] for name in encoders}
    vectors: dict[str, np.ndarray] = {}
    for round_ in range(rounds + 1):
        for name, encoder in encoders.items():
            started = time.perf_counter()
            vectors[name] = np.concatenate([encoder.encode_tensors(t) for t in tensors])
            if round_:
                seconds[name].append(time.perf_counter() - started)
    accuracies = {}
    for name, encoder in encoders.items():
        rate = len(images) / statistics.median(seconds[name])
        line = [f"{name} ({encoder.fingerprint}, {5 if encoder.config.test_time_shift else 1} view(s)): "
                f"{rate:.0f} images/s"]
        for within in (True, False):
            acc = episode_accuracies(vectors[name], labels, paths, way=20, shot=1, queries=1, episodes=episodes,
                                     within_group=within, seed=0)
            accuracies[name, within] = acc
            line.append(f"{'within alphabet' if within else 'unstructured'} {acc.mean():.2%} +- "
                        f"{1.96 * acc.std(ddof=1) / np.sqrt(len(acc)):.2%}")
        log(", ".join(line))
    base = names[-1]
    for name in names[:-1]:
        cosine = np.sum(vectors[name] * vectors[base], axis=1)
        speed = statistics.median(seconds[base]) / statistics.median(seconds[name])
        parts = [f"{name} vs {base}: {speed:.2f}x the images/s; cosine of their vectors mean {cosine.mean():.4f} "
                 f"min {cosine.min():.4f}"]
        for within in (True, False):
            diff = accuracies[name, within] - accuracies[base, within]
            parts.append(f"{'within alphabet' if within else 'unstructured'} {diff.mean():+.2%} +- "
                         f"{1.96 * diff.std(ddof=1) / np.sqrt(len(diff)):.2%} (paired)")
        log("; ".join(parts))
    log(f"load average at end {os.getloadavg()[0]:.1f}")


def main() -> None:
    if "--compare" in sys.argv:
        parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("--compare", nargs="+", required=True, metavar="ENCODER")
        parser.add_argument("--rounds", type=int, default=3)
        parser.add_argument("--episodes", type=int, default=1000)
        args = parser.parse_args()
        compare(args.compare, args.rounds, args.episodes)
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default=None, help=f"Teacher encoder (default: {TEACHER_NAME} if installed, else default).")
    parser.add_argument("--background", default=None, help="Omniglot's images_background folder (default: unpacked "
                        "from ../shared/data/omniglot).")
    parser.add_argument("--out", default="runs/distill-default", type=Path)
    parser.add_argument("--cache", default=None, type=Path, help="Folder of the cached teacher vectors (default: --out).")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--no-rotations", action="store_true", help="Distil on the upright characters only.")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="Student forward pass: auto = bfloat16 autocast where the CPU has native bf16.")
    parser.add_argument("--init", default=None, metavar="ENCODER",
                        help="Start the student from these weights (default: the teacher's), e.g. an earlier student.")
    parser.add_argument("--backbone", default=None, choices=("conv4", "conv4map"),
                        help="Student backbone (default: the teacher's); conv4map keeps the last block's whole map.")
    parser.add_argument("--install-as", default=None, metavar="NAME",
                        help="Also save the student as siamesedb/models/NAME (loadable by that name), e.g. default-1view.")
    parser.add_argument("--install", action="store_true",
                        help=f"Keep the teacher as models/{TEACHER_NAME} and install the student as models/default.")
    for field in dataclasses.fields(DistillConfig):
        if field.name != "bf16":
            kind = type(field.default)
            parser.add_argument("--" + field.name.replace("_", "-"), default=field.default,
                                type=(lambda text: text.lower() in ("1", "true", "yes", "on")) if kind is bool else kind)
    args = parser.parse_args()
    config = DistillConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DistillConfig) if f.name != "bf16"},
                           bf16=args.precision == "bf16" or (args.precision == "auto" and cpu_supports_bf16()))
    teacher_name = args.teacher or (TEACHER_NAME if (MODELS_DIR / TEACHER_NAME).is_dir() else "default")
    teacher = Encoder.load(teacher_name)
    if not teacher.config.test_time_shift:
        log(f"note: teacher {teacher_name} embeds one view; the student copies it")
    background = args.background
    if background is None:
        from siamesedb.datasets import omniglot

        background = str(omniglot("background"))
    log(f"teacher {teacher_name} ({teacher.fingerprint}, test_time_shift {teacher.config.test_time_shift}); "
        f"background {background}; {config}")

    images = scan_folder(background)
    names = sorted({image.label for image in images})
    train_ids, val_ids = _split_classes(names, args.val_fraction, args.seed)
    position = {name: i for i, name in enumerate(names)}
    labels = np.asarray([position[image.label] for image in images], dtype=np.int64)
    pixels = decode(images, teacher.config.preprocessing)
    held = np.isin(labels, val_ids)
    x_train, y_train = pixels[torch.from_numpy(~held)], labels[~held]
    x_val, y_val = pixels[torch.from_numpy(held)], labels[held]
    n_names = len(names)
    if not args.no_rotations:
        x_train = torch.cat([torch.rot90(x_train, k, dims=(2, 3)) for k in range(4)])
        y_train = np.concatenate([y_train + k * n_names for k in range(4)])
    groups = sorted({group_of(n) for n in names})
    group_of_class = {int(c): groups.index(group_of(names[c % n_names])) + len(groups) * (int(c) // n_names)
                      for c in np.unique(y_train)}
    log(f"{len(images)} background images, {len(train_ids)} classes for distillation "
        f"({len(y_train)} images with rotations), {len(val_ids)} held out ({len(y_val)} images)")

    cache = args.cache or args.out
    t_train = cached_targets(cache / "teacher_targets.safetensors", teacher, x_train, "train")
    t_val = cached_targets(cache / "teacher_targets_val.safetensors", teacher, x_val, "val")

    from siamesedb.distill import student_of

    student = Encoder.load(args.init) if args.init else student_of(teacher, args.backbone)
    student.config = dataclasses.replace(student.config, test_time_shift=0)
    log(f"student: {student.config.backbone}, starting from {args.init or teacher_name}")
    student, history = distill(teacher, x_train, t_train, y_train, group_of_class, config,
                               validation=(x_val, y_val, t_val), log=log, student=student)
    best_step = history[-1]["best_step"]
    first, kept = history[0], next(row for row in history if row.get("step") == best_step)
    student.config.name = STUDENT_NAME
    student.config.notes = {
        "distilled_from": {"encoder": teacher_name, "fingerprint": teacher.fingerprint,
                           "name": teacher.config.name, "test_time_shift": teacher.config.test_time_shift},
        "distill_config": dataclasses.asdict(config),
        "student_init": args.init or teacher_name,
        "distilled_on": f"{background}: {len(train_ids)} background classes (x4 rotations: "
                        f"{not args.no_rotations}), {len(val_ids)} held out (val_fraction {args.val_fraction}, "
                        f"seed {args.seed})",
        "held_out_20way_1shot": {"at_start": first.get("val_accuracy"), "kept": kept.get("val_accuracy"),
                                 "step": best_step},
        "held_out_cosine_to_teacher": {"at_start": first.get("val_cosine"), "kept": kept.get("val_cosine")},
        "tool": "tools/distill_default.py",
    }
    student._fingerprint = None
    out = args.out / "student"
    student.save(out)
    (args.out / "history.json").write_text(json.dumps(history, indent=1) + "\n")
    log(f"saved the student {student.fingerprint} to {out}")
    subprocess.run([sys.executable, str(ROOT / "tools" / "pair_threshold.py"), str(out), background,
                    "--write", str(out)], check=True)
    if args.install_as:
        Encoder.load(out).save(MODELS_DIR / args.install_as)
        log(f"installed the student as {MODELS_DIR / args.install_as}")
    if args.install:
        teacher_dir = MODELS_DIR / TEACHER_NAME
        if not teacher_dir.is_dir():
            kept = Encoder.load(teacher_name)
            kept.save(teacher_dir)  # name and weights unchanged: the same fingerprint, now under its own name
            log(f"kept the teacher {kept.fingerprint} as {teacher_dir}")
        installed = Encoder.load(out)
        installed.config.name = "default-omniglot"
        installed._fingerprint = None
        installed.save(MODELS_DIR / "default")
        log(f"installed the student {installed.fingerprint} as {MODELS_DIR / 'default'}")


if __name__ == "__main__":
    main()
