"""Class prototypes summed chunk by chunk (siamesedb.classes.read_class_table) equal numpy's means over all rows, on
every backend and metric (issue 29). The chunk size (`classes._ROWS`, 16,384 rows) is patched down to 7 so a small
index spans many chunks, with each class's rows spread over several of them: a chunk sum that overwrites (`=`)
instead of adding (`+=`) keeps only a class's last chunk and is caught."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from siamesedb import classes
from siamesedb.db import SiameseDB
from siamesedb.encoder import Encoder, EncoderConfig

CHUNK = 7
N, DIM = 61, 8


def milvus_ready() -> bool:
    try:
        import milvus_lite  # noqa: F401
        import pymilvus  # noqa: F401
    except ImportError:
        return False
    return True


def make(kind: str, metric: str, where) -> SiameseDB:
    torch.manual_seed(0)
    if metric == "euclidean":
        encoder = Encoder(EncoderConfig(backbone="mlp", embedding_dim=DIM, metric="euclidean"))
    else:
        encoder = Encoder(EncoderConfig(embedding_dim=DIM, width=8))
    return SiameseDB.create(where, encoder=encoder, device="cpu", backend=kind)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("kind", ["faiss", pytest.param("milvus", id="milvus-lite")])
def test_chunked_prototypes_equal_numpy_means(kind, metric, tmp_path, monkeypatch):
    if kind == "milvus" and not milvus_ready():
        pytest.skip("the Milvus backend needs pymilvus + milvus-lite: pip install siamesedb[milvus]")
    rng = np.random.default_rng(3)
    vectors = (rng.normal(size=(N, DIM)) * 2 + 1).astype(np.float32)
    labels = [f"class{c}" for c in rng.integers(0, 4, size=N)]
    labels[-1] = "late"  # a class only the last chunk holds
    monkeypatch.setattr(classes, "_ROWS", CHUNK)
    db = make(kind, metric, tmp_path / "index")
    try:
        db.add_vectors(vectors, labels)
        chunks = []
        real = db.backend.iter_rows

        def counted(*args, **kwargs):
            for ids, rows in real(*args, **kwargs):
                chunks.append(len(ids))
                yield ids, rows

        monkeypatch.setattr(db.backend, "iter_rows", counted)
        names, prototypes = db._prototypes()
        assert len(chunks) == -(-N // CHUNK) and max(chunks) == CHUNK and sum(chunks) == N, chunks
        stored = vectors / np.linalg.norm(vectors, axis=1, keepdims=True) if metric == "cosine" else vectors
        label_array = np.array(labels)
        assert names == sorted(set(labels))
        for name, prototype in zip(names, prototypes):
            mean = stored[label_array == name].astype(np.float64).mean(axis=0)
            if metric == "cosine":  # a cosine index keeps the unit-length mean direction
                mean /= np.linalg.norm(mean)
            np.testing.assert_allclose(prototype, mean, rtol=1e-5, atol=1e-6, err_msg=name)
        # every class but "late" spans several chunks, so an overwrite would have lost rows
        spans = {name: len({i // CHUNK for i in np.flatnonzero(label_array == name)}) for name in names}
        assert all(spans[name] > 1 for name in names if name != "late"), spans
    finally:
        db.close()
