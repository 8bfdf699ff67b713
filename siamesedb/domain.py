"""What images look like, and whether new ones look like an encoder's training images: the domain profile of a
sample (aspect, size, colour, background, mid-tones) and the out-of-domain warning."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from siamesedb.errors import ImageLoadError
from siamesedb.images import load_image


class DomainWarning(UserWarning):
    """Images look unlike what the encoder was trained on: its vectors (and thresholds) may mean little."""


def image_profile(sources: Sequence[Any], limit: int = 64) -> dict[str, Any]:
    """What a sample of images looks like: median aspect (width / height) and size, the share in colour, and the
    share on a light background (ink on paper) -- enough to tell glyphs, signatures and photos apart.

    Reads at most `limit` images (spread evenly over `sources`); unreadable ones are left out. {} when none reads.
    """
    step = max(1, len(sources) // max(1, limit))
    aspects, widths, heights, colour, light, mid = [], [], [], [], [], []
    for source in list(sources)[::step][:limit]:
        try:
            image = load_image(source)
        except ImageLoadError:
            continue
        widths.append(image.width)
        heights.append(image.height)
        aspects.append(image.width / image.height)
        small = np.asarray(image.resize((32, 32)), dtype=np.float32)
        colour.append(small.ndim == 3 and float(np.abs(small - small.mean(axis=2, keepdims=True)).mean()) > 8.0)
        light.append(float(small.mean()) > 127.5)
        grey = small.mean(axis=2) if small.ndim == 3 else small
        mid.append(float(np.mean((grey > 48) & (grey < 208))))  # photos: mostly mid-tones; ink on paper: few
    if not aspects:
        return {}
    return {
        "images": len(aspects),
        "aspect": round(float(np.median(aspects)), 3),
        "size": [int(np.median(widths)), int(np.median(heights))],
        "colour": round(float(np.mean(colour)), 3),
        "light_background": round(float(np.mean(light)), 3),
        "mid_tones": round(float(np.median(mid)), 3),
    }


def profile_mismatch(trained: dict[str, Any], seen: dict[str, Any]) -> str | None:
    """Why images with profile `seen` look out of domain for an encoder trained on `trained`, or None."""
    if not trained or not seen:
        return None
    reasons = []
    ratio = seen["aspect"] / trained["aspect"]
    if ratio > 1.5 or ratio < 1 / 1.5:
        reasons.append(f"aspect {seen['aspect']:.2f} (trained on {trained['aspect']:.2f})")
    if abs(seen["colour"] - trained["colour"]) > 0.5:
        kind = {True: "colour", False: "grey"}
        reasons.append(f"{kind[seen['colour'] > 0.5]} images (trained on {kind[trained['colour'] > 0.5]})")
    if abs(seen["light_background"] - trained["light_background"]) > 0.5:
        kind = {True: "light", False: "dark"}
        reasons.append(f"{kind[seen['light_background'] > 0.5]} backgrounds "
                       f"(trained on {kind[trained['light_background'] > 0.5]})")
    if "mid_tones" in trained and "mid_tones" in seen and abs(seen["mid_tones"] - trained["mid_tones"]) > 0.35:
        kind = {True: "photo-like (mostly mid-tones)", False: "drawing-like (ink and paper)"}
        reasons.append(f"{kind[seen['mid_tones'] > trained['mid_tones']]} images")
    return ", ".join(reasons) or None
