"""Moved to siamesedb/backends/faiss/ (index.py, factory.py, kernels.py, gpu.py); these names keep old imports working."""

from siamesedb.backends.faiss.factory import (  # noqa: F401
    AUTO,
    DEFAULT_MEMORY_BUDGET,
    FLAT_BELOW,
    HNSW_EF_LARGE_FROM,
    INDEX_METRICS,
    IVF_FLAT_BELOW,
    METRIC_OF_ENCODER,
    auto_search_defaults,
    choose_factory,
    estimated_bytes,
    ivf_lists,
)
from siamesedb.backends.faiss.gpu import faiss_has_gpu  # noqa: F401
from siamesedb.backends.faiss.index import VectorIndex  # noqa: F401
from siamesedb.backends.faiss.kernels import (  # noqa: F401
    CPU_BLAS_DATABASE_BS,
    CPU_BLAS_THRESHOLD,
    SMALL_BATCH,
    exact_kernel,
)
from siamesedb.backends.faiss.kernels import FAISS_BLAS_DEFAULT as _faiss_blas_default  # noqa: F401
from siamesedb.devices import torch_cuda_available as _torch_cuda  # noqa: F401
