"""siamesedb: an embedding index and similarity search engine for one-shot image recognition.

The heavy parts (torch, faiss) load lazily, so `import siamesedb.query` stays a numpy-only import.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# Public name -> module that defines it; resolved on first attribute access (PEP 562).
_LAZY = {
    "SiameseDB": "siamesedb.db",
    "Encoder": "siamesedb.encoder",
    "VectorIndex": "siamesedb.index",
    "Hit": "siamesedb.query",
    "SearchResults": "siamesedb.query",
    "Prediction": "siamesedb.query",
    "Verification": "siamesedb.query",
    "SiameseDBError": "siamesedb.errors",
    "verify_pair": "siamesedb.db",
    "json_default": "siamesedb.query",
    "DomainWarning": "siamesedb.data",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'siamesedb' has no attribute {name!r}")
    return getattr(import_module(module), name)
