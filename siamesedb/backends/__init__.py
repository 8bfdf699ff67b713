"""The vector-backend seam: the registry of backends, and the contract every one keeps (base.py).

Two backends, each a subpackage: `faiss` (the embedded default: items.sqlite as the truth + a FAISS file derived
from it, exact torch search on a GPU) and `milvus` (a Milvus collection: Milvus Lite in one file, or a Milvus server
/ cluster). A new backend is one new subpackage whose class keeps the VectorBackend protocol (inheriting BackendBase
for the lifecycle defaults), one line in BACKENDS, and a pass of the contract suite (tests/test_backends_contract.py).

Importing this package imports no backend: a class is imported when first asked for (faiss, pymilvus are heavy).
Backends are numpy-only: none imports torch at module level (a query server or a Ray writer must not pay for it).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from siamesedb.backends.base import BackendBase, VectorBackend, scores_from_squared_l2
from siamesedb.backends.items import Item, LabelFilter
from siamesedb.errors import InvalidInputError

__all__ = ["BACKENDS", "BACKEND_NAMES", "DEFAULT_BACKEND", "BackendBase", "Item", "LabelFilter", "VectorBackend", "backend_class",
           "check_factory", "create_backend", "open_backend", "resolve_factory", "scores_from_squared_l2"]

# name (the manifest's "backend", the CLI's --backend) -> "module:class", imported on first use.
BACKENDS = {
    "faiss": "siamesedb.backends.faiss:FaissBackend",
    "milvus": "siamesedb.backends.milvus:MilvusBackend",
}
BACKEND_NAMES = tuple(BACKENDS)
DEFAULT_BACKEND = "faiss"  # what a manifest without a "backend" field was made with


def backend_class(name: str) -> type[VectorBackend]:
    """The class registered as `name` (InvalidInputError for a name not in BACKENDS)."""
    if name not in BACKENDS:
        raise InvalidInputError(f"unknown backend {name!r}; choose from {', '.join(BACKEND_NAMES)}")
    module, _, attribute = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), attribute)


def check_factory(kind: str, factory: str, dimension: int) -> None:
    """Refuse an unknown backend, or an index type the backend cannot build, before anything is written."""
    backend_class(kind).check_factory(factory, dimension)


def resolve_factory(kind: str, factory: str, dimension: int, expected_items: int = 0,
                    memory_budget: int | None = None) -> tuple[str, dict[str, int]]:
    """(index type, starting search defaults) backend `kind` builds for `factory` ("auto": chosen for
    `expected_items` vectors within `memory_budget` bytes), checked."""
    return backend_class(kind).resolve_factory(factory, dimension, expected_items or 0, memory_budget)


def create_backend(kind: str, path: Path, dimension: int, metric: str, factory: str, search_defaults: dict[str, int],
                   backend_options: Mapping[str, Any] | None = None) -> tuple[VectorBackend, dict[str, Any]]:
    """(a new, empty backend for the index folder `path`, the manifest fields that name it). `metric` is the
    encoder's ("cosine" / "euclidean"); `factory` resolved (resolve_factory); `backend_options` the backend's
    options (VectorBackend says which; a backend ignores the others). Under the caller's write lock."""
    return backend_class(kind).create(Path(path), dimension, metric, factory, search_defaults, backend_options or {})


def open_backend(path: Path, manifest: dict[str, Any], metric: str,
                 backend_options: Mapping[str, Any] | None = None) -> VectorBackend:
    """The backend the manifest of the index folder `path` names (`metric`: the encoder's)."""
    kind = manifest.get("backend", DEFAULT_BACKEND)
    return backend_class(kind).open(Path(path), manifest, metric, backend_options or {})
