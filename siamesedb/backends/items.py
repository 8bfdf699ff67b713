"""What every backend's items look like above the seam: the Item record and the label filter of a search."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# Which labels a search may return: None = every label; one label; or several (an empty sequence returns nothing).
LabelFilter = str | Sequence[str] | None


@dataclass(frozen=True)
class Item:
    """One stored item's metadata (its vector is read separately): id, label, source path, content hash."""

    id: int
    label: str
    path: str
    sha256: str
