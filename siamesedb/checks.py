"""Every argument check in one place: vectors, ids, k, search parameters, item fields, thresholds, labels.

The verification rule is checked by its registry (`rules.check_rule`), which names the rules there are.

Refused with named errors before anything is written. The front door (SiameseDB) and every backend use the same
checks, so every path refuses exactly the same inputs. numpy only.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Sequence

import numpy as np

from siamesedb.errors import DimensionMismatchError, InvalidInputError


def as_vectors(vectors: np.ndarray, dim: int, what: str = "vectors") -> np.ndarray:
    """A C-contiguous (n, dim) float32 array of finite values; a single (dim,) vector becomes (1, dim)."""
    array = np.asarray(vectors)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2:
        raise InvalidInputError(f"{what} must be a 2-D array (n, {dim}), got shape {array.shape}")
    # Integers and floats only: complex would silently lose its imaginary part, objects/strings cannot be cast.
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise InvalidInputError(f"{what} must be a real-valued numeric array, got dtype {array.dtype}")
    if array.shape[1] != dim:
        raise DimensionMismatchError(f"{what} have dimension {array.shape[1]}, the index holds {dim}-d vectors")
    array = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        raise InvalidInputError(f"{what} contain NaN or infinity")
    return array


def as_ids(ids: np.ndarray | Sequence[int], n: int | None = None, unique: bool = True) -> np.ndarray:
    """(n,) int64 ids: integers, non-negative (-1 means "no result"), no repeats when `unique`."""
    array = np.atleast_1d(np.asarray(ids))
    if array.ndim != 1:
        raise InvalidInputError(f"ids must be a 1-D array, got shape {array.shape}")
    if n is not None and len(array) != n:
        raise InvalidInputError(f"{n} vectors but {len(array)} ids")
    if len(array) == 0:
        return np.empty(0, dtype=np.int64)
    if not np.issubdtype(array.dtype, np.integer):
        raise InvalidInputError(f"ids must be integers, got dtype {array.dtype}")
    array = np.ascontiguousarray(array, dtype=np.int64)
    if array.min() < 0:
        raise InvalidInputError(f"ids must be non-negative, got {int(array.min())}")
    if unique and len(np.unique(array)) != len(array):
        raise InvalidInputError("ids repeat within the batch")
    return array


def as_k(k: int, most: int | None = None) -> int:
    """A positive integer k (numpy integers too; refuses 2.5 and "3"), at most `most` where the backend has a cap."""
    try:
        k = operator.index(k)
    except TypeError:
        raise InvalidInputError(f"k must be an integer, got {k!r}") from None
    if k < 1:
        raise InvalidInputError(f"k must be at least 1, got {k}")
    if most is not None and k > most:
        raise InvalidInputError(f"k must be at most {most} on this backend, got {k}")
    return k


def as_positive(value: object, name: str) -> int | None:
    """None, or a positive integer search parameter (nprobe, ef_search)."""
    if value is None:
        return None
    try:
        number = operator.index(value)
    except TypeError:
        raise InvalidInputError(f"{name} must be a positive integer, got {value!r}") from None
    if number < 1:
        raise InvalidInputError(f"{name} must be a positive integer, got {number}")
    return number


def as_threshold(threshold: float) -> float:
    """A caller's verification threshold as a float (accept when score >= threshold).

    NaN and infinity are not refused yet: every caller takes them today (refusing them is a change of its own).
    """
    return float(threshold)


def as_target_far(target_far: float) -> float:
    """A target false-accept rate: a number in [0, 1], returned as given (so a manifest records it unchanged)."""
    if not 0.0 <= target_far <= 1.0:
        raise InvalidInputError(f"target FAR must lie in [0, 1], got {target_far}")
    return target_far


def as_labels(labels: Sequence[str]) -> list[str]:
    """The class labels of an add, as a list: each a str with at least one non-blank character.

    A caller that takes other values as labels (numbers) passes their `str()`.
    """
    labels = list(labels)
    if any(not isinstance(label, str) or not label.strip() for label in labels):
        raise InvalidInputError("labels must be non-empty text")
    return labels


def as_label(label: str) -> str:
    """One label naming a class to act on (remove_label): a non-empty str."""
    if not isinstance(label, str) or not label:
        raise InvalidInputError("a label must be a non-empty string")
    return label


def _utf8_length(text: str) -> int:
    """Bytes of `text` in UTF-8; InvalidInputError for str holding lone surrogates (a file name in another
    encoding), which no UTF-8 store can hold."""
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        shown = os.fsencode(text).decode("utf-8", "backslashreplace")
        raise InvalidInputError(f"{shown}: not valid UTF-8 text (a file or folder name in another encoding?)") from None


def as_item_fields(
    labels: Sequence[str],
    paths: Sequence[str | os.PathLike],
    hashes: Sequence[str],
    n: int,
    max_bytes: dict[str, int] | None = None,
) -> tuple[list[str], list[str], list[str]]:
    """(labels, paths, hashes) as lists of n UTF-8 strings: labels non-empty, paths str or os.PathLike.

    `max_bytes` {"label": ..., "path": ..., "sha256": ...}: the longest UTF-8 text a backend's fields hold.
    """
    if not (len(labels) == len(paths) == len(hashes) == n):
        raise InvalidInputError(
            f"lengths differ: {n} vectors, {len(labels)} labels, {len(paths)} paths, {len(hashes)} hashes"
        )
    if any(not isinstance(label, str) or not label for label in labels):
        raise InvalidInputError("every label must be a non-empty string")
    if any(not isinstance(h, str) for h in hashes):
        raise InvalidInputError("every content hash must be a string")
    if any(not isinstance(p, (str, os.PathLike)) for p in paths):
        raise InvalidInputError("every path must be a string or a path")
    labels, hashes = list(labels), list(hashes)
    paths = [os.fspath(p) for p in paths]
    if any(isinstance(p, bytes) for p in paths):
        raise InvalidInputError("every path must be text, not bytes")
    limits = max_bytes or {}
    for field, values in (("label", labels), ("path", paths), ("sha256", hashes)):
        most = limits.get(field)
        for value in values:
            length = _utf8_length(value)
            if most is not None and length > most:
                raise InvalidInputError(f"a {field} of {length} bytes is longer than this backend holds ({most})")
    return labels, paths, hashes


def is_utf8(text: str) -> bool:
    """False for str holding lone surrogates: how Python spells file names whose bytes are not UTF-8 (no UTF-8
    store can hold them)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
