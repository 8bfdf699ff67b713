"""Every argument check in one place: vectors, ids, k, search parameters, item fields, thresholds, labels.

The verification rule is checked by its registry (`rules.check_rule`), which names the rules there are.

Refused with named errors before anything is written. The front door (SiameseDB) and every backend use the same
checks, so every path refuses exactly the same inputs. numpy only.
"""

from __future__ import annotations

import math
import numbers
import operator
import os
import re
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
    """A caller's verification threshold as a float (accept when score >= threshold): a finite real number.

    Negative thresholds are fine (a Euclidean score is minus a distance); NaN would reject everything and an
    infinity accept or reject everything, silently, so both are refused, as are text and booleans.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise InvalidInputError(f"threshold must be a number, got {threshold!r}")
    value = float(threshold)
    if not math.isfinite(value):
        raise InvalidInputError(f"threshold must be a finite number, got {value}")
    return value


def as_target_far(target_far: float) -> float:
    """A target false-accept rate: a number in [0, 1] (0: above every impostor; 1: accept all), NaN refused;
    returned as given (so a manifest records it unchanged)."""
    if isinstance(target_far, bool) or not isinstance(target_far, numbers.Real):
        raise InvalidInputError(f"target FAR must be a number in [0, 1], got {target_far!r}")
    if not 0.0 <= target_far <= 1.0:  # False for NaN too
        raise InvalidInputError(f"target FAR must lie in [0, 1], got {target_far}")
    return target_far


# ---------------------------------------------------------------------------------------- labels

# The one label rule (README "Labels"). A label is text naming a class; a folder build makes it the image's folder
# path relative to the root, so it may hold "/" between path components. Refused: no text, blank text, control
# characters (Unicode Cc: newline, tab, NUL, DEL, C1) and line / paragraph separators (they break every
# one-label-per-line listing), lone surrogates (not UTF-8), backslashes (a path separator elsewhere), and anything
# path-like beyond a relative path: a leading or trailing "/", an empty component ("a//b"), "." or "..".
_LABEL_BREAKERS = re.compile(r"[\x00-\x1f\x7f-\x9f]|([\u2028\u2029])|([\ud800-\udfff])|(\\)")
_LABEL_TROUBLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff\\]|//|^/|/$|(?:^|/)\.\.?(?:/|$)|^\s*$")


def label_problem(label: object) -> str | None:
    """What breaks the label rule in `label` (a phrase), or None when it is a valid label."""
    if not isinstance(label, str):
        return f"must be text, got {type(label).__name__}"
    if _LABEL_TROUBLE.search(label) is None:  # the usual case, in one scan
        return None
    if not label.strip():
        return "is empty"
    bad = _LABEL_BREAKERS.search(label)
    if bad is not None:
        if bad.group(1):
            return "holds a line break (U+2028 / U+2029)"
        if bad.group(2):
            return "is not valid UTF-8 text (a file or folder name in another encoding?)"
        if bad.group(3):
            return "holds a backslash (write a folder path with '/')"
        return f"holds a control character (U+{ord(bad.group(0)):04X})"
    parts = label.split("/")
    if "" in parts:
        return "has an empty path component (a leading, trailing or doubled '/')"
    if "." in parts or ".." in parts:
        return "has a '.' or '..' path component"
    return None


def shown_label(label: object) -> str:
    """A label as one printable line for a message: its repr (escapes control characters), cut at 80 characters."""
    text = repr(label)
    return text if len(text) <= 80 else text[:77] + "..."


def as_label(label: str) -> str:
    """One label, checked against the label rule (see label_problem); InvalidInputError naming it otherwise."""
    problem = label_problem(label)
    if problem is not None:
        raise InvalidInputError(f"label {shown_label(label)} {problem}")
    return label


def as_labels(labels: Sequence[str]) -> list[str]:
    """The class labels of an add, as a list, each checked by the label rule (each distinct label once)."""
    labels = list(labels)
    seen: set[str] = set()
    for label in labels:
        if isinstance(label, str) and label in seen:
            continue
        as_label(label)
        seen.add(label)
    return labels


def labels_for(label: str | Sequence[str], n: int) -> list[str]:
    """The labels of an `add` of n images: one label for all (a str) or one per image, each checked (as_labels)."""
    if isinstance(label, str):
        return [as_label(label)] * n
    if label is None or isinstance(label, (bytes, bytearray)) or not isinstance(label, (Sequence, np.ndarray)):
        raise InvalidInputError(f"label must be text (or one text per image), got {type(label).__name__}")
    labels = as_labels(label)
    if len(labels) != n:
        raise InvalidInputError(f"{n} images but {len(labels)} labels")
    return labels


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
    as_labels(labels)
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
