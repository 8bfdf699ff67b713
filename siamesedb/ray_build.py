"""`siamesedb build FOLDER --index DIR --ray`: the build pipeline on Ray Data, for ingestion at scale.

Stages (issue 18 part 3):
  1. list:   the driver scans FOLDER (`data.scan_folder`, labels as in the in-process build) and looks up what the
             index already holds: its (label, sha256) pairs and the hash of each (label, path) it stored.
  2. read:   Ray tasks (CPU) read each file once, hash those bytes and decode + preprocess them
             (`data.hash_and_decode`, the very function of the in-process build); a file whose (label, path) is
             held with the same hash is not decoded again.
  3. encode: a pool of encoder actors (`ActorPoolStrategy`): one per GPU, `num_gpus=1`, where Ray reports GPUs;
             a few CPU actors otherwise. The weights travel through Ray's object store (a remote node needs
             siamesedb installed, not the index folder), and each actor checks the encoder's fingerprint.
  4. write:  the driver commits batches through `SiameseDB.add_vectors` into the index's backend, skipping
             (label, sha256) pairs already held or seen earlier in this build, under the index's write lock for the
             whole build, as the in-process build.

Resumable like the in-process build: every committed batch is durable, and a rerun skips what is held, so a killed
build resumes without loss or duplicates. Blocks keep their order (`preserve_order`), so a fresh build assigns the
same ids, labels, paths and vectors (within float rounding) as `SiameseDB.build` on the same folder and device.

Install: `pip install siamesedb[ray]`. Without an address a local Ray is started (and shut down afterwards);
`address="auto"` or `ray://host:10001` joins a running cluster, whose nodes must be able to read FOLDER's paths
(a shared or identical file system: the driver sends paths, not bytes).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from siamesedb.data import LabelledImage, hash_and_decode, scan_folder
from siamesedb.db import BuildReport, SiameseDB
from siamesedb.encoder import DEFAULT_ENCODER, Encoder
from siamesedb.errors import EncoderError, EncoderMismatchError, IndexExistsError, InvalidInputError
from siamesedb.ingest import absolute, split_unindexable  # the in-process build's rules, shared
from siamesedb.layout import DEFAULT_HOME, MANIFEST_FILE
WRITE_ROWS = 4096  # new rows per add_vectors call: one commit each (the FAISS file is saved once, at the end)
DECODE_TASK_MEMORY = 384 << 20  # bytes reserved per read + decode task (its worker process: about 250 MB measured)
# Row states in the pipeline's `status` column.
NEW, HELD, SKIPPED = 0, 1, 2


def ray_available() -> bool:
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError:
        return False
    return True


def _import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise InvalidInputError("--ray needs Ray Data: pip install 'siamesedb[ray]' (or pip install 'ray[data]')") from None
    return ray


# ------------------------------------------------------------------------------------------------ driver helpers


def _create_or_open(path: Path, encoder: Any, factory: str, device: str, expected_items: int,
                    lock_timeout: float | None, backend: str, backend_options: dict[str, Any]) -> SiameseDB:
    """The index at `path`: opened when it exists (refusing another encoder than its own; its manifest names its
    backend), else created on `backend` with `backend_options`."""
    if not (path / MANIFEST_FILE).exists():
        try:
            return SiameseDB.create(path, encoder=encoder, factory=factory, device=device,
                                    expected_items=expected_items, lock_timeout=lock_timeout, backend=backend,
                                    backend_options=backend_options)
        except IndexExistsError:
            if not (path / MANIFEST_FILE).exists():
                raise
            # another build created it meanwhile: resume into it
    db = SiameseDB.open(path, device=device, lock_timeout=lock_timeout)
    if not isinstance(encoder, Encoder) and encoder != DEFAULT_ENCODER:
        other = Encoder.load(encoder, device="cpu")
        if other.fingerprint != db.encoder.fingerprint:
            raise EncoderMismatchError(
                f"{path}: index was built with encoder {db.encoder.fingerprint}, not {other.fingerprint}"
            )
    return db


def _held_keys(db: SiameseDB) -> tuple[set[tuple[str, str]], dict[tuple[str, str], str]]:
    """(label, sha256) pairs the index holds, and {(label, path): sha256}: the in-process build's resume rule."""
    return db.backend.known_label_hashes(), db.backend.label_path_hashes()


# ------------------------------------------------------------------------------------------------ Ray stages


def _read_hash_decode(batch: dict[str, np.ndarray], prep: dict[str, Any]) -> dict[str, np.ndarray]:
    """Ray task: read, hash, decode one block. Every input row comes out once, with its status; decoded pixels
    travel as float32 bytes (b"" for held and skipped rows, which are never decoded or encoded)."""
    paths = [str(p) for p in batch["path"]]
    expected = [str(e) or None for e in batch["expected"]]
    array, kept, hashes, held, skipped = hash_and_decode(paths, expected, prep)
    n = len(paths)
    status = np.full(n, SKIPPED, dtype=np.int8)
    digests = np.array([""] * n, dtype=object)
    reasons = np.array([""] * n, dtype=object)
    pixels = np.array([b""] * n, dtype=object)
    for j, i in enumerate(kept):
        status[i] = NEW
        digests[i] = hashes[j]
        pixels[i] = np.ascontiguousarray(array[j], dtype=np.float32).tobytes()
    for i in held:
        status[i] = HELD
    for i, reason in skipped:
        reasons[i] = reason
    return {"pos": np.asarray(batch["pos"], dtype=np.int64), "status": status, "sha256": digests,
            "reason": reasons, "pixels": pixels}


class _EncodeActor:
    """Ray actor: the index's encoder (weights from the object store), fingerprint-checked; encodes NEW rows."""

    def __init__(self, config: dict[str, Any], state: Any, fingerprint: str, device: str, threads: int | None,
                 batch_size: int):
        import torch

        from siamesedb.encoder import EncoderConfig, resolve_device

        if threads:
            torch.set_num_threads(threads)
        encoder = Encoder(EncoderConfig.from_dict(config), device="cpu")
        encoder.net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=True)
        encoder.device = resolve_device(device)
        encoder.net.to(encoder.device)
        encoder.net.eval()
        if encoder.fingerprint != fingerprint:
            raise EncoderError(f"encoder actor: fingerprint {encoder.fingerprint}, expected {fingerprint}")
        prep = encoder.config.preprocessing
        self.shape = (prep.channels, *prep.size)
        self.encoder = encoder
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        status = np.asarray(batch["status"])
        new = np.flatnonzero(status == NEW)
        vectors = np.zeros((len(status), self.encoder.dimension), dtype=np.float32)
        if len(new):
            stacked = np.stack([np.frombuffer(batch["pixels"][j], dtype=np.float32).reshape(self.shape) for j in new])
            vectors[new] = self.encoder.encode_tensors(torch.from_numpy(stacked), batch_size=self.batch_size)
        return {"pos": batch["pos"], "status": status, "sha256": batch["sha256"], "reason": batch["reason"],
                "vector": vectors}


def _encoder_plan(ray: Any, device: str, actors: int | None, threads: int | None) -> dict[str, Any]:
    """How many encoder actors, on what: one per GPU (num_gpus=1) where the cluster has GPUs and device allows;
    else CPU actors, one per 8 CPUs (at least one), each running torch on its share of the rest."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    cpus = max(1, int(resources.get("CPU", 1)))
    if device != "cpu" and gpus > 0 and not device.startswith("mps"):
        return {"actors": actors or gpus, "num_gpus": 1, "num_cpus": 1, "device": "cuda", "threads": threads}
    if device not in ("auto", "cpu"):
        raise InvalidInputError(f"--ray: device {device!r} asked for, but the Ray cluster reports no GPUs")
    count = actors or max(1, cpus // 8)
    # Each CPU actor reserves one CPU (the rest stay free for the read + decode tasks) and runs torch on its share
    # of the cores: on a small machine that share overlaps the decoding tasks, as the in-process build's lanes do.
    return {"actors": count, "num_gpus": 0, "num_cpus": 1, "device": "cpu",
            "threads": threads or max(1, cpus // count)}


# ------------------------------------------------------------------------------------------------ the build


def build_with_ray(
    folder: str | os.PathLike,
    path: str | os.PathLike | None = None,
    encoder: str | os.PathLike | Encoder = DEFAULT_ENCODER,
    factory: str = "Flat",
    device: str = "auto",
    batch_size: int = 256,
    address: str | None = None,
    actors: int | None = None,
    encoder_threads: int | None = None,
    write_rows: int = WRITE_ROWS,
    progress: bool = False,
    lock_timeout: float | None = None,
    backend: str = "faiss",
    milvus_uri: str | None = None,
    backend_options: dict[str, Any] | None = None,
    _after_write: Callable[[int], None] | None = None,
) -> SiameseDB:
    """`SiameseDB.build` on Ray Data: same index, same resume rule, same `db.last_report` (a BuildReport).

    `address`: None starts a local Ray (unless one is already initialised in this process, or $RAY_ADDRESS names a
    cluster), "auto" or "ray://host:10001" joins a cluster. `actors`: encoder actors (default: one per GPU, else one
    per 8 CPUs). `write_rows`: new images per commit.
    `backend` / `backend_options` / `milvus_uri`: for a new index, as `SiameseDB.create` (an existing one keeps
    its own).
    `_after_write(rows committed so far)` is a test hook called after each commit.
    """
    if batch_size < 1:
        raise InvalidInputError(f"batch size must be positive, got {batch_size}")
    if write_rows < 1:
        raise InvalidInputError(f"write_rows must be positive, got {write_rows}")
    ray = _import_ray()
    folder = Path(folder)
    scanned = scan_folder(folder)  # FolderError for a missing / empty folder, before anything is created
    images, unstorable = split_unindexable(scanned)
    images = absolute(images)  # paths are stored absolute, as the in-process build stores them
    path = Path(path) if path is not None else DEFAULT_HOME / folder.resolve().name
    options = {**(backend_options or {}), **({"uri": milvus_uri} if milvus_uri is not None else {})}
    db = _create_or_open(path, encoder, factory, device, len(images), lock_timeout, backend, options)
    db.check_domain([image.path for image in images])

    started_ray = False
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=True, configure_logging=True)
        started_ray = True
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # "Progress bars disabled": ours is the driver's tqdm bar (Ray Data's per-operator bars are off on purpose).
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    try:
        # The whole build holds the index's write lock, as the in-process build does: the held set read below stays
        # true until the last commit, so two builds of one folder cannot both add a file.
        with db.bulk_writes():  # the FAISS file and manifest are saved once, at the end
            report = _run(ray, db, images, device, batch_size, actors, encoder_threads, write_rows, progress,
                          _after_write)
    finally:
        if started_ray:
            ray.shutdown()
    report.scanned += len(unstorable)
    report.skipped[:0] = unstorable
    db.last_report = report
    return db


def _run(ray: Any, db: SiameseDB, images: list[LabelledImage], device: str, batch_size: int, actors: int | None,
         threads: int | None, write_rows: int, progress: bool,
         after_write: Callable[[int], None] | None) -> BuildReport:
    started = time.perf_counter()
    report = BuildReport(scanned=len(images))
    held, by_path = _held_keys(db)
    expected = [by_path.get((image.label, str(image.path))) or "" for image in images]
    del by_path
    if not images:
        report.seconds = time.perf_counter() - started
        return report

    # This process's Ray Data settings, put back afterwards: blocks in order (the in-process build's order, so the
    # same ids on a fresh index), no per-operator progress bars (the driver's tqdm bar is the progress).
    context = ray.data.DataContext.get_current()
    saved = (context.execution_options.preserve_order, context.enable_progress_bars)
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    try:
        return _stream(ray, db, images, expected, held, report, started, device, batch_size, actors, threads,
                       write_rows, progress, after_write)
    finally:
        context.execution_options.preserve_order, context.enable_progress_bars = saved


def _stream(ray: Any, db: SiameseDB, images: list[LabelledImage], expected: list[str], held: set[tuple[str, str]],
            report: BuildReport, started: float, device: str, batch_size: int, actors: int | None,
            threads: int | None, write_rows: int, progress: bool,
            after_write: Callable[[int], None] | None) -> BuildReport:
    from tqdm import tqdm

    enc = db.encoder
    plan = _encoder_plan(ray, device, actors, threads)
    # The weights (a few MB) go with the actors' constructor arguments: no node needs the index folder. (Ray logs a
    # "constructor arguments in the object store" line for Ray Data's actors whatever is passed: harmless here.)
    state = {k: v.detach().cpu().contiguous().numpy() for k, v in enc.net.state_dict().items()}
    blocks = max(1, -(-len(images) // batch_size))
    dataset = ray.data.from_items(
        [{"pos": i, "path": str(image.path), "expected": expected[i]} for i, image in enumerate(images)],
        override_num_blocks=blocks,
    )
    dataset = dataset.map_batches(
        _read_hash_decode, fn_kwargs={"prep": enc.config.preprocessing.to_dict()}, batch_size=batch_size,
        batch_format="numpy", num_cpus=1,
        # A memory reservation per task (a block of files and their pixels) also keeps this stage apart from the
        # encoder stage: with equal remote arguments Ray Data fuses the two into the encoder actors, and then only as
        # many blocks as there are actors are read at a time (on GPUs: decoding on the GPU workers' CPUs alone).
        memory=DECODE_TASK_MEMORY,
    )
    dataset = dataset.map_batches(
        _EncodeActor,
        fn_constructor_kwargs={"config": enc.config.to_dict(), "state": state, "fingerprint": enc.fingerprint,
                               "device": plan["device"], "threads": plan["threads"], "batch_size": batch_size},
        compute=ray.data.ActorPoolStrategy(size=plan["actors"]),
        batch_size=batch_size, batch_format="numpy", num_cpus=plan["num_cpus"], num_gpus=plan["num_gpus"] or None,
    )

    bar = tqdm(total=len(images), unit="img", disable=not progress, desc="build (ray)")
    pending: dict[str, list] = {"vectors": [], "labels": [], "paths": [], "hashes": []}

    def commit() -> None:
        if not pending["labels"]:
            return
        vectors = np.concatenate(pending["vectors"])
        db.add_vectors(vectors, pending["labels"], paths=pending["paths"], hashes=pending["hashes"])
        report.added += len(pending["labels"])
        for column in pending.values():
            column.clear()
        if after_write is not None:
            after_write(report.added)

    try:
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
            status, positions = batch["status"], batch["pos"]
            rows: list[int] = []
            for row, (pos, state_) in enumerate(zip(positions, status)):
                image = images[int(pos)]
                if state_ == HELD:
                    report.already_indexed += 1
                elif state_ == SKIPPED:
                    report.skipped.append((str(image.path), str(batch["reason"][row])))
                else:
                    key = (image.label, str(batch["sha256"][row]))
                    if key in held:  # held under another path, or the same file twice under one label: stored once
                        report.already_indexed += 1
                        continue
                    held.add(key)
                    rows.append(row)
                    pending["labels"].append(image.label)
                    pending["paths"].append(str(image.path))
                    pending["hashes"].append(key[1])
            if rows:
                pending["vectors"].append(np.asarray(batch["vector"][rows], dtype=np.float32))
            bar.update(len(status))
            if len(pending["labels"]) >= write_rows:
                commit()
        commit()
    finally:
        bar.close()
    report.seconds = time.perf_counter() - started
    return report


__all__ = ["build_with_ray", "ray_available"]
