"""The export file formats: write an index's items to Parquet or .npy (+ .json), read such a file back.

An export holds, for every item in id order: its stable id, label, source path, content hash (sha256) and vector
(float32 as stored: L2-normalised for a cosine index, raw for a Euclidean one), plus the encoder fingerprint that
made the vectors, so another engine (or another siamesedb index) can take the collection over without re-encoding a
single image.

Two layouts, chosen by the file's suffix:

- `FILE.parquet`: one table, columns `id` (int64), `label`, `path`, `sha256` (string), `vector`
  (fixed_size_list<float32>[D]); the metadata document (JSON) under the schema metadata key `siamesedb`.
  Written in row groups of 64k items, so memory stays bounded however large the index is.
- `FILE.npy`: the (N, D) float32 vectors, row i = item i; beside it a sidecar `FILE.json` holding the metadata
  document plus `items`: {"id": [...], "label": [...], "path": [...], "sha256": [...]}, in the same row order.

An index reads its items out through SiameseDB's read accessors (`iter_rows`, `len`); importing a file back (the
encoder, metric and id checks, skipping items held already) is SiameseDB.import_vectors / SiameseDB.import_into.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from siamesedb import __version__
from siamesedb.errors import ExportFormatError, InvalidInputError

FORMAT = "siamesedb-vectors"
FORMAT_VERSION = 1
METADATA_KEY = b"siamesedb"
SUFFIXES = (".parquet", ".npy")
_CHUNK = 65536  # items per Parquet row group / per read from the store


@dataclass
class ExportedVectors:
    """A read export: the metadata document and one row per item (vectors (N, D) float32, maybe memory-mapped)."""

    metadata: dict[str, Any]
    ids: np.ndarray
    labels: list[str]
    paths: list[str]
    hashes: list[str]
    vectors: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


def sidecar_of(path: str | os.PathLike) -> Path:
    """The metadata sidecar of an .npy export: `vectors.npy` -> `vectors.json`."""
    return Path(path).with_suffix(".json")


def _layout(path: str | os.PathLike, reading: bool = False) -> str:
    """The file's layout by its suffix (".parquet" / ".npy"); InvalidInputError saying what export writes, or what
    import reads (`reading`), otherwise."""
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIXES:
        expected = "import a .parquet or .npy export" if reading else "export to a .parquet or .npy file"
        raise InvalidInputError(f"{path}: {expected} (got {suffix or 'no suffix'!r})")
    return suffix


def _metadata(db: Any, count: int) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "siamesedb_version": __version__,
        "count": count,
        "dimension": db.dimension,
        "metric": db.index_metric,  # the manifest's name: "inner_product" or "l2"
        "normalized": db.metric == "cosine",  # Euclidean indexes hold raw vectors
        "encoder": {
            "fingerprint": db.encoder.fingerprint,
            "backbone": db.encoder.config.backbone,
            "name": db.manifest.get("encoder", {}).get("name", ""),
        },
        "source_index": str(db.path),
        "exported": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def export_vectors(db: Any, to: str | os.PathLike) -> dict[str, Any]:
    """Write every item of `db` (a SiameseDB) to `to` (.parquet or .npy + .json). Returns the metadata written.

    Written to temporary names and renamed into place, so a failed export never leaves a half file under `to`.
    """
    to = Path(to)
    layout = _layout(to)
    if not to.parent.is_dir():
        raise InvalidInputError(f"{to.parent}: folder not found")
    metadata = _metadata(db, len(db))
    rows = db.iter_rows("label, path, sha256, vector", chunk=_CHUNK)
    if layout == ".parquet":
        _write_parquet(to, metadata, rows, db.dimension)
    else:
        _write_npy(to, metadata, rows, db.dimension)
    return metadata


def _vectors_of(rows: list[tuple], dim: int) -> np.ndarray:
    blob = b"".join(r[3] for r in rows)
    return np.frombuffer(blob, dtype="<f4").reshape(len(rows), dim)


def _write_parquet(to: Path, metadata: dict[str, Any], rows: Any, dim: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("id", pa.int64()),
            ("label", pa.string()),
            ("path", pa.string()),
            ("sha256", pa.string()),
            ("vector", pa.list_(pa.float32(), dim)),
        ],
        metadata={METADATA_KEY: json.dumps(metadata).encode()},
    )
    tmp = to.with_name(f".{to.name}.{os.getpid()}.tmp")
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            for ids, chunk in rows:
                vectors = pa.FixedSizeListArray.from_arrays(pa.array(_vectors_of(chunk, dim).reshape(-1)), dim)
                columns = [pa.array(ids), *(pa.array([r[i] for r in chunk], pa.string()) for i in range(3)), vectors]
                writer.write_table(pa.Table.from_arrays(columns, schema=schema))
        os.replace(tmp, to)
    finally:
        tmp.unlink(missing_ok=True)


def _write_npy(to: Path, metadata: dict[str, Any], rows: Any, dim: int) -> None:
    count = metadata["count"]
    tmp = to.with_name(f".{to.name}.{os.getpid()}.tmp.npy")
    sidecar, sidecar_tmp = sidecar_of(to), to.with_name(f".{sidecar_of(to).name}.{os.getpid()}.tmp")
    items: dict[str, list] = {"id": [], "label": [], "path": [], "sha256": []}
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype="<f4", shape=(count, dim))
        at = 0
        for ids, chunk in rows:
            if at + len(ids) > count:
                raise ExportFormatError(f"{to}: the index grew while it was exported; export again")
            out[at : at + len(ids)] = _vectors_of(chunk, dim)
            at += len(ids)
            items["id"].extend(ids.tolist())
            for i, key in enumerate(("label", "path", "sha256")):
                items[key].extend(r[i] for r in chunk)
        out.flush()
        del out
        if at != count:
            raise ExportFormatError(f"{to}: the index changed while it was exported; export again")
        sidecar_tmp.write_text(json.dumps({**metadata, "items": items}) + "\n", encoding="utf-8")
        os.replace(tmp, to)
        os.replace(sidecar_tmp, sidecar)
    finally:
        tmp.unlink(missing_ok=True)
        sidecar_tmp.unlink(missing_ok=True)


def read_export(path: str | os.PathLike) -> ExportedVectors:
    """Read an export written by `export_vectors` (by suffix); ExportFormatError names the file and the problem."""
    path = Path(path)
    layout = _layout(path, reading=True)
    if not path.is_file():
        raise ExportFormatError(f"{path}: no such file")
    exported = _read_parquet(path) if layout == ".parquet" else _read_npy(path)
    meta = exported.metadata
    n, dim = len(exported.ids), int(meta["dimension"])
    if exported.vectors.shape != (n, dim) or not (len(exported.labels) == len(exported.paths) == len(exported.hashes) == n):
        raise ExportFormatError(f"{path}: columns disagree ({n} ids, vectors of shape {exported.vectors.shape}, "
                                f"{len(exported.labels)} labels; metadata says {dim}-d)")
    if meta.get("count") is not None and int(meta["count"]) != n:
        raise ExportFormatError(f"{path}: holds {n} items, its metadata says {meta['count']} (truncated?)")
    return exported


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata document of an export without reading its rows (a Parquet footer, or the .npy's sidecar)."""
    path = Path(path)
    if _layout(path, reading=True) == ".npy":
        return read_export(path).metadata  # the sidecar holds the rows too: read and checked together
    if not path.is_file():
        raise ExportFormatError(f"{path}: no such file")
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        raw = (pq.read_schema(path).metadata or {}).get(METADATA_KEY)
        metadata = json.loads(raw) if raw is not None else None
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise ExportFormatError(f"{path}: unreadable Parquet file ({str(exc).splitlines()[0] if str(exc) else exc})") from None
    return _check_metadata(path, metadata)


def _check_metadata(path: Path, metadata: Any) -> dict[str, Any]:
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise ExportFormatError(f"{path}: not a siamesedb vectors export (no {FORMAT!r} metadata)")
    if int(metadata.get("format_version", 0)) > FORMAT_VERSION:
        raise ExportFormatError(f"{path}: written by a newer siamesedb (export format {metadata['format_version']})")
    if not isinstance(metadata.get("dimension"), int) or not isinstance(metadata.get("encoder"), dict):
        raise ExportFormatError(f"{path}: metadata lacks the dimension or the encoder")
    return metadata


def _read_parquet(path: Path) -> ExportedVectors:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise ExportFormatError(f"{path}: unreadable Parquet file ({str(exc).splitlines()[0] if str(exc) else exc})") from None
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    try:
        metadata = json.loads(raw) if raw is not None else None
    except ValueError:
        metadata = None
    metadata = _check_metadata(path, metadata)
    missing = {"id", "label", "path", "sha256", "vector"} - set(table.column_names)
    if missing:
        raise ExportFormatError(f"{path}: missing columns {', '.join(sorted(missing))}")
    vector_column = table.column("vector").combine_chunks()
    if not pa.types.is_fixed_size_list(vector_column.type) or vector_column.null_count:
        raise ExportFormatError(f"{path}: column 'vector' must be fixed_size_list<float> without nulls")
    dim = vector_column.type.list_size
    vectors = vector_column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dim)
    return ExportedVectors(
        metadata=metadata,
        ids=table.column("id").to_numpy().astype(np.int64, copy=False),
        labels=table.column("label").to_pylist(),
        paths=[p or "" for p in table.column("path").to_pylist()],
        hashes=[h or "" for h in table.column("sha256").to_pylist()],
        vectors=vectors,
    )


def _read_npy(path: Path) -> ExportedVectors:
    sidecar = sidecar_of(path)
    if not sidecar.is_file():
        raise ExportFormatError(f"{sidecar}: missing (an .npy export keeps its ids, labels and metadata there)")
    try:
        document = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ExportFormatError(f"{sidecar}: unreadable sidecar ({exc})") from None
    metadata = _check_metadata(sidecar, document)
    items = document.get("items")
    if not isinstance(items, dict) or any(not isinstance(items.get(k), list) for k in ("id", "label", "path", "sha256")):
        raise ExportFormatError(f"{sidecar}: 'items' must hold the lists id, label, path and sha256")
    try:
        vectors = np.load(path, mmap_mode="r", allow_pickle=False)  # never unpickles; memory-mapped, not read
    except (OSError, ValueError) as exc:
        raise ExportFormatError(f"{path}: unreadable .npy file ({exc})") from None
    if vectors.ndim != 2 or not np.issubdtype(vectors.dtype, np.floating):
        raise ExportFormatError(f"{path}: expected an (N, D) float array, got {vectors.dtype} of shape {vectors.shape}")
    metadata = {k: v for k, v in metadata.items() if k != "items"}
    try:
        ids = np.asarray(items["id"], dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        raise ExportFormatError(f"{sidecar}: ids must be integers") from None
    return ExportedVectors(metadata, ids, [str(x) for x in items["label"]], [str(x) for x in items["path"]],
                           [str(x) for x in items["sha256"]], vectors)


__all__ = ["ExportedVectors", "export_vectors", "read_export", "read_metadata", "sidecar_of"]
