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

Install: `pip install siamesedb[ray]`. Without an address a local Ray is started (and shut down afterwards), its
session files under Ray's own temp root ($RAY_TMPDIR, else $TMPDIR, else /tmp: `ray`); `address="auto"`,
`"HOST:PORT"` (a head node's GCS port, `ray start --head --port PORT`) or `ray://host:10001` joins a running cluster,
whose session files stay where its nodes keep them (`ray start --temp-dir`). The cluster's nodes must be able to
read FOLDER's paths (a shared or identical file system: the driver sends paths, not bytes). A cluster with token
authentication (Ray turns it on for a head node whenever ~/.ray/auth_token exists) needs RAY_AUTH_MODE=token and
its token (RAY_AUTH_TOKEN or that file) in the driver's environment too.

`quiet=True` (the CLI's --quiet and --json) keeps Ray's own log lines off this process's stderr: its Python loggers
at ERROR, no worker logs forwarded, and the C++ core worker's stderr lines (which no logging level reaches) caught
in an unlinked temp file, replayed to stderr only when the build fails. Which nodes read and encoded is logged
(`siamesedb.ray_build`, INFO) and, with `progress`, written to stderr after the bar.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from siamesedb.data import LabelledImage, hash_and_decode, scan_folder
from siamesedb.db import BuildReport, SiameseDB
from siamesedb.encoder import DEFAULT_ENCODER, Encoder
from siamesedb.errors import EncoderError, EncoderMismatchError, IndexExistsError, InvalidInputError
from siamesedb.ingest import absolute, split_unindexable  # the in-process build's rules, shared
from siamesedb.layout import DEFAULT_HOME, MANIFEST_FILE

log = logging.getLogger(__name__)
WRITE_ROWS = 4096  # new rows per add_vectors call: one commit each (the FAISS file is saved once, at the end)
DECODE_TASK_MEMORY = 384 << 20  # bytes reserved per read + decode task (its worker process: about 250 MB measured)
REPLAY_BYTES = 64 << 10  # of Ray's captured stderr, written back when a quiet build fails
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


class _RayStderr:
    """While active: file descriptor 2 (where Ray's C++ core worker writes, below any logging level) goes to an
    unlinked temp file; `text()` reads it meanwhile. On exit the caught bytes are written back to stderr if the block
    raised (they may say why) and `on_failure` still says so, or if it did not and `on_success` says so."""

    def __init__(self, active: bool, on_success: bool = False):
        self.active, self.on_success, self.on_failure = active, on_success, True
        self.capture: Any = None
        self.saved = -1

    def __enter__(self) -> _RayStderr:
        if self.active:
            sys.stderr.flush()
            self.capture = tempfile.TemporaryFile()
            self.saved = os.dup(2)
            os.dup2(self.capture.fileno(), 2)
        return self

    def text(self) -> str:
        if self.capture is None:
            return ""
        sys.stderr.flush()
        with open(self.capture.fileno(), "rb", closefd=False) as raw:
            raw.seek(0)
            return raw.read().decode(errors="replace")

    def __exit__(self, kind: object, *exc: object) -> None:
        if self.capture is None:
            return
        sys.stderr.flush()
        os.dup2(self.saved, 2)
        os.close(self.saved)
        if self.on_failure if kind is not None else self.on_success:
            size = self.capture.seek(0, os.SEEK_END)
            self.capture.seek(max(0, size - REPLAY_BYTES))
            os.write(2, self.capture.read())
        self.capture.close()


@contextmanager
def _ray_stderr(quiet: bool) -> Iterator[None]:
    """With `quiet`: Ray's stderr lines caught (_RayStderr), written back only if the block raises."""
    with _RayStderr(quiet):
        yield


def _init_ray(ray: Any, address: str | None, quiet: bool) -> None:
    """Start or join Ray. Its start-up lines are caught, written back unless `quiet` (or if it fails); a cluster
    that refuses us for want of its token, or is not there, is one clear line (Ray's 20 s of retrying a refused
    token are not written back: the line says it all)."""
    named = os.environ.get("RAY_ADDRESS")
    where = f"--ray-address {address}" if address else f"$RAY_ADDRESS {named}" if named else "a local Ray"
    with _RayStderr(True, on_success=not quiet) as caught:
        try:
            ray.init(address=address, include_dashboard=False,
                     logging_level=logging.ERROR if quiet else logging.WARNING, log_to_driver=not quiet,
                     configure_logging=True)
        except (ray.exceptions.AuthenticationError, ConnectionError) as exc:
            # Joining an explicit address, Ray retries a refused token ~20 s ($RAY_gcs_server_port_wait_time_s) and
            # then raises ConnectionError from a RuntimeError that quotes the AuthenticationError.
            said = f"{exc} {exc.__cause__} {caught.text()}"
            refused = isinstance(exc, ray.exceptions.AuthenticationError) or "InvalidAuthToken" in said
            caught.on_failure = not refused
            if refused:
                raise InvalidInputError(
                    f"{where}: the Ray cluster refused us for want of its authentication token: "
                    "set RAY_AUTH_MODE=token and its token (RAY_AUTH_TOKEN, or the file ~/.ray/auth_token its head "
                    "node used)") from None
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InvalidInputError(f"{where}: no Ray cluster to join there ({reason})") from None


def _held_keys(db: SiameseDB) -> tuple[set[tuple[str, str]], dict[tuple[str, str], str]]:
    """(label, sha256) pairs the index holds, and {(label, path): sha256}: the in-process build's resume rule."""
    return db.backend.known_label_hashes(), db.backend.label_path_hashes()


# ------------------------------------------------------------------------------------------------ Ray stages


def _read_hash_decode(batch: dict[str, np.ndarray], prep: dict[str, Any]) -> dict[str, np.ndarray]:
    """Ray task: read, hash, decode one block. Every input row comes out once, with its status; decoded pixels
    travel as float32 bytes (b"" for held and skipped rows, which are never decoded or encoded)."""
    import ray

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
    node = ray.get_runtime_context().get_node_id()  # which node read this block (the driver counts them)
    return {"pos": np.asarray(batch["pos"], dtype=np.int64), "status": status, "sha256": digests,
            "reason": reasons, "pixels": pixels, "read_node": np.array([node] * n, dtype=object)}


class _EncodeActor:
    """Ray actor: the index's encoder (weights from the object store), fingerprint-checked; encodes NEW rows."""

    def __init__(self, config: dict[str, Any], state: Any, fingerprint: str, device: str, threads: int | None,
                 batch_size: int):
        import ray
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
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        status = np.asarray(batch["status"])
        new = np.flatnonzero(status == NEW)
        vectors = np.zeros((len(status), self.encoder.dimension), dtype=np.float32)
        if len(new):
            stacked = np.stack([np.frombuffer(batch["pixels"][j], dtype=np.float32).reshape(self.shape) for j in new])
            vectors[new] = self.encoder.encode_tensors(torch.from_numpy(stacked), batch_size=self.batch_size)
        return {"pos": batch["pos"], "status": status, "sha256": batch["sha256"], "reason": batch["reason"],
                "vector": vectors, "read_node": batch["read_node"],
                "encode_node": np.array([self.node] * len(status), dtype=object)}


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
    quiet: bool = False,
    _after_write: Callable[[int], None] | None = None,
) -> SiameseDB:
    """`SiameseDB.build` on Ray Data: same index, same resume rule, same `db.last_report` (a BuildReport).

    `address`: None starts a local Ray (unless one is already initialised in this process, or $RAY_ADDRESS names a
    cluster), "auto", "HOST:PORT" (a head node's GCS) or "ray://host:10001" joins a cluster. `actors`: encoder
    actors (default: one per GPU, else one per 8 CPUs). `write_rows`: new images per commit.
    `backend` / `backend_options` / `milvus_uri`: for a new index, as `SiameseDB.create` (an existing one keeps
    its own). `quiet`: Ray's own log lines kept off stderr (see the module's docstring).
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

    started_ray = False
    if not ray.is_initialized():  # joined first: an unreachable cluster creates no index
        _init_ray(ray, address, quiet)
        started_ray = True
    logging.getLogger("ray.data").setLevel(logging.ERROR if quiet else logging.WARNING)
    # "Progress bars disabled": ours is the driver's tqdm bar (Ray Data's per-operator bars are off on purpose).
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    try:
        db = _create_or_open(path, encoder, factory, device, len(images), lock_timeout, backend, options)
        db.check_domain([image.path for image in images])  # our own warning: outside the stderr capture
        # The whole build holds the index's write lock, as the in-process build does: the held set read below stays
        # true until the last commit, so two builds of one folder cannot both add a file.
        with _ray_stderr(quiet), db.bulk_writes():  # the FAISS file and manifest are saved once, at the end
            report = _run(ray, db, images, device, batch_size, actors, encoder_threads, write_rows, progress,
                          _after_write)
    finally:
        if started_ray:
            with _ray_stderr(quiet):
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
    read_nodes: set[str] = set()  # Ray node ids that read + decoded / encoded at least one block
    encode_nodes: set[str] = set()

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
            read_nodes.update(batch["read_node"])
            encode_nodes.update(batch["encode_node"])
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
    alive = sum(1 for node in ray.nodes() if node.get("Alive"))
    summary = (f"build (ray): read + decode on {len(read_nodes)} node(s), encode on {len(encode_nodes)} node(s), "
               f"{len(read_nodes | encode_nodes)} of the cluster's {alive} node(s) used")
    log.info(summary, extra={"read_nodes": sorted(read_nodes), "encode_nodes": sorted(encode_nodes)})
    if progress:
        print(summary, file=sys.stderr)
    return report


__all__ = ["build_with_ray", "ray_available"]
