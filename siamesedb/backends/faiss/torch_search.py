"""Exact top-k search in torch (inner product, or L2 as minus the distance): a chunked matrix product + top-k, on a
GPU or (for tests) the CPU.

The same (D, I) contract as VectorIndex.search: D (nq, w) float32 scores best first, I (nq, w) int64 ids, with
w = min(k, vectors held): a k beyond the collection returns what there is, never (nq, k) arrays of padding. Used where FAISS has no GPU support but torch sees a
GPU; results equal FAISS Flat's up to float rounding (ties between equal scores may order differently).
torch is imported when a TorchExactSearch is made, never when this module is: the backends stay numpy-only until a
search is asked to run on torch.
"""

from __future__ import annotations

import numpy as np

from siamesedb.checks import as_k
from siamesedb.errors import DimensionMismatchError, InvalidInputError

# Most scores held at once: a (query rows, corpus rows) float32 block of this many entries (~256 MB).
BLOCK_ENTRIES = 1 << 26


class TorchExactSearch:
    """(n, d) vectors with (n,) int64 ids held as one tensor on `device`; search is exact. `metric` as VectorIndex
    names it: "inner_product" or "l2"."""

    def __init__(self, vectors: np.ndarray, ids: np.ndarray, device: str = "cpu", block_entries: int = BLOCK_ENTRIES,
                 metric: str = "inner_product"):
        import torch

        self._torch = torch
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2:
            raise InvalidInputError(f"vectors must be a 2-D array (n, d), got shape {vectors.shape}")
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) != len(vectors):
            raise InvalidInputError(f"{len(vectors)} vectors but {len(ids)} ids")
        self.device = torch.device(device)
        self.dim = vectors.shape[1]
        self.corpus = torch.from_numpy(np.ascontiguousarray(vectors)).to(self.device)  # (n, d)
        self.ids = torch.from_numpy(ids).to(self.device)  # (n,)
        self.block_entries = int(block_entries)
        if metric not in ("inner_product", "l2"):
            raise InvalidInputError(f"unknown metric {metric!r}; choose from inner_product, l2")
        self.metric = metric
        # L2: rank by 2 q.c - |c|^2 (= |q|^2 - |q - c|^2, the same order per query), then score = -|q - c|.
        self.corpus_sq = (self.corpus * self.corpus).sum(dim=1) if metric == "l2" else None  # (n,)

    def __len__(self) -> int:
        return int(self.corpus.shape[0])

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim == 1:
            queries = queries[None, :]
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise DimensionMismatchError(f"queries have shape {queries.shape}, the corpus holds {self.dim}-d vectors")
        nq, n = len(queries), len(self)
        take = min(as_k(k), n)  # the answer's width: memory bounded by the collection, not by k
        D = np.full((nq, take), -np.inf, dtype=np.float32)
        I = np.full((nq, take), -1, dtype=np.int64)
        if nq == 0 or take == 0:
            return D, I
        with self._torch.inference_mode():
            self._search_into(D, I, queries, take)
        return D, I

    def _search_into(self, D: np.ndarray, I: np.ndarray, queries: np.ndarray, take: int) -> None:
        """Fill D[:, :take] / I[:, :take] block by block (see BLOCK_ENTRIES)."""
        torch = self._torch
        nq, n = len(queries), len(self)
        q = torch.from_numpy(np.ascontiguousarray(queries)).to(self.device)
        # Corpus chunk so one (rows, chunk) block stays under block_entries; query rows likewise.
        chunk = max(take, min(n, self.block_entries // max(1, min(nq, 1024))))
        rows = max(1, self.block_entries // chunk)
        for start in range(0, nq, rows):
            block = q[start : start + rows]  # (r, d)
            best_scores = best_pos = None
            for first in range(0, n, chunk):
                scores = block @ self.corpus[first : first + chunk].T  # (r, c)
                if self.corpus_sq is not None:
                    scores = 2 * scores - self.corpus_sq[first : first + chunk]
                s, p = torch.topk(scores, min(take, scores.shape[1]), dim=1)
                p = p + first
                if best_scores is not None:
                    # Merge with the running top-k: top-k of the (r, 2k) union is the top-k so far.
                    s, where = torch.topk(torch.cat([best_scores, s], 1), take, dim=1)
                    p = torch.gather(torch.cat([best_pos, p], 1), 1, where)
                best_scores, best_pos = s, p
            if self.corpus_sq is not None:  # back from 2 q.c - |c|^2 to minus the distance
                q_sq = (block * block).sum(dim=1, keepdim=True)
                best_scores = -torch.sqrt(torch.clamp(q_sq - best_scores, min=0))
            D[start : start + rows, :take] = best_scores.float().cpu().numpy()
            I[start : start + rows, :take] = self.ids[best_pos].cpu().numpy()
