"""What a FAISS index holds inside its id map (a pre-transform, an IVF, an HNSW graph) and the per-search
parameters each part takes (nprobe, efSearch, an id selector)."""

from __future__ import annotations

from typing import Any

import faiss


def skip_polysemous_training(index: faiss.Index) -> None:
    """index_factory turns on polysemous training for PQ codes: a long annealing that only polysemous (Hamming
    filtered) search uses, which siamesedb never does. Off, IVF,PQ trains several times faster, codes unchanged."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        index = faiss.downcast_index(index.index)
    if isinstance(index, (faiss.IndexPQ, faiss.IndexIVFPQ)):
        index.do_polysemous_training = False


def index_parts(inner: faiss.Index) -> tuple[Any, Any, Any]:
    """(IndexPreTransform or None, IVF index or None, HNSW index or None) inside `inner` (the index an IndexIDMap2
    wraps, downcast); the HNSW one is an IVF's coarse quantiser where there is an IVF."""
    pre = inner if isinstance(inner, faiss.IndexPreTransform) else None
    core = faiss.downcast_index(pre.index) if pre is not None else inner
    ivf = faiss.try_extract_index_ivf(core)
    hnsw = core if isinstance(core, faiss.IndexHNSW) else None
    if ivf is not None:
        quantizer = faiss.downcast_index(ivf.quantizer)
        hnsw = quantizer if isinstance(quantizer, faiss.IndexHNSW) else None
    return pre, ivf, hnsw


def search_parameters(parts: tuple[Any, Any, Any], nprobe: int | None, ef_search: int | None,
                      selector: Any) -> tuple[Any, list]:
    """(FAISS SearchParameters for an index made of `parts` (index_parts) or None, the objects it points to).

    FAISS keeps raw pointers to nested parameters and selectors: the caller holds the list until the search ends.
    """
    if nprobe is None and ef_search is None and selector is None:
        return None, []
    pre, ivf, hnsw = parts
    keep: list = []
    if ivf is not None:
        params = faiss.SearchParametersIVF()
        params.nprobe = nprobe if nprobe is not None else int(ivf.nprobe)
        if ef_search is not None:  # an HNSW coarse quantiser (IVF..._HNSW32)
            quantizer_params = faiss.SearchParametersHNSW()
            quantizer_params.efSearch = ef_search
            params.quantizer_params = quantizer_params
            keep.append(quantizer_params)
    elif hnsw is not None:
        params = faiss.SearchParametersHNSW()
        params.efSearch = ef_search if ef_search is not None else int(hnsw.hnsw.efSearch)
    else:
        params = faiss.SearchParameters()
    if selector is not None:
        params.sel = selector
    if pre is not None:
        outer = faiss.SearchParametersPreTransform()
        outer.index_params = params
        return outer, [params, *keep]
    return params, keep
