"""A synthetic colour-photo set for checking the 3-channel training path: classes told apart by colour AND shape.

Each class is a (hue, shape) pair drawn on a noisy, randomly tinted backdrop that fills the frame; its images vary in
position, size, backdrop and noise. Several classes share a shape and differ only in hue (so a grey encoder cannot
separate them), and several share a hue and differ only in shape. Classes are split into `train/` and `test/`
(disjoint classes), so `siamesedb eval oneshot OUT/test` scores classes training never saw: with `--split combos`
(the default) a quarter of the (hue, shape) pairs, on a diagonal, so every hue and every shape also occurs in
training; with `--split hues` the last quarter of the classes, whose hues training never saw.

Run:  python tools/make_colour_shapes.py --out data/colour-shapes [--classes 48] [--per-class 20] [--size 48]
"""

from __future__ import annotations

import argparse
import colorsys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("disc", "square", "triangle", "ring", "cross", "bar")


def draw(shape: str, pen: ImageDraw.ImageDraw, box: tuple[int, int, int, int], fill: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box
    if shape == "disc":
        pen.ellipse(box, fill=fill)
    elif shape == "square":
        pen.rectangle(box, fill=fill)
    elif shape == "triangle":
        pen.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "ring":
        pen.ellipse(box, outline=fill, width=max(2, (x1 - x0) // 6))
    elif shape == "cross":
        w = max(2, (x1 - x0) // 5)
        pen.rectangle(((x0 + x1) // 2 - w, y0, (x0 + x1) // 2 + w, y1), fill=fill)
        pen.rectangle((x0, (y0 + y1) // 2 - w, x1, (y0 + y1) // 2 + w), fill=fill)
    else:  # bar
        pen.rectangle((x0, (y0 + y1) // 2 - (y1 - y0) // 6, x1, (y0 + y1) // 2 + (y1 - y0) // 6), fill=fill)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="Output folder (train/ and test/ go inside).")
    parser.add_argument("--classes", type=int, default=48, help="Classes in all; the last quarter go to test/.")
    parser.add_argument("--per-class", type=int, default=20, help="Images per class.")
    parser.add_argument("--size", type=int, default=48, help="Image side in pixels.")
    parser.add_argument("--seed", type=int, default=0, help="Random seed.")
    parser.add_argument("--split", choices=("combos", "hues"), default="combos",
                        help="Test classes: unseen (hue, shape) pairs of seen hues and shapes, or unseen hues.")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    hues = args.classes // len(SHAPES) + 1
    for c in range(args.classes):
        shape, hue = SHAPES[c % len(SHAPES)], (c // len(SHAPES)) / hues
        if args.split == "hues":
            split = "test" if c >= args.classes * 3 // 4 else "train"
        else:
            split = "test" if (c % len(SHAPES) + c // len(SHAPES)) % 4 == 0 else "train"
        folder = args.out / split / f"{shape}-h{c // len(SHAPES):02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(args.per_class):
            s = args.size
            backdrop = rng.uniform(0.25, 0.85, size=3) * 255  # a random tint, not a class cue
            pixels = np.clip(backdrop + rng.normal(0, 25, (s, s, 3)), 0, 255).astype(np.uint8)
            image = Image.fromarray(pixels)
            r, g, b = colorsys.hsv_to_rgb(hue, rng.uniform(0.7, 1.0), rng.uniform(0.7, 1.0))
            side = int(rng.uniform(0.45, 0.75) * s)
            x0, y0 = rng.integers(0, s - side, size=2)
            draw(shape, ImageDraw.Draw(image), (int(x0), int(y0), int(x0) + side, int(y0) + side),
                 (int(r * 255), int(g * 255), int(b * 255)))
            image.save(folder / f"{i:03d}.png")
    print(f"wrote {args.classes} classes x {args.per_class} images to {args.out}/train and {args.out}/test")


if __name__ == "__main__":
    main()
