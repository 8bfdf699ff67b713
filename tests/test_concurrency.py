"""Concurrent access from separate processes: many readers at once, writers one at a time behind the write lock.

Readers never wait and never see half a write; a second writer waits for the lock and, past its timeout, fails with
a one-line IndexLockedError naming the index and the holder's pid; a writer killed with SIGKILL frees the lock.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from siamesedb.cli import cli
from siamesedb.db import MANIFEST_FILE, SiameseDB
from siamesedb.errors import IndexLockedError
from siamesedb.locking import TIMEOUT_ENV, IndexWriteLock

from helpers import tiny_encoder  # tests/helpers.py
from helpers import unit_rows as unit_vectors

ROOT = Path(__file__).resolve().parents[1]
PER_BATCH = 4  # every write is one batch of 4 items under one fresh label: a reader can spot half a batch


@pytest.fixture()
def index(tmp_path) -> Path:
    path = tmp_path / "index"
    with SiameseDB.create(path, encoder=tiny_encoder()) as db:
        db.add_vectors(unit_vectors(8, 0), ["seed-a"] * 4 + ["seed-b"] * 4)
    return path


@pytest.fixture(scope="module")
def ctx():
    # Children fork from a server that imported siamesedb once (torch included): cheap to start, and never forked
    # from this test process, whose torch thread pools may already be running.
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["siamesedb.db"])
    return context


# ---------------------------------------------------------------------------------------------- child processes


def writer(path: str, name: str, batches: int, calibrate: bool, results) -> None:
    try:
        with SiameseDB.open(path, lock_timeout=120) as db:
            for b in range(batches):
                db.add_vectors(unit_vectors(PER_BATCH, hash((name, b)) % 2**32), [f"{name}-{b}"] * PER_BATCH)
                if calibrate:
                    db.calibrate()
        results.put(("writer", name, "ok"))
    except Exception as exc:  # noqa: BLE001 - reported to the test, which fails on it
        results.put(("writer", name, f"{type(exc).__name__}: {exc}"))


def reader(path: str, stop, results) -> None:
    """Open, check the snapshot is whole, query; again and again until told to stop."""
    problems, sizes = [], []
    try:
        while not stop.is_set() or not sizes:
            with SiameseDB.open(path) as db:
                ids = db.index.ids()
                labels = Counter(db.store.labels_of(ids))
                sizes.append(len(ids))
                half = {label: n for label, n in labels.items() if n != PER_BATCH}
                if half:
                    problems.append(f"half a batch visible: {half}")
                hits = db.search_vectors(unit_vectors(2, len(sizes)), k=5)
                if any(len(h) != min(5, len(ids)) for h in hits):
                    problems.append(f"short result: {[len(h) for h in hits]} of {len(ids)}")
                db.classify_vectors(unit_vectors(1, 7))
        if sizes != sorted(sizes):
            problems.append(f"went back in time: {sizes}")
    except Exception as exc:  # noqa: BLE001
        problems.append(f"{type(exc).__name__}: {exc}")
    results.put(("reader", len(sizes), problems))


def build(folder: str, path: str, results) -> None:
    try:
        with SiameseDB.build(folder, path=path, lock_timeout=120, workers=0) as db:
            results.put(db.last_report.added)
    except Exception as exc:  # noqa: BLE001
        results.put(f"{type(exc).__name__}: {exc}")


def hold_lock(path: str, held, release) -> None:
    lock = IndexWriteLock(path)
    lock.acquire()
    held.set()
    release.wait(60)
    lock.release()


# ---------------------------------------------------------------------------------------------- tests


def test_many_readers_and_two_writers_never_see_or_leave_a_half_state(index, ctx):
    results, stop = ctx.Queue(), ctx.Event()
    readers = [ctx.Process(target=reader, args=(str(index), stop, results)) for _ in range(3)]
    writers = [ctx.Process(target=writer, args=(str(index), name, 6, name == "w1", results)) for name in ("w1", "w2")]
    for p in readers + writers:
        p.start()
    for p in writers:
        p.join(240)
    stop.set()
    for p in readers:
        p.join(120)
    reports = [results.get(timeout=10) for _ in range(5)]
    assert sorted(r[2] for r in reports if r[0] == "writer") == ["ok", "ok"], reports
    for _, reads, problems in (r for r in reports if r[0] == "reader"):
        assert reads >= 1 and problems == []
    with SiameseDB.open(index) as db:
        assert len(db) == 8 + 2 * 6 * PER_BATCH
        assert sorted(db.index.ids().tolist()) == sorted(db.store.vectors()[0].tolist())
        assert set(Counter(db.store.labels_of(db.index.ids())).values()) == {PER_BATCH}
        # Each writer caught up with the other's commits and manifest before writing: nothing was dropped.
        assert db.manifest["calibration"] is not None
        assert db.manifest["vectors_store_version"] == db.store.version


def test_a_second_writer_waits_then_names_the_holder(index, ctx):
    held, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=hold_lock, args=(str(index), held, release))
    holder.start()
    try:
        assert held.wait(60)
        with SiameseDB.open(index, lock_timeout=0.5) as db:  # opening and reading need no lock
            assert len(db.search_vectors(unit_vectors(1, 1), k=3)[0]) == 3
            started = time.perf_counter()
            with pytest.raises(IndexLockedError) as info:
                db.add_vectors(unit_vectors(1, 2), ["late"])
            waited = time.perf_counter() - started
        message = str(info.value)
        assert f"index {index} is being written by pid {holder.pid}" in message and "\n" not in message
        # It waited its timeout, then gave up while the holder still held the lock (which it does until released,
        # so a writer that waited forever would hang here). The upper bound is generous on purpose: the machine
        # running the suite is shared and busy; the point is that it returns at all.
        assert waited >= 0.5 and waited < 120
        # The CLI: --lock-timeout, or the environment variable; one line, exit status 1, nothing written.
        result = CliRunner().invoke(cli, ["remove", "--index", str(index), "--label", "seed-a", "--lock-timeout", "0.2"])
        assert result.exit_code == 1 and f"pid {holder.pid}" in result.output and result.output.count("\n") == 1
        result = CliRunner(env={TIMEOUT_ENV: "0.2"}).invoke(cli, ["calibrate", "--index", str(index)])
        assert result.exit_code == 1 and "is being written by" in result.output
    finally:
        release.set()
        holder.join(30)
    with SiameseDB.open(index, lock_timeout=5) as db:  # released: the write goes through
        db.add_vectors(unit_vectors(1, 3), ["late"])
        assert len(db) == 9


def test_a_writer_killed_with_sigkill_frees_the_lock(index, ctx):
    held, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=hold_lock, args=(str(index), held, release))
    holder.start()
    assert held.wait(60)
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(30)
    # Freed at once, with no stale-lock wait: a timeout of 0 tries once and would raise IndexLockedError were the
    # dead writer's lock still held (a behaviour, not a wall-clock bound).
    with SiameseDB.open(index, lock_timeout=0) as db:
        db.remove(label="seed-a")
        assert db.labels() == ["seed-b"]


def test_two_builds_of_one_new_index_create_it_once(tmp_path, ctx):
    folder = tmp_path / "shapes"
    for label in ("a", "b"):
        (folder / label).mkdir(parents=True)
        for v in range(3):
            Image.new("L", (20, 20), 40 * v + (100 if label == "b" else 0)).save(folder / label / f"{v}.png")
    results = ctx.Queue()
    builds = [ctx.Process(target=build, args=(str(folder), str(tmp_path / "index"), results)) for _ in range(2)]
    for p in builds:
        p.start()
    outcomes = sorted(results.get(timeout=240) for _ in builds)
    for p in builds:
        p.join(30)
    assert outcomes == [0, 6]  # one built it, the other waited and found it all there
    with SiameseDB.open(tmp_path / "index") as db:
        assert len(db) == 6 and (tmp_path / "index" / MANIFEST_FILE).exists()


def test_lock_timeout_values_are_checked(index, monkeypatch):
    monkeypatch.setenv(TIMEOUT_ENV, "soon")
    with SiameseDB.open(index) as db, pytest.raises(Exception, match="lock timeout must be a number"):
        db.add_vectors(unit_vectors(1, 4), ["x"])
    result = CliRunner().invoke(cli, ["calibrate", "--index", str(index), "--lock-timeout", "soon"])
    assert result.exit_code == 2 and "soon" in result.output


def test_threads_sharing_one_handle_write_one_at_a_time(index):
    import threading

    errors = []
    with SiameseDB.open(index, lock_timeout=60) as db:

        def write(name: str) -> None:
            try:
                for b in range(5):
                    db.add_vectors(unit_vectors(PER_BATCH, hash((name, b)) % 2**32), [f"{name}-{b}"] * PER_BATCH)
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=write, args=(f"t{i}",)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert errors == []
        assert len(db) == 8 + 3 * 5 * PER_BATCH
        assert sorted(db.index.ids().tolist()) == sorted(db.store.vectors()[0].tolist())
        # A thread that finds the handle's lock taken by another thread waits, then names the holder.
        db._lock.acquire()
        try:
            failure = []
            waiter = threading.Thread(target=lambda: failure.append(_try_add(db, 0.2)))
            waiter.start()
            waiter.join(30)
            assert failure and "another thread of this process" in failure[0]
        finally:
            db._lock.release()
    with SiameseDB.open(index) as again:
        assert again.manifest["vectors_store_version"] == again.store.version


def _try_add(db: SiameseDB, timeout: float) -> str:
    db._lock.timeout = timeout
    try:
        db.add_vectors(unit_vectors(1, 9), ["blocked"])
    except IndexLockedError as exc:
        return str(exc)
    finally:
        db._lock.timeout = None
    return "written"
