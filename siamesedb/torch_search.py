"""Moved to siamesedb/backends/faiss/torch_search.py; these names keep old imports working."""

from siamesedb.backends.faiss.torch_search import BLOCK_ENTRIES, TorchExactSearch  # noqa: F401
