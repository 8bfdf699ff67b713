"""Moved to siamesedb/backends/faiss/store.py (Item to siamesedb/backends/items.py, _is_utf8 to checks.is_utf8);
these names keep old imports working."""

from siamesedb.backends.faiss.store import SCHEMA_VERSION, ItemStore  # noqa: F401
from siamesedb.backends.items import Item  # noqa: F401
from siamesedb.checks import is_utf8 as _is_utf8  # noqa: F401
