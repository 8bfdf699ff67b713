"""Micro-batching for `siamesedb serve`: MicroBatcher (the dynamic batching of inference servers such as Triton or
TorchServe); answer_questions, one batch of requests answered with one encode and one search per kind;
commit_items, a group of adds stored under one hold of the write lock; and DeferredSave, the index files saved once
writes pause rather than after every group.

Requests put their work in one queue; worker threads take up to `max_batch` items at a time and run them together
(`run_batch`: one encoder forward pass for all their images, then one search per kind of question), and each item's
own answer, or its own exception, goes back to the request that sent it.

When a batch is cut: a worker takes what is queued as soon as it is free. It waits (at most `max_wait` seconds
after the first item) only while more requests are on their way, i.e. between `reserve()` and `submit` (their
uploads being decoded); a request alone, with nothing else coming, is run at once, so batching never makes it
wait longer than it did without. Under load the queue fills while the workers are busy, and batches form by
themselves.

`batch_sizes` counts the batches run by size (a Counter), for the benchmark and /info-style reports.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np

from siamesedb.errors import InvalidInputError

DEFAULT_MAX_BATCH = 32  # items (requests) per batch; one request may carry several images
DEFAULT_MAX_WAIT = 0.002  # seconds a batch may wait for requests still being decoded (never for ones not sent)


class MicroBatcher:
    """Run queued items in batches on `workers` threads: run_batch(items) -> one result or exception per item."""

    def __init__(self, run_batch: Callable[[Sequence[Any]], Sequence[Any]], max_batch: int = DEFAULT_MAX_BATCH,
                 max_wait: float = DEFAULT_MAX_WAIT, workers: int = 1, name: str = "batch",
                 initializer: Callable[[], Any] | None = None):
        if int(max_batch) != max_batch or max_batch < 1:
            raise InvalidInputError(f"max_batch must be an integer of at least 1, got {max_batch}")
        if not (max_wait >= 0) or max_wait > 10:  # `not >=`: NaN too
            raise InvalidInputError(f"max_wait must be between 0 and 10 seconds, got {max_wait}")
        if int(workers) != workers or workers < 1:
            raise InvalidInputError(f"workers must be an integer of at least 1, got {workers}")
        self.run_batch = run_batch
        self._initializer = initializer  # run first in each worker thread (the server sets its torch threads)
        self.max_batch, self.max_wait = int(max_batch), float(max_wait)
        self.batch_sizes: Counter[int] = Counter()
        self._queue: deque[tuple[Any, Future]] = deque()
        self._coming = 0  # requests reserved and not yet submitted (their uploads are being decoded)
        self._cond = threading.Condition()
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{n}", daemon=True) for n in range(workers)]
        for thread in self._threads:
            thread.start()

    # ------------------------------------------------------------------ the requests' side

    @contextmanager
    def reserve(self) -> Iterator[Callable[[Any], Future]]:
        """Announce a request on its way; yields submit(item) -> Future. Leaving the block without submitting (the
        upload was refused) withdraws it, so no batch waits for it."""
        with self._cond:
            self._coming += 1
        pending = [True]

        def submit(item: Any) -> Future:
            future: Future = Future()
            with self._cond:
                if self._closed:
                    raise RuntimeError("the batcher is closed")
                if pending[0]:
                    pending[0] = False
                    self._coming -= 1
                self._queue.append((item, future))
                self._cond.notify_all()
            return future

        try:
            yield submit
        finally:
            with self._cond:
                if pending[0]:
                    pending[0] = False
                    self._coming -= 1
                    self._cond.notify_all()

    def submit(self, item: Any) -> Future:
        """Queue one item now (nothing announced beforehand); its Future holds the answer or the exception."""
        with self.reserve() as submit:
            return submit(item)

    def close(self) -> None:
        """Stop the workers after the queued items are run."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=30)

    # ------------------------------------------------------------------ the workers' side

    def _take(self) -> list[tuple[Any, Future]] | None:
        """The next batch (None once closed and drained): what is queued, after waiting for requests on their way."""
        with self._cond:
            while True:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return None
                deadline = time.monotonic() + self.max_wait
                while len(self._queue) < self.max_batch and self._coming > 0 and not self._closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                if self._queue:  # else another worker took them while this one waited: wait for the next ones
                    return [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]

    def _work(self) -> None:
        if self._initializer is not None:
            self._initializer()
        while (batch := self._take()) is not None:
            self.batch_sizes[len(batch)] += 1
            items = [item for item, _ in batch]
            try:
                results = list(self.run_batch(items))
                if len(results) != len(items):
                    raise RuntimeError(f"run_batch returned {len(results)} results for {len(items)} items")
            except BaseException as exc:  # noqa: BLE001 - handed to every request of the batch, never lost
                results = [exc] * len(items)
            for (_, future), result in zip(batch, results):
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)




# ---------------------------------------------------------------------------------------------- a server's questions


@dataclass(frozen=True)
class Question:
    """One request's question: `kind` search | classify | verify | encode, its decoded images, and its parameters
    (hashable: questions of one kind with equal parameters are answered by one call). Parameters per kind:
    search (k,); classify (method, k, classes tuple or None); verify (label, threshold, rule); encode ()."""

    kind: str
    images: tuple[Any, ...]
    params: tuple[Any, ...] = ()


def answer_questions(db: Any, questions: Sequence[Question],
                     reading: Callable[[], AbstractContextManager[Any]] = nullcontext) -> list[Any]:
    """Answer a batch: every image encoded in one `db.encoder.encode` call (its own preprocessing and test-time
    views), then one search / classify call per kind and parameters. Returns per question a list with one answer
    per image (search: hit dicts; classify / verify: the result's dict; encode: the (D,) vector), or the exception
    that question alone raised. The index is read inside one `reading()` block, entered after the encoding (the
    server catches up with other processes there, and guards backends that read one thing at a time)."""
    images = [image for question in questions for image in question.images]
    vectors: list[Any] = []
    try:
        encoded = np.atleast_2d(db.encoder.encode(images)) if images else np.empty((0, db.dimension), np.float32)
        starts = np.cumsum([0] + [len(q.images) for q in questions])
        vectors = [encoded[a:b] for a, b in zip(starts[:-1], starts[1:])]
    except Exception:  # noqa: BLE001 - one bad image must not fail the others: encode each question alone
        for question in questions:
            try:
                vectors.append(np.atleast_2d(db.encoder.encode(list(question.images))))
            except Exception as exc:  # noqa: BLE001 - this question's own answer
                vectors.append(exc)
    answers: list[Any] = list(vectors)
    groups: dict[tuple[str, tuple[Any, ...]], list[int]] = {}
    for n, question in enumerate(questions):
        if not isinstance(vectors[n], BaseException):
            groups.setdefault((question.kind, question.params), []).append(n)
    with reading() if any(kind != "encode" for kind, _ in groups) else nullcontext():
        for (kind, params), members in groups.items():
            stacked = np.concatenate([vectors[n] for n in members])
            try:
                per_image = _ask(db, kind, params, stacked)
            except Exception as exc:  # noqa: BLE001 - the parameters' own error (an unknown class...): each member's
                for n in members:
                    answers[n] = exc
                continue
            at = 0
            for n in members:
                answers[n] = per_image[at : at + len(vectors[n])]
                at += len(vectors[n])
    return answers


def _ask(db: Any, kind: str, params: tuple[Any, ...], vectors: np.ndarray) -> list[Any]:
    """One call for all `vectors` (n, D) of one kind and parameters -> n answers."""
    if kind == "encode":
        return list(vectors)
    if kind == "search":
        (k,) = params
        results = db.search_vectors(vectors, k, fetch=True)  # labels read now: nothing left for a writer to read
        return [[hit.to_dict() for hit in results[q]] for q in range(len(vectors))]
    if kind == "classify":
        method, k, classes = params
        return [p.to_dict() for p in db.classify_vectors(vectors, method, k, list(classes) if classes else None)]
    if kind == "verify":
        label, threshold, rule = params
        return [db.verify_vector(v, label, threshold, rule).to_dict() for v in vectors]
    raise InvalidInputError(f"unknown question kind {kind!r}")


@dataclass(frozen=True)
class NewItem:
    """One upload to store: its (D,) vector, label, content hash (sha256 of the file) and stored path."""

    vector: Any
    label: str
    digest: str
    path: str


def commit_items(db: Any, items: Sequence[NewItem]) -> list[Any]:
    """Store a group of uploads in one hold of the index's write lock (group commit: the adds that queued while the
    last group was being written share the next transaction's lock hold); the derived index files are left for
    `db.save_files()` (DeferredSave), since each item is durable in the store already. Per item:
    (id, 1) when stored; (id, 0) when the index holds it already under that label (same content; also when an
    earlier item of the group was it), as `db.add` counts twins; or the exception that item alone raised. Each item
    is its own store transaction, durable before the answer, as with `db.add`."""
    answers: list[Any] = []
    with db.bulk_writes(save=False):  # the lock held across the group (twin checks see other processes' adds)
        for item in items:
            try:
                held = db.ids_by_label_hash([(item.label, item.digest)])
                if held:
                    answers.append((int(held[(item.label, item.digest)]), 0))
                else:
                    ids = db.add_vectors(np.asarray(item.vector)[None, :], [item.label], paths=[item.path],
                                         hashes=[item.digest])
                    answers.append((int(ids[0]), 1))
            except Exception as exc:  # noqa: BLE001 - this item's own answer; the others are stored
                answers.append(exc)
    return answers


class DeferredSave:
    """Call `save()` once writes pause: `touched()` after each write; the save runs when `delay` seconds passed
    without one, or `longest` seconds after the first unsaved write (a steady stream of adds still reaches the
    files), and at `close()`. A failed save is reported on stderr and tried again after the next write (the writes
    are durable in the store meanwhile; only the derived files lag, and an index opened meanwhile rebuilds them)."""

    def __init__(self, save: Callable[[], Any], delay: float = 0.5, longest: float = 5.0):
        self.save, self.delay, self.longest = save, float(delay), float(longest)
        self.saves = 0  # how many saves ran (for reports and tests)
        self._first: float | None = None  # when the oldest unsaved write happened
        self._last = 0.0
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="serve-save", daemon=True)
        self._thread.start()

    def touched(self) -> None:
        with self._cond:
            now = time.monotonic()
            if self._first is None:
                self._first = now
            self._last = now
            self._cond.notify_all()

    def _due(self) -> float | None:
        """Seconds until the save is due (<= 0: now), or None when nothing waits to be saved."""
        if self._first is None:
            return None
        return min(self._last + self.delay, self._first + self.longest) - time.monotonic()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and ((left := self._due()) is None or left > 0):
                    self._cond.wait(left)
                if self._first is None:
                    return  # closed with nothing to save
                self._first = None
                closing = self._closed
            self._save_once()
            if closing:
                return

    def _save_once(self) -> None:
        try:
            self.save()
            self.saves += 1
        except Exception as exc:  # noqa: BLE001 - a server goes on; the next write retries the save
            print(f"siamesedb serve: saving the index files failed ({exc}); will retry after the next write",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        """Save what waits to be saved, then stop."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=60)


__all__ = ["DEFAULT_MAX_BATCH", "DEFAULT_MAX_WAIT", "DeferredSave", "MicroBatcher", "NewItem", "Question",
           "answer_questions", "commit_items"]
