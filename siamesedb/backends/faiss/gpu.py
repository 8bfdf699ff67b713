"""Where a FAISS backend's search runs: the device (siamesedb.devices, the one resolver) and the engine on it —
FAISS on the CPU, FAISS's GPU index where the installed faiss has GPU support, else the exact torch search — and
the GPU copy of an index."""

from __future__ import annotations

import faiss
import numpy as np

from siamesedb.backends.base import scores_from_squared_l2
from siamesedb.devices import resolve_device, torch_cuda_available
from siamesedb.errors import DeviceError, InvalidInputError

SEARCH_ENGINES = ("auto", "faiss", "torch")  # what `search_backend` may ask for


def faiss_has_gpu() -> bool:
    """Whether the installed faiss is a GPU build that sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and getattr(faiss, "get_num_gpus", lambda: 0)() > 0


def search_gpu_available() -> bool:
    """Whether a search can use a GPU at all: through faiss, or through torch (imported only to ask)."""
    return faiss_has_gpu() or torch_cuda_available()


def resolve_search(device: str, engine: str) -> tuple[str, str]:
    """(device "cpu" | "cuda" | "cuda:N", engine "faiss" | "faiss-gpu" | "torch") for the asked `device` and
    `engine` (one of SEARCH_ENGINES). torch is imported only when CUDA is asked about."""
    if engine not in SEARCH_ENGINES:
        raise InvalidInputError(f"search backend must be auto, faiss or torch, got {engine!r}")
    try:
        device = resolve_device(device, gpu_available=search_gpu_available)
    except DeviceError:
        if not str(device).startswith("cuda"):
            raise
        raise DeviceError(f"device {device!r} asked for, but neither faiss nor torch sees a GPU") from None
    if engine == "torch":
        return device, "torch"
    if device == "cpu":
        return device, "faiss"
    if engine == "faiss" and not faiss_has_gpu():
        raise InvalidInputError("backend 'faiss' on cuda needs a GPU build of faiss (pip install faiss-gpu-cu12)")
    return device, "faiss-gpu" if faiss_has_gpu() else "torch"


class GpuFaiss:  # pragma: no cover - needs a GPU build of faiss
    """A GPU copy of an index's inner FAISS index; positions map back to ids through the CPU index's id map, and
    tombstoned ids are fetched beyond k and dropped."""

    def __init__(self, inner: faiss.Index, position_ids: np.ndarray, removed: np.ndarray, metric: str,
                 device: str = "cuda"):
        self.resources = faiss.StandardGpuResources()
        ordinal = int(device.partition(":")[2] or 0)
        self.gpu = faiss.index_cpu_to_gpu(self.resources, ordinal, inner)
        self.position_ids = position_ids  # (ntotal,) id at each position, tombstones included
        self.removed = removed
        self.k_extra = len(removed)  # tombstones: fetch that many more, then drop them
        self.metric = metric

    def search(self, queries: np.ndarray, k: int, nprobe: int | None) -> tuple[np.ndarray, np.ndarray]:
        default = getattr(self.gpu, "nprobe", None)
        if nprobe is not None and default is not None:
            self.gpu.nprobe = nprobe
        try:
            D, P = self.gpu.search(queries, k + self.k_extra)
        finally:
            if default is not None:
                self.gpu.nprobe = default
        I = np.where(P >= 0, self.position_ids[np.maximum(P, 0)], -1)
        if self.metric == "l2":
            D = scores_from_squared_l2(D)
        if self.k_extra:
            dead = np.isin(I, self.removed)
            order = np.argsort(dead, axis=1, kind="stable")  # live results first, their order kept
            D, I = np.take_along_axis(D, order, 1), np.take_along_axis(np.where(dead, -1, I), order, 1)
        return D[:, :k], I[:, :k]
