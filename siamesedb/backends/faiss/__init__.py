"""The embedded backend: items.sqlite (the truth, store.py) and vectors.faiss (a FAISS index derived from it,
index.py), behind FaissBackend (backend.py).

    backend.py       FaissBackend: the store and the FAISS file kept in step, lifecycle hooks, search
    store.py         ItemStore: the SQLite item store, one transaction per write
    index.py         VectorIndex: a FAISS index of any factory string, with ids, the (D, I) contract
    factory.py       the factory policy: valid strings, `auto`, search defaults, FAISS metric names
    structure.py     what sits inside a FAISS index (IVF, HNSW, pre-transform) and its search parameters
    tombstones.py    removed ids of indexes FAISS cannot remove from, and their sidecar file
    kernels.py       the exact CPU kernel (FAISS scan or BLAS) chosen per search
    gpu.py           where a search runs (device + engine: FAISS CPU / GPU, torch) and the GPU copy of an index
    torch_search.py  the exact torch search (torch imported only when one is made)
"""

from siamesedb.backends.faiss.backend import (
    STORE_FILE,
    TRAIN_SAMPLE,
    VECTORS_FILE,
    FaissBackend,
)
from siamesedb.backends.faiss.factory import METRIC_OF_ENCODER

__all__ = ["METRIC_OF_ENCODER", "STORE_FILE", "TRAIN_SAMPLE", "VECTORS_FILE", "FaissBackend"]
