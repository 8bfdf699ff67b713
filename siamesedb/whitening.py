"""Within-class whitening of a trained cosine encoder: fit the (D, D) map on its own vectors, wrap it after the net.

Multiplying unit vectors by A^(-1/2), A the (regularised) mean within-class covariance, flattens the directions along
which items of one class already spread, so the remaining directions tell classes apart (measured in BENCHMARKS.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from siamesedb.backbones import Whitened
from siamesedb.encoder import Encoder, EncoderConfig
from siamesedb.errors import InvalidInputError

def within_class_whitening(vectors: np.ndarray, labels: Sequence[Any], ridge: float = 0.03) -> np.ndarray:
    """(N, D) unit vectors and their class labels -> the (D, D) symmetric map A^(-1/2), A = Sw + ridge * mean
    eigenvalue of Sw * I, where Sw is the mean over classes (each class weighted alike) of the class's own
    covariance. Multiplying vectors by it flattens the directions along which items of one class already spread.

    Classes with fewer than two items carry no spread and are skipped; the ridge keeps rare directions from being
    blown up by noise (the measured EERs in BENCHMARKS.md barely move between ridge 0.01 and 0.1).
    """
    vectors = np.asarray(vectors, dtype=np.float64)
    if vectors.ndim != 2:
        raise InvalidInputError(f"vectors must be (N, D), got shape {vectors.shape}")
    if ridge <= 0:
        raise InvalidInputError(f"ridge must be > 0, got {ridge}")
    _, inverse = np.unique(np.asarray(labels, dtype=object).astype(str), return_inverse=True)
    dim = vectors.shape[1]
    scatter, classes = np.zeros((dim, dim)), 0
    for c in range(inverse.max() + 1 if len(inverse) else 0):
        members = vectors[inverse == c]
        if len(members) < 2:
            continue
        centred = members - members.mean(axis=0)
        scatter += centred.T @ centred / len(members)  # (D, D) this class's covariance
        classes += 1
    if classes == 0:
        raise InvalidInputError("whitening needs at least one class with two or more items")
    scatter /= classes
    regularised = scatter + ridge * np.trace(scatter) / dim * np.eye(dim)
    eigenvalues, eigenvectors = np.linalg.eigh(regularised)
    return (eigenvectors / np.sqrt(eigenvalues)) @ eigenvectors.T  # (D, D), symmetric


def whitened_encoder(encoder: Encoder, vectors: np.ndarray, labels: Sequence[Any], ridge: float = 0.03,
                     notes: dict[str, Any] | None = None) -> Encoder:
    """A new Encoder: `encoder` followed by the within-class whitening fitted on its own `vectors` of `labels`."""
    if encoder.config.whitening:
        raise InvalidInputError("this encoder is already whitened")
    if encoder.config.metric != "cosine":
        raise InvalidInputError("whitening maps unit vectors: it applies to cosine encoders, not Euclidean ones")
    matrix = within_class_whitening(vectors, labels, ridge)  # (D, D)
    config = EncoderConfig.from_dict({**encoder.config.to_dict(), "whitening": True})
    config.notes = {**config.notes, "whitening": {"ridge": ridge, "items": len(vectors), **(notes or {})}}
    net = Whitened(encoder.net, encoder.dimension)
    with torch.no_grad():
        net.linear.weight.copy_(torch.from_numpy(matrix.T.astype(np.float32)))  # Linear computes x @ weight.T
    return Encoder(config, net=net, device=encoder.device)
