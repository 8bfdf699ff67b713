"""Moved to siamesedb/checks.py (every argument check in one place); this name keeps old imports working."""

from siamesedb.checks import _utf8_length, as_ids, as_item_fields, as_k, as_positive, as_vectors  # noqa: F401
