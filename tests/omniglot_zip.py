"""Real Omniglot drawings for tests: a few characters unpacked from the official evaluation zip in ../shared/data."""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

OMNIGLOT_EVALUATION = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot" / "images_evaluation.zip"


def unpack(target: Callable[[str, str, str, int], Path | None], alphabets: int = 2, characters: int = 10,
           drawers: int = 4) -> None:
    """Write the drawings 1..`drawers` of the first `characters` characters of the first `alphabets` alphabets
    (zip order) to `target(alphabet, character, filename, drawer)`, or skip one where it returns None. Skips the
    test, saying why, when the zip is absent."""
    if not OMNIGLOT_EVALUATION.exists():
        pytest.skip(f"{OMNIGLOT_EVALUATION} not present")
    chosen: dict[str, list[str]] = {}
    with zipfile.ZipFile(OMNIGLOT_EVALUATION) as archive:
        for name in sorted(archive.namelist()):
            parts = name.split("/")
            if len(parts) != 4 or not parts[3].endswith(".png"):
                continue
            _, alphabet, character, filename = parts
            if alphabet not in chosen and len(chosen) == alphabets:
                continue
            held = chosen.setdefault(alphabet, [])
            if character not in held:
                if len(held) == characters:
                    continue
                held.append(character)
            drawer = int(filename[-6:-4])
            where = target(alphabet, character, filename, drawer) if drawer <= drawers else None
            if where is not None:
                where.parent.mkdir(parents=True, exist_ok=True)
                where.write_bytes(archive.read(name))
