"""An index folder's layout and its manifest: reading and checking the manifest, writing it atomically.

    manifest.json  format version, dimension, metric, backend, factory, encoder fingerprint, calibrations
    encoder/       the encoder that made the vectors (config.json + model.safetensors)
    ...            the backend's own files, named by the backend (siamesedb/backends/): items.sqlite and
                   vectors.faiss for the embedded one, milvus.db for Milvus Lite (a server keeps nothing here)

The manifest is written last when an index is created: a folder without one is a creation cut short.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from siamesedb import __version__
from siamesedb.backends import BACKEND_NAMES, DEFAULT_BACKEND
from siamesedb.errors import (
    CorruptIndexError,
    DimensionMismatchError,
    EncoderMismatchError,
)
from siamesedb.files import fsync_dir, write_atomic

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
ENCODER_DIR = "encoder"
DEFAULT_HOME = Path("indexes")
BACKENDS = BACKEND_NAMES
# The manifest's "metric" field keeps FAISS's names (the on-disk format); everything above the backends speaks
# siamesedb.scoring's vocabulary ("cosine" / "euclidean"). These two functions are the one place that converts.
_MANIFEST_METRIC = {"cosine": "inner_product", "euclidean": "l2"}


def manifest_metric(metric: str) -> str:
    """"cosine" -> "inner_product", "euclidean" -> "l2": the manifest's name of a siamesedb metric."""
    return _MANIFEST_METRIC[metric]


def metric_from_manifest(value: str) -> str:
    """The manifest's "inner_product" / "l2" -> "cosine" / "euclidean" (CorruptIndexError for anything else)."""
    for metric, recorded in _MANIFEST_METRIC.items():
        if recorded == value:
            return metric
    raise CorruptIndexError(f"unknown metric {value!r} in the manifest")


def write_json_atomic(path: Path, document: dict[str, Any]) -> None:
    """Write, fsync, rename, fsync the folder: a crash leaves the old document or the new one, never half of one."""
    write_atomic(path, (json.dumps(document, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    fsync_dir(path.parent)


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of the index at `path`, checked for the fields open() relies on (CorruptIndexError otherwise)."""
    manifest_path = path / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if not isinstance(manifest, dict):
            raise ValueError(f"a JSON {type(manifest).__name__}, not an object")
        int(manifest["dimension"])
        int(manifest["format_version"])
        if not isinstance(manifest.get("encoder", {}), dict) or not isinstance(manifest.get("factory", "Flat"), str):
            raise ValueError("'encoder' must be an object and 'factory' a string")
        if not isinstance(manifest.get("calibration") or {}, dict):
            raise ValueError("'calibration' must be an object")
        if manifest.get("backend", DEFAULT_BACKEND) not in BACKENDS:
            raise ValueError(f"unknown backend {manifest.get('backend')!r}")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CorruptIndexError(f"{manifest_path}: unreadable manifest ({exc})") from None
    return manifest


def read_checked(path: Path, device: str = "auto") -> tuple[dict[str, Any], Any]:
    """(manifest, encoder) of the index at `path`, checked against each other: format version, the encoder's
    fingerprint, dimension and metric (CorruptIndexError, EncoderMismatchError, DimensionMismatchError)."""
    from siamesedb.encoder import Encoder

    manifest = read_manifest(path)
    dim = int(manifest["dimension"])
    version = int(manifest["format_version"])
    if version > FORMAT_VERSION:
        raise CorruptIndexError(
            f"{path}: written by a newer siamesedb (format {version}; this one reads up to {FORMAT_VERSION})"
        )
    encoder = Encoder.load(path / ENCODER_DIR, device=device)
    expected = manifest.get("encoder", {}).get("fingerprint")
    if expected and encoder.fingerprint != expected:
        raise EncoderMismatchError(
            f"{path / ENCODER_DIR}: encoder fingerprint {encoder.fingerprint} differs from the manifest's {expected}"
        )
    if encoder.dimension != dim:
        raise DimensionMismatchError(f"{path}: encoder makes {encoder.dimension}-d vectors, manifest says {dim}")
    metric = manifest.get("metric", "inner_product")
    if manifest_metric(encoder.config.metric) != metric:
        raise EncoderMismatchError(
            f"{path / ENCODER_DIR}: a {encoder.config.metric} encoder, but the manifest's metric is {metric}"
        )
    return manifest, encoder


def new_manifest(dimension: int, metric: str, factory: str, requested: str, encoder: dict[str, Any],
                 backend: str = "faiss", **fields: Any) -> dict[str, Any]:
    """The manifest of a new, empty index (backend-specific `fields` added as given)."""
    return {
        "format_version": FORMAT_VERSION,
        "siamesedb_version": __version__,
        "dimension": dimension,
        "metric": metric,  # "inner_product" (cosine encoders) or "l2" (Euclidean ones)
        "backend": backend,
        "factory": factory,
        "factory_requested": requested,
        "encoder": encoder,
        "calibration": None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **fields,
    }


def remove_temporaries(path: Path) -> None:
    """Under the write lock: delete the temporary files a writer killed mid-write left (manifest, FAISS, encoder)."""
    for folder in (path, path / ENCODER_DIR):
        for leftover in folder.glob("*.tmp"):
            try:
                leftover.unlink()
            except OSError:
                pass
