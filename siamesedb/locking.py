"""One writer at a time per index: an exclusive file lock (`write.lock`) beside the store, with its holder named;
and ReadWriteLock, the in-process guard of an in-memory index that threads search while one of them writes.

Readers take no lock: SQLite in WAL mode gives each read a consistent snapshot, and the FAISS file and manifest are
replaced by atomic renames, so a reader sees the state before a write or after it. Writers (build, add, remove,
calibrate, and a reader that wants to save a rebuilt FAISS file) hold `write.lock` for the whole change; a second
writer waits up to a timeout and then fails with IndexLockedError naming the holder's pid.

The lock is an OS lock (flock on POSIX, via the `filelock` package): the kernel drops it when its holder dies, even
by kill -9, so a crashed writer never leaves an index locked. The holder's pid, host and start time go to
`write.lock.owner` after the lock is taken; it is only read to word the error message.
"""

from __future__ import annotations

import math
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from siamesedb.errors import IndexLockedError, InvalidInputError, StorageError

LOCK_FILE = "write.lock"
OWNER_FILE = "write.lock.owner"
TIMEOUT_ENV = "SIAMESEDB_LOCK_TIMEOUT"
DEFAULT_TIMEOUT = 60.0  # seconds a second writer waits; negative = forever, 0 = try once


def parse_timeout(value: float | str | None) -> float:
    """Seconds to wait for the lock: `value`, else $SIAMESEDB_LOCK_TIMEOUT, else DEFAULT_TIMEOUT; negative = forever."""
    if value is None:
        value = os.environ.get(TIMEOUT_ENV, "").strip() or DEFAULT_TIMEOUT
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise InvalidInputError(f"lock timeout must be a number of seconds, got {value!r} (from ${TIMEOUT_ENV}?)") from None
    if math.isnan(seconds):
        raise InvalidInputError("lock timeout must be a number of seconds, got NaN")
    return seconds


def lock_owner(folder: str | os.PathLike) -> str:
    """'pid 1234 on host, since 14:02:11Z' from the owner file, or 'another process' when it cannot be read."""
    try:
        text = (Path(folder) / OWNER_FILE).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return "another process"
    return text.splitlines()[0] if text else "another process"


LOCK_POLL_SECONDS = 0.002


class IndexWriteLock:
    """The write lock of one index folder; re-entrant within a thread (build -> create -> add nests freely).

    Between processes it is the OS file lock; between threads sharing one object (a server's handle), a
    threading.RLock taken first, so two threads never write through one handle at once.
    `timeout=None` reads $SIAMESEDB_LOCK_TIMEOUT (default 60 s) each time the lock is taken.
    """

    def __init__(self, folder: str | os.PathLike, timeout: float | None = None):
        self.folder = Path(folder)
        self.timeout = timeout
        self.depth = 0  # nesting of the holding thread; changed only by the thread holding _guard
        self._guard = threading.RLock()
        # thread_local=False: the nesting is counted here (under _guard), not by filelock per thread.
        self._lock = FileLock(self.folder / LOCK_FILE, thread_local=False)

    @property
    def held(self) -> bool:
        return self.depth > 0

    def acquire(self, timeout: float | None = None) -> None:
        """Take the lock, waiting up to `timeout` seconds (default: the object's); IndexLockedError when it expires."""
        wait = parse_timeout(self.timeout if timeout is None else timeout)
        started = time.monotonic()
        if not self._guard.acquire(blocking=wait != 0, timeout=wait if wait > 0 else -1):
            raise self._locked_error(wait, "another thread of this process")
        if self.depth:
            self.depth += 1
            return
        left = -1.0 if wait < 0 else max(0.0, wait - (time.monotonic() - started))
        try:
            # filelock polls a held lock (default every 50 ms, which a server's next add would wait for behind
            # another process's): every 2 ms costs a non-blocking flock call each time and keeps hand-offs short
            self._lock.acquire(timeout=left, poll_interval=LOCK_POLL_SECONDS)
        except OSError as exc:  # filelock's Timeout is an OSError too
            self._guard.release()
            if isinstance(exc, Timeout):
                raise self._locked_error(wait) from None
            raise StorageError(f"{self.folder}: cannot take the write lock ({exc.strerror or exc})") from None
        except BaseException:
            self._guard.release()
            raise
        self.depth = 1
        try:
            self._record_owner()
        except OSError:
            pass  # the owner file only words error messages; the lock itself is held

    def _locked_error(self, wait: float, holder: str | None = None) -> IndexLockedError:
        return IndexLockedError(
            f"index {self.folder} is being written by {holder or lock_owner(self.folder)}; gave up after {wait:g} s "
            f"(wait longer with --lock-timeout or ${TIMEOUT_ENV}; -1 waits forever)"
        )

    def try_acquire(self) -> bool:
        """Take the lock only if it is free right now (no waiting); False when held elsewhere or not writable."""
        try:
            self.acquire(timeout=0)
        except (IndexLockedError, StorageError, OSError):
            return False
        return True

    def release(self) -> None:
        if self.depth == 0:
            return
        self.depth -= 1
        try:
            if self.depth == 0:
                self._lock.release()
        finally:
            self._guard.release()

    def __enter__(self) -> IndexWriteLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _record_owner(self) -> None:
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        tmp = self.folder / f"{OWNER_FILE}.{os.getpid()}.tmp"
        tmp.write_text(f"pid {os.getpid()} on {socket.gethostname()}, since {since}\n", encoding="utf-8")
        os.replace(tmp, self.folder / OWNER_FILE)  # a waiter never reads half a line


class ReadWriteLock:
    """Many readers or one writer, between the threads of one process (a server's searches against its own adds).

    Writer-preferring: once a writer waits, new readers queue behind it, so a stream of searches cannot starve a
    write; the writer's exclusive part is meant to be short (an in-memory FAISS add), everything slow happens
    outside it. Re-entrant: a thread that holds it (reading or writing) may take it again for reading, and a writer
    again for writing. A reader asking to write would deadlock and is refused with RuntimeError.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0  # reads held, all threads together
        self._writer: int | None = None  # thread ident of the writer
        self._writer_depth = 0
        self._writers_waiting = 0
        self._local = threading.local()  # .reads: reads this thread holds

    def _my_reads(self) -> int:
        return getattr(self._local, "reads", 0)

    @contextmanager
    def reading(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            if self._writer != me and not self._my_reads():  # a nested read never waits (no deadlock)
                while self._writer is not None or self._writers_waiting:
                    self._cond.wait()
            self._readers += 1
        self._local.reads = self._my_reads() + 1
        try:
            yield
        finally:
            self._local.reads -= 1
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def writing(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            if self._writer == me:
                self._writer_depth += 1
            else:
                if self._my_reads():
                    raise RuntimeError("a thread holding the read lock cannot take the write lock")
                self._writers_waiting += 1
                try:
                    while self._writer is not None or self._readers:
                        self._cond.wait()
                finally:
                    self._writers_waiting -= 1
                self._writer, self._writer_depth = me, 1
        try:
            yield
        finally:
            with self._cond:
                self._writer_depth -= 1
                if not self._writer_depth:
                    self._writer = None
                    self._cond.notify_all()


__all__ = ["IndexWriteLock", "ReadWriteLock", "lock_owner", "parse_timeout", "LOCK_FILE", "OWNER_FILE", "TIMEOUT_ENV", "DEFAULT_TIMEOUT"]
