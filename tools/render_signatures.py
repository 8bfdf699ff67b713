"""Synthesise more SVC2004 training images from the training writers' pen trajectories (issue 17).

    python tools/render_signatures.py --out ~/.cache/siamesedb/svc2004/rendered/u01-u24-n4 --writers U01-U24 \\
        --renders 4 --png ~/.cache/siamesedb/svc2004/svc2004_png.d/svc2004

writes OUT/Uxx/genuine/UxxSyy_rK.png and OUT/Uxx/forged/UxxSyy_rK.png (the PNG set's layout: S1-S20 genuine,
S21-S40 skilled forgeries), K = 1..N renders per signature, each a perturbed trajectory drawn with a varied pen
(siamesedb/trajectory.py). With --png, the original PNGs of the same writers are linked in beside them, so OUT is a
training folder on its own: `siamesedb train OUT --groups U01-U24 ...`.

Only training writers may be used: any writer id U31 or later is refused (the protocol's unseen test writers stay
images only). The output folder must lie outside the repository (it is data, not code).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import zipfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from siamesedb.trajectory import (  # noqa: E402
    GENUINE_MAX, TestWriterError, check_training_writer, read_zip, render_augmented, save_png,
)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_RAW = REPO.parent / "shared" / "data" / "signatures_svc2004" / "svc2004_task2_raw.zip"


def parse_writers(spec: str) -> list[int]:
    """`U01-U24`, `U01,U03,U05-U07` -> writer numbers; TestWriterError if any is a test writer (U31 or later)."""
    numbers: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            a, b = part.split("-", 1)
            lo, hi = check_training_writer(a), check_training_writer(b)
            if hi < lo:
                raise ValueError(f"empty writer range {part!r}")
            numbers.extend(range(lo, hi + 1))
        else:
            numbers.append(check_training_writer(part))
    for n in numbers:
        check_training_writer(n)
    if not numbers:
        raise ValueError("no writers given")
    return sorted(set(numbers))


def render_folder(raw: Path, out: Path, writers: list[int], renders: int, seed: int = 0, strength: float = 1.0,
                  png: Path | None = None) -> int:
    """Write the renders (and links to the original PNGs when `png` is given); returns the number of images written."""
    for n in writers:
        check_training_writer(n)  # again, whatever the caller passed
    rng = np.random.default_rng(seed)
    written = 0
    with zipfile.ZipFile(raw) as zf:
        for n in writers:
            for s in range(1, 2 * GENUINE_MAX + 1):
                kind = "genuine" if s <= GENUINE_MAX else "forged"
                folder = out / f"U{n:02d}" / kind
                folder.mkdir(parents=True, exist_ok=True)
                traj = read_zip(zf, n, s)
                stem = f"U{n:02d}S{s:02d}"
                for k in range(1, renders + 1):
                    save_png(render_augmented(traj, rng, strength), folder / f"{stem}_r{k}.png")
                    written += 1
                if png is not None:
                    source = png / f"U{n:02d}" / kind / f"{stem}.png"
                    link = folder / f"{stem}.png"
                    if source.is_file() and not link.exists():
                        os.symlink(source.resolve(), link)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raw", type=Path, default=DEFAULT_RAW, help="svc2004_task2_raw.zip (default: %(default)s)")
    parser.add_argument("--out", type=Path, required=True, help="output folder, outside the repository")
    parser.add_argument("--writers", default="U01-U24", help="training writers only, U01-U30 (default: %(default)s)")
    parser.add_argument("--renders", type=int, default=4, help="renders per signature (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strength", type=float, default=1.0, help="scales every perturbation (default: 1)")
    parser.add_argument("--png", type=Path, default=None,
                        help="the PNG set's root (Uxx/genuine/...): link the originals in beside the renders")
    args = parser.parse_args(argv)
    try:
        writers = parse_writers(args.writers)
    except TestWriterError as exc:
        parser.error(str(exc))
    except ValueError as exc:
        parser.error(str(exc))
    out = args.out.expanduser().resolve()
    if out == REPO or REPO in out.parents:
        parser.error(f"{out} lies inside the repository: write generated data outside it")
    if args.renders < 1:
        parser.error("--renders must be at least 1")
    if not args.raw.is_file():
        parser.error(f"{args.raw}: not found")
    written = render_folder(args.raw, out, writers, args.renders, args.seed, args.strength,
                            args.png.expanduser() if args.png else None)
    (out / "rendered.json").write_text(json.dumps({
        "raw": str(args.raw), "writers": [f"U{n:02d}" for n in writers], "renders": args.renders, "seed": args.seed,
        "strength": args.strength, "png": str(args.png) if args.png else None, "images": written}, indent=1))
    print(f"{written} renders of {len(writers)} writers written to {out}" + (" (originals linked)" if args.png else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
