"""Crash-safety torture: randomized kill -9 trials against build / add / remove / calibrate on real Omniglot images.

Each trial starts a child that works on a small index (a few dozen images, a small batch size, so there are many
commit points) and logs, after every backend write returned, exactly what it committed (one JSON line per event,
written with a single O_APPEND write, which survives the child's death). At a random moment the parent kills the
child with SIGKILL, then checks, in a fresh process:

  unopenable   the index does not open (only counted once the child had finished creating it)
  lost         an item the child logged as committed is missing (or an item logged as removed is back)
  duplicated   an item is stored more than once
  half         a batch that was in flight is partly stored (a batch is one transaction: all of it or none)
  stray        an item is stored that no batch ever held
  inconsistent faiss: the FAISS index that open() gives does not hold exactly the store's ids;
               milvus (no derived file, so no FAISS/store check): count(*) differs from the rows read, an id comes
               back twice, or the id mark in <collection>_meta is below a held id (a later add would reuse it)
  unresumable  (build trials) re-running the same build does not end with every image stored exactly once
  failed checks the checking process itself raised on what the kill left

and prints `N trials, L lost, D duplicated, U unopenable` plus the other counts and where the kills landed. A trial
with any of these is named (operation, kill moment, commits logged, last event) and what it left is kept in
<work>/failed-trial-<n> (the work folder is then not removed).
Exit status 1 when any count is not zero.

--backend milvus builds every index with backend="milvus" (a Milvus Lite file inside the index folder) and logs
MilvusBackend's writes; each Milvus process pays Lite's start-up (about 1-2 s), so its trials are slower. Every
stored row is read back (faiss: items.sqlite with plain sqlite3; milvus: iter_rows over the collection, ids counted).

Run:  python tools/torture.py [--trials 200] [--backend faiss|milvus] [--classes 6] [--per-class 6]
                              [--batch-size 3] [--seed 0]
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

OPERATIONS = ("build", "add", "remove", "calibrate")
BACKENDS = ("faiss", "milvus")
BAD = ("lost", "duplicated", "unopenable", "half", "stray", "inconsistent", "unresumable", "check_failed")


# ---------------------------------------------------------------------------------------------- in the children


def _quiet_child() -> None:
    import threading

    import torch
    from tqdm import tqdm

    torch.set_num_threads(1)  # trials are tiny; one thread keeps them from fighting over the shared cores
    tqdm.set_lock(threading.RLock())  # not tqdm's default multiprocessing lock, which a killed child would leak


def _backend_class(backend: str):
    if backend == "milvus":
        from siamesedb.backends.milvus import MilvusBackend

        return MilvusBackend
    from siamesedb.backends.faiss import FaissBackend

    return FaissBackend


def _log_commits(log_path: str, backend: str) -> None:
    """Make every backend write report itself: 'begin' before the call, 'commit' only after the call returned (for
    faiss the SQLite transaction has committed by then; for milvus the insert / delete and the version bump are in)."""
    cls = _backend_class(backend)
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def log(event: dict) -> None:
        os.write(fd, (json.dumps(event) + "\n").encode())  # one write(2): whole lines only, kept after a kill

    original_add, original_remove, original_remove_label = cls.add, cls.remove, cls.remove_label

    def add(self, ids, labels, paths, hashes, vectors):
        log({"event": "begin_add", "items": [[str(lab), str(p)] for lab, p in zip(labels, paths)]})
        new_ids = original_add(self, ids, labels, paths, hashes, vectors)
        log({"event": "commit_add", "ids": [int(i) for i in new_ids]})
        return new_ids

    def remove(self, ids):
        asked = [int(i) for i in ids]
        log({"event": "begin_remove", "ids": asked})
        n = original_remove(self, ids)
        log({"event": "commit_remove", "ids": asked})
        return n

    def remove_label(self, label):
        held, _ = self.vectors(label=label)
        log({"event": "begin_remove", "ids": [int(i) for i in held]})
        removed = original_remove_label(self, label)
        log({"event": "commit_remove", "ids": [int(i) for i in removed]})
        return removed

    cls.add, cls.remove, cls.remove_label = add, remove, remove_label
    _log_commits.log = log  # type: ignore[attr-defined]


def run_operation(operation: str, index: str, source: str, extra: str, log_path: str, batch_size: int, seed: int,
                  backend: str = "faiss") -> None:
    """The child that gets killed: one operation on `index`, every commit logged to `log_path`."""
    _quiet_child()
    _log_commits(log_path, backend)
    log = _log_commits.log  # type: ignore[attr-defined]
    from siamesedb.data import scan_folder
    from siamesedb.db import SiameseDB

    rng = random.Random(seed)
    if operation == "build":
        original_create = SiameseDB.create.__func__

        def create(cls, *args, **kwargs):  # report when the index exists (manifest written): from then on it must open
            made = original_create(cls, *args, **kwargs)
            log({"event": "created"})
            return made

        SiameseDB.create = classmethod(create)  # build calls cls.create(...) for a new index
        SiameseDB.build(source, path=index, batch_size=batch_size, workers=0, backend=backend)
    elif operation == "add":
        with SiameseDB.open(index) as db:
            images = scan_folder(extra)
            rng.shuffle(images)
            while images:  # batches of 1..batch_size images: db.add is all or nothing per call
                batch, images = images[:rng.randint(1, batch_size)], images[batch_size:]
                db.add([im.path for im in batch], [im.label for im in batch])
    elif operation == "remove":
        with SiameseDB.open(index) as db:
            labels = db.labels()
            rng.shuffle(labels)
            for label in labels[: len(labels) // 2]:
                db.remove(label=label)
            ids, _ = db.store.vectors()
            for chunk in range(0, len(ids), batch_size):
                db.remove(ids=[int(i) for i in ids[chunk : chunk + batch_size]])
    elif operation == "calibrate":
        with SiameseDB.open(index) as db:
            for far in (None, 0.1, 0.01, None, 0.05, 0.2):
                db.calibrate(target_far=far)
                log({"event": "commit_calibration"})  # the manifest was renamed into place
    log({"event": "done"})


def server_writer(index: str, prefix: str, extra: str, log_path: str, batch_size: int, seed: int,
                  remove: str | None) -> None:
    """--milvus-server / --milvus-uri: one of several writers (each on its own copy of the index folder, "a host")
    adding to one server collection at once: optionally removes label `remove` first, then adds the images of
    `extra` under labels `prefix/<label>` in batches of 1..batch_size, every commit logged."""
    _quiet_child()
    _log_commits(log_path, "milvus")
    from siamesedb.data import scan_folder
    from siamesedb.db import SiameseDB
    from siamesedb.errors import UnknownLabelError

    rng = random.Random(seed)
    with SiameseDB.open(index) as db:
        if remove:
            try:
                db.remove(label=remove)
            except UnknownLabelError:  # that trial's writer was killed before it added anything
                pass
        images = scan_folder(extra)
        rng.shuffle(images)
        while images:
            size = rng.randint(1, batch_size)
            batch, images = images[:size], images[size:]
            db.add([im.path for im in batch], [f"{prefix}/{im.label}" for im in batch])
    _log_commits.log({"event": "done"})  # type: ignore[attr-defined]


def replay(events: list[dict], expected: collections.Counter, key_of: dict) -> tuple[list | None, list | None]:
    """Replay one writer's log into `expected` ((label, path) -> count that must be stored) and `key_of` (id ->
    (label, path)); returns (the add in flight, the removal in flight): begun, never committed, each may be either."""
    pending_add: list | None = None
    pending_remove: list | None = None
    for e in events:
        if e["event"] == "begin_add":
            pending_add = [tuple(x) for x in e["items"]]
        elif e["event"] == "commit_add":
            for key, new_id in zip(pending_add, e["ids"]):
                expected[key] += 1
                key_of[new_id] = key
            pending_add = None
        elif e["event"] == "begin_remove":
            pending_remove = list(e["ids"])
        elif e["event"] == "commit_remove":
            for i in e["ids"]:
                expected[key_of[i]] -= 1
            pending_remove = None
    return pending_add, pending_remove


def settle_in_flight(pending_add: list | None, pending_remove: list | None, expected: collections.Counter,
                     present: collections.Counter, ids_present, key_of: dict, counts: collections.Counter) -> None:
    """The add and the removal a kill left in flight: each is all stored (all gone) or none of it, else a "half";
    what did land moves `expected`."""
    if pending_add:
        arrived = collections.Counter(pending_add) & (present - expected)
        counts["half"] += int(0 < sum(arrived.values()) < len(pending_add))
        expected += arrived
    if pending_remove:
        gone = [i for i in pending_remove if i not in ids_present]
        counts["half"] += int(0 < len(gone) < len(pending_remove))
        for i in gone:
            expected[key_of[i]] -= 1


def check_server(index: str, log_paths: list[str], before: list) -> dict:
    """In a fresh process, after the writers of one server trial were killed (or finished): the index opens, every
    committed add is there once, no id is held twice, a batch in flight is all there or not at all."""
    _quiet_child()
    from siamesedb.db import SiameseDB

    counts: collections.Counter = collections.Counter()
    try:
        db = SiameseDB.open(index, lock_timeout=5)
    except Exception as exc:  # noqa: BLE001 - any failure to open is what this tool counts
        counts["unopenable"] += 1
        counts["error: " + f"{type(exc).__name__}: {exc}"[:160]] += 1
        return {"counts": dict(counts), "rows": before}
    try:
        rows = stored_rows(db, "milvus")
        present = collections.Counter((label, path) for _, label, path in rows)
        ids_present = collections.Counter(i for i, _, _ in rows)
        counts["duplicated"] += sum(n - 1 for n in present.values() if n > 1)
        counts["id_twice"] += sum(n - 1 for n in ids_present.values() if n > 1)
        counts["inconsistent"] += int(db.backend.count() != len(rows))
        expected = collections.Counter((label, path) for _, label, path in before)
        key_of = {int(i): (label, path) for i, label, path in before}
        in_flight: list[tuple[list | None, list | None]] = []
        for log_path in log_paths:
            events = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
            counts["commits"] += sum(e["event"].startswith("commit") for e in events)
            in_flight.append(replay(events, expected, key_of))
        for pending_add, pending_remove in in_flight:
            settle_in_flight(pending_add, pending_remove, expected, present, ids_present, key_of, counts)
        counts["lost"] += sum((expected - present).values())
        counts["stray"] += sum(n for key, n in (present - expected).items() if expected[key] <= 0)
        return {"counts": dict(counts), "rows": [list(r) for r in sorted(rows)]}
    finally:
        db.close()


def server_base(index: str, source: str, batch_size: int, uri: str) -> list:
    _quiet_child()
    from siamesedb.db import SiameseDB

    with SiameseDB.build(source, path=index, batch_size=batch_size, workers=0, backend="milvus",
                         milvus_uri=uri) as db:
        return [list(r) for r in sorted(stored_rows(db, "milvus"))]


def drop_server_index(index: str) -> None:
    from siamesedb.db import SiameseDB

    with SiameseDB.open(index) as db:
        db.backend.drop()


def stored_rows(db, backend: str) -> list[tuple[int, str, str]]:
    """(id, label, path) of every stored row, duplicates included. faiss: items.sqlite read with plain sqlite3 (not
    through the store); milvus: every row the collection returns, read through the backend's iter_rows."""
    if backend == "milvus":
        return [(int(i), label, path) for ids, rows in db.backend.iter_rows("label, path", chunk=4096)
                for i, (label, path) in zip(ids.tolist(), rows)]
    with sqlite3.connect(Path(db.path) / "items.sqlite") as raw:
        return raw.execute("SELECT id, label, path FROM items").fetchall()


def check_index(operation: str, index: str, source: str, log_path: str, before: list, resume: bool,
                batch_size: int, backend: str = "faiss") -> dict:
    """In a fresh process: open the index the killed child left and compare it with what the child logged."""
    _quiet_child()
    import numpy as np

    from siamesedb.data import scan_folder
    from siamesedb.db import MANIFEST_FILE, SiameseDB
    from siamesedb.errors import IndexNotFoundError

    events = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    counts = collections.Counter()
    counts["commits"] = sum(e["event"].startswith("commit") for e in events)
    counts["done"] = int(any(e["event"] == "done" for e in events))
    created = operation != "build" or any(e["event"] == "created" for e in events)

    try:
        db = SiameseDB.open(index, lock_timeout=5)
    except IndexNotFoundError:
        if created or (Path(index) / MANIFEST_FILE).exists():
            counts["unopenable"] += 1
            return dict(counts)
        db = None  # killed before the build's index existed: nothing was promised yet
        counts["not_created"] += 1
    except Exception as exc:  # noqa: BLE001 - any failure to open is what this tool counts
        counts["unopenable"] += 1
        counts["error: " + f"{type(exc).__name__}: {exc}"[:160]] += 1
        return dict(counts)

    if db is not None:
        rows = stored_rows(db, backend)  # every row, duplicates included
        present = collections.Counter((label, path) for _, label, path in rows)
        ids_present = {i for i, _, _ in rows}
        counts["duplicated"] += sum(n - 1 for n in present.values() if n > 1)
        if backend == "milvus":  # no derived file; instead: count(*), ids held once, the id mark above every id
            mark = int(db.backend._meta_row()["mark"])  # the hint; the log's reservations must cover every id
            reserved = max([mark + 1, *(int(r["end"]) for r in db.backend._rows_above(mark))])
            counts["inconsistent"] += int(db.backend.count() != len(rows) or len(ids_present) != len(rows)
                                          or (bool(ids_present) and reserved <= max(ids_present)))
        else:
            counts["inconsistent"] += int(sorted(db.index.ids().tolist()) != sorted(ids_present)
                                          or db.index.ntotal != len(rows))

        # Replay the log: what must be there, what must be gone, what may be either (the one batch in flight).
        expected = collections.Counter((label, path) for _, label, path in before)
        key_of = {int(i): (label, path) for i, label, path in before}
        pending_add, pending_remove = replay(events, expected, key_of)
        calibration = db.manifest.get("calibration")
        committed_calibration = any(e["event"] == "commit_calibration" for e in events)
        if committed_calibration and not (isinstance(calibration, dict) and np.isfinite(calibration.get("threshold", np.nan))):
            counts["lost"] += 1  # a calibration reported written is gone or damaged
        settle_in_flight(pending_add, pending_remove, expected, present, ids_present, key_of, counts)
        counts["lost"] += sum((expected - present).values())
        # Items from nowhere, or removed (committed) yet back; duplicates are counted above.
        counts["stray"] += sum(n for key, n in (present - expected).items() if expected[key] <= 0)
        db.close()

    if resume and operation == "build":
        again = SiameseDB.build(source, path=index, batch_size=batch_size, workers=0, backend=backend)
        try:
            final = collections.Counter((label, path) for _, label, path in stored_rows(again, backend))
            wanted = collections.Counter((im.label, str(im.path)) for im in scan_folder(source))
            held = again.backend.count() if backend == "milvus" else again.index.ntotal
            counts["unresumable"] += int(final != wanted or held != sum(wanted.values()))
        finally:
            again.close()
    return dict(counts)


def snapshot_items(index: str, backend: str = "faiss") -> list:
    """(id, label, path) of every item of an index at rest: faiss with plain sqlite3 (no torch in the parent);
    milvus through the backend, to be run in a child (the parent must never hold the Lite file open)."""
    if backend == "milvus":
        from siamesedb.db import SiameseDB

        with SiameseDB.open(index) as db:
            return [list(r) for r in sorted(stored_rows(db, backend))]
    with sqlite3.connect(Path(index) / "items.sqlite") as raw:
        return [list(r) for r in raw.execute("SELECT id, label, path FROM items ORDER BY id")]


def build_base(index: str, source: str, batch_size: int, backend: str = "faiss") -> None:
    _quiet_child()
    from siamesedb.db import SiameseDB

    SiameseDB.build(source, path=index, batch_size=batch_size, workers=0, backend=backend).close()


# ---------------------------------------------------------------------------------------------- the parent


def pick_images(omniglot_root: Path, target: Path, classes: int, per_class: int, rng: random.Random,
                skip: set[str]) -> set[str]:
    """Copy `per_class` drawings of `classes` random characters into a labelled folder; returns the labels used."""
    characters = sorted(p for p in omniglot_root.glob("*/*") if p.is_dir() and str(p) not in skip)
    chosen = rng.sample(characters, classes)
    for character in chosen:
        label = target / character.parent.name / character.name
        label.mkdir(parents=True)
        for image in sorted(character.glob("*.png"))[:per_class]:
            shutil.copy(image, label / image.name)
    return {str(c) for c in chosen}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=None, help="Default 200 (faiss) / 100 (milvus).")
    parser.add_argument("--backend", choices=BACKENDS, default="faiss", help="Where the items live (default faiss).")
    parser.add_argument("--classes", type=int, default=6, help="Omniglot characters in the build folder.")
    parser.add_argument("--per-class", type=int, default=6, help="Drawings per character.")
    parser.add_argument("--batch-size", type=int, default=3, help="Images per commit (small: many commit points).")
    parser.add_argument("--operations", default=",".join(OPERATIONS), help="Comma-separated subset of " + ", ".join(OPERATIONS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=None, help="Scratch folder (default: a temporary one, removed after).")
    parser.add_argument("--data", default=None, help="Folder holding omniglot/images_evaluation.zip (or the zip).")
    parser.add_argument("--no-resume", action="store_true", help="Skip re-running interrupted builds.")
    parser.add_argument("--milvus-uri", default=None, help="Server trials on this Milvus server: concurrent "
                        "writers (one index folder each, one collection) killed mid-add.")
    parser.add_argument("--milvus-server", action="store_true", help="Server trials on a Milvus server of our own "
                        "(tools/milvus_server.py), also killed (-9) and restarted mid-run.")
    parser.add_argument("--writers", type=int, default=2, help="Server trials: concurrent writer processes.")
    parser.add_argument("--server-kill-every", type=int, default=10, help="--milvus-server: kill -9 the server "
                        "mid-trial every N trials, then restart it.")
    args = parser.parse_args()
    if args.milvus_uri or args.milvus_server:
        return server_main(args)
    if args.trials is None:
        args.trials = 100 if args.backend == "milvus" else 200  # a Milvus trial pays Lite's start-up twice or more
    operations = [op.strip() for op in args.operations.split(",") if op.strip()]
    if any(op not in OPERATIONS for op in operations):
        parser.error(f"--operations: choose from {', '.join(OPERATIONS)}")

    from siamesedb.datasets import omniglot

    omniglot_root = Path(omniglot("evaluation", source=args.data))
    rng = random.Random(args.seed)
    work = Path(args.work or tempfile.mkdtemp(prefix="siamesedb-torture-"))
    work.mkdir(parents=True, exist_ok=True)
    source, extra = work / "source", work / "extra"
    for folder in (source, extra):
        shutil.rmtree(folder, ignore_errors=True)
    used = pick_images(omniglot_root, source, args.classes, args.per_class, rng, set())
    pick_images(omniglot_root, extra, max(2, args.classes // 2), args.per_class, rng, used)

    # Children fork from a server that has imported torch and siamesedb once: a trial costs a fork, not an import.
    ctx = mp.get_context("forkserver")
    preload = ["torch", "siamesedb.db", "siamesedb.encoder", "faiss"]
    if args.backend == "milvus":
        preload += ["pymilvus", "siamesedb.backends.milvus"]
    ctx.set_forkserver_preload(preload)
    from concurrent.futures import ProcessPoolExecutor

    # milvus: a fresh checking process per task, so no Lite server of a trial's file outlives its check.
    checker = ProcessPoolExecutor(max_workers=1, mp_context=ctx,
                                  max_tasks_per_child=1 if args.backend == "milvus" else None)
    base = work / "base"
    shutil.rmtree(base, ignore_errors=True)
    checker.submit(build_base, str(base), str(source), args.batch_size, args.backend).result()
    if args.backend == "milvus":
        base_items = checker.submit(snapshot_items, str(base), args.backend).result()
    else:
        base_items = snapshot_items(str(base))

    def run_child(operation: str, index: Path, log_path: Path, seed: int, kill_after: float | None) -> tuple[float, bool]:
        child = ctx.Process(target=run_operation,
                            args=(operation, str(index), str(source), str(extra), str(log_path), args.batch_size, seed,
                                  args.backend))
        started = time.perf_counter()
        child.start()
        child.join(kill_after)
        killed = child.is_alive()
        if killed:
            try:
                os.kill(child.pid, signal.SIGKILL)
            except ProcessLookupError:  # it finished between the check and the kill
                killed = False
            child.join()
        return time.perf_counter() - started, killed

    def prepare(operation: str, index: Path) -> list:
        shutil.rmtree(index, ignore_errors=True)
        if operation == "build":
            return []
        shutil.copytree(base, index)
        return [list(r) for r in base_items]

    # Uninterrupted runs of each operation set the window the kills are drawn from: the slowest of three, so that
    # a lucky fast first run does not crowd every kill into the start-up.
    durations = {}
    for operation in operations:
        index, log_path = work / "trial", work / "trial.log"
        runs = []
        for _ in range(3):
            prepare(operation, index)
            log_path.unlink(missing_ok=True)
            runs.append(run_child(operation, index, log_path, 0, None)[0])
        durations[operation] = max(runs)
    print("uninterrupted run, slowest of 3 (s): " + ", ".join(f"{op} {d:.2f}" for op, d in durations.items()),
          flush=True)

    totals: collections.Counter = collections.Counter()
    phases: collections.Counter = collections.Counter()
    errors: collections.Counter = collections.Counter()
    failures: list[str] = []
    started = time.perf_counter()
    for trial in range(args.trials):
        operation = operations[trial % len(operations)]
        index, log_path = work / "trial", work / "trial.log"
        before = prepare(operation, index)
        log_path.unlink(missing_ok=True)
        log_path.touch()
        kill_after = rng.uniform(0.0, 1.1 * durations[operation])
        _, killed = run_child(operation, index, log_path, trial, kill_after)
        try:
            result = checker.submit(check_index, operation, str(index), str(source), str(log_path), before,
                                    not args.no_resume, args.batch_size, args.backend).result()
        except Exception as exc:  # noqa: BLE001 - the check itself failed on what the kill left: count it, go on
            result = {"check_failed": 1, f"error: {type(exc).__name__}: {exc}"[:160]: 1}
        for key, value in result.items():
            if key.startswith("error: "):
                errors[key] += value
            elif key not in ("commits", "done"):
                totals[key] += value
        found = {k: v for k, v in result.items() if v and k in BAD}
        if found:  # name the trial, where its kill landed, and keep what it left (as the check left it)
            events = [line for line in log_path.read_text().splitlines() if line.strip()]
            last = json.loads(events[-1])["event"] if events else "none"
            kept = work / f"failed-trial-{trial}"
            shutil.rmtree(kept, ignore_errors=True)
            if index.exists():
                shutil.copytree(index, kept)
            else:
                kept.mkdir()
            shutil.copy(log_path, kept / "torture.log")
            failures.append(f"trial {trial}: {operation}, {'killed' if killed else 'not killed'} at {kill_after:.2f} s "
                            f"after {result.get('commits', 0)} commits (last event: {last}): "
                            + ", ".join(f"{k} {v}" for k, v in found.items()) + f"; left in {kept}")
            print("  " + failures[-1], flush=True)
        if not killed or result.get("done"):
            phases[operation, "after it finished"] += 1
        elif result.get("commits", 0) == 0:
            phases[operation, "before its first commit"] += 1
        else:
            phases[operation, "between commits"] += 1
        totals["killed"] += int(killed)
    checker.shutdown()
    seconds = time.perf_counter() - started

    n = args.trials
    print(f"{n} trials, {totals['lost']} lost, {totals['duplicated']} duplicated, {totals['unopenable']} unopenable")
    if args.backend == "milvus":
        consistency = (f"FAISS/store mismatches n/a (milvus: no derived file); Milvus count(*)/id/mark mismatches "
                       f"{totals['inconsistent']}")
    else:
        consistency = f"FAISS/store mismatches {totals['inconsistent']}"
    print(f"  half batches {totals['half']}, stray items {totals['stray']}, {consistency}, "
          f"unresumable builds {totals['unresumable']}, failed checks {totals['check_failed']}")
    print(f"  {totals['killed']} killed; {totals['not_created']} build kills landed before the index existed")
    for operation in operations:
        where = ", ".join(f"{phases[operation, phase]} {phase}"
                          for phase in ("before its first commit", "between commits", "after it finished"))
        print(f"  {operation}: {where}")
    print(f"  backend {args.backend}; operations: {', '.join(operations)}; {args.classes} x {args.per_class} images, "
          f"batch size "
          f"{args.batch_size}; {seconds:.0f} s ({seconds / max(n, 1):.2f} s per trial)")
    for message, count in errors.items():
        print(f"  {count} x {message[7:]}")
    for line in failures:
        print("  " + line)
    if not args.work and not failures:
        shutil.rmtree(work, ignore_errors=True)
    bad = sum(totals[k] for k in BAD)
    return 1 if bad else 0


def server_main(args) -> int:
    """Server trials: `--writers` processes, each on its own copy of one index folder ("hosts"), add to one server
    collection at once (one of them first removes an earlier trial's label); each is killed -9 at its own random
    moment; every `--server-kill-every`-th trial the server itself is killed -9 mid-trial and restarted. Then a
    fresh process checks: opens, nothing committed lost, no (label, path) twice, no id twice, no half batch."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from milvus_server import Server

    from siamesedb.datasets import omniglot

    trials = args.trials or 200
    omniglot_root = Path(omniglot("evaluation", source=args.data))
    rng = random.Random(args.seed)
    work = Path(args.work or tempfile.mkdtemp(prefix="siamesedb-torture-server-"))
    work.mkdir(parents=True, exist_ok=True)
    server = None
    if args.milvus_server:
        import atexit

        server = Server.start(work / "server", tick_ms=20)
        atexit.register(server.stop)  # also when stopped by SIGTERM (below): never leave our server running
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    uri = args.milvus_uri or server.uri
    source, extra = work / "source", work / "extra"
    for folder in (source, extra):
        shutil.rmtree(folder, ignore_errors=True)
    used = pick_images(omniglot_root, source, args.classes, args.per_class, rng, set())
    pick_images(omniglot_root, extra, 2, 3, rng, used)  # each writer adds these 6 under its own labels
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "siamesedb.db", "siamesedb.encoder", "pymilvus", "siamesedb.backends.milvus"])
    from concurrent.futures import ProcessPoolExecutor

    checker = ProcessPoolExecutor(max_workers=1, mp_context=ctx)
    hosts = [work / f"host{w}" for w in range(args.writers)]
    before = checker.submit(server_base, str(hosts[0]), str(source), args.batch_size, uri).result()
    for host in hosts[1:]:
        shutil.copytree(hosts[0], host)

    def run_writers(trial: int, kill_at: list[float | None], server_kill: float | None) -> tuple[list[Path], int]:
        logs = [work / f"trial-w{w}.log" for w in range(args.writers)]
        children = []
        for w, host in enumerate(hosts):
            logs[w].write_text("")
            remove = f"t{trial - 2}/w{w}" if w == 1 and trial >= 2 and trial % 3 == 0 else None
            child = ctx.Process(target=server_writer, args=(str(host), f"t{trial}/w{w}", str(extra), str(logs[w]),
                                                            args.batch_size, trial * 100 + w, remove))
            child.start()
            children.append(child)
        began, killed = time.perf_counter(), 0
        pending = set(range(len(children)))
        while pending:
            now = time.perf_counter() - began
            if server_kill is not None and now >= server_kill:
                server.kill()
                server_kill = None
            for w in list(pending):
                if not children[w].is_alive():
                    pending.discard(w)
                elif (kill_at[w] is not None and now >= kill_at[w]) or now > 120:
                    os.kill(children[w].pid, signal.SIGKILL)
                    children[w].join()
                    killed += 1
                    pending.discard(w)
            time.sleep(0.02)
        return logs, killed

    window = 0.0  # the slowest of two uninterrupted trials (labels t-20, t-21) sets the window kills are drawn from
    for i in range(2):
        t0 = time.perf_counter()
        logs, _ = run_writers(-20 - i, [None] * args.writers, None)
        window = max(window, time.perf_counter() - t0)
    before = checker.submit(check_server, str(hosts[0]), [], before).result()["rows"]
    print(f"server trials on {uri}: {args.writers} writers, uninterrupted trial {window:.1f} s", flush=True)
    totals: collections.Counter = collections.Counter()
    errors: collections.Counter = collections.Counter()
    failures: list[str] = []
    began = time.perf_counter()
    for trial in range(trials):
        kill_at = [rng.uniform(0.0, 1.1 * window) for _ in hosts]
        server_kill = None
        if server is not None and args.server_kill_every and trial % args.server_kill_every == args.server_kill_every - 1:
            server_kill = rng.uniform(0.2, 0.9 * window)
        logs, killed = run_writers(trial, kill_at, server_kill)
        totals["writers_killed"] += killed
        if server_kill is not None:
            if server.pgid is not None:  # the writers ended before the kill moment: kill it now
                server.kill()
            t0 = time.perf_counter()
            totals["server_starts"] += server.restart()  # may take more than one start (milvus_server.py says why)
            totals["server_restarts"] += 1
            totals["restart_seconds"] += round(time.perf_counter() - t0)
        try:
            checked = checker.submit(check_server, str(hosts[0]), [str(p) for p in logs], before).result()
        except Exception as exc:  # noqa: BLE001 - count it, go on
            checked = {"counts": {"check_failed": 1, f"error: {type(exc).__name__}: {exc}"[:160]: 1}, "rows": before}
        result, before = checked["counts"], checked["rows"]
        for key, value in result.items():
            (errors if key.startswith("error: ") else totals)[key] += value
        found = {k: v for k, v in result.items() if v and (k in BAD or k == "id_twice")}
        if found:
            failures.append(f"trial {trial}: " + ", ".join(f"{k} {v}" for k, v in found.items()))
            print("  " + failures[-1], flush=True)
    seconds = time.perf_counter() - began
    checker.shutdown()
    print(f"{trials} trials, {totals['lost']} lost, {totals['duplicated']} duplicated, {totals['id_twice']} ids "
          f"held twice, {totals['unopenable']} unopenable")
    print(f"  half batches {totals['half']}, stray items {totals['stray']}, count(*) mismatches "
          f"{totals['inconsistent']}, failed checks {totals['check_failed']}; {totals['commits']} commits checked, "
          f"{len(before)} items at the end")
    print(f"  {totals['writers_killed']} writers killed -9; server killed -9 and restarted {totals['server_restarts']} "
          f"times ({totals['server_starts']} starts, {totals['restart_seconds']} s); {seconds:.0f} s ({seconds / max(trials, 1):.1f} s a trial)")
    for message, count in errors.items():
        print(f"  {count} x {message[7:]}")
    try:
        drop_server_index(str(hosts[0]))
    finally:
        if server is not None:
            server.stop()
            if not args.work:
                shutil.rmtree(work, ignore_errors=True)
    return 1 if sum(totals[k] for k in (*BAD, "id_twice")) else 0


if __name__ == "__main__":
    sys.exit(main())
