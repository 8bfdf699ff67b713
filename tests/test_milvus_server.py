"""The Milvus backend on a real Milvus server ($SIAMESEDB_MILVUS_URI; `make test` and .ci/run start one with
tools/milvus_server.py): concurrent writer processes that lose nothing and never share an id, reservations that
lose to a rival and retry above it, removal by label while another host adds to it, and two index folders ("two
hosts") over one collection sharing calibrations and seeing each other's adds. Under CI=true a missing server fails
these tests instead of skipping them. Every collection a test makes is dropped at its end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pymilvus", reason="the Milvus backend needs pymilvus: pip install siamesedb[milvus]")

from siamesedb.backends.milvus import MilvusBackend  # noqa: E402
from siamesedb.backends.milvus.meta import CLAIM  # noqa: E402

from helpers import missing, unit_rows  # noqa: E402 - tests/helpers.py

ROOT = Path(__file__).resolve().parents[1]
SERVER_URI = os.environ.get("SIAMESEDB_MILVUS_URI")
DIM = 8
# 4 writer processes x WRITER_ADDS single-item adds at once (issue 25: 4 x 250); $SIAMESEDB_MILVUS_WRITER_ADDS
# may lower it where the server is slow.
WRITERS = 4
WRITER_ADDS = int(os.environ.get("SIAMESEDB_MILVUS_WRITER_ADDS", "250"))


@pytest.fixture
def server() -> str:
    if not SERVER_URI:
        missing("no Milvus server ($SIAMESEDB_MILVUS_URI is unset)",
                "run `make test` (it starts one), or start one with `python tools/milvus_server.py start` and set "
                "SIAMESEDB_MILVUS_URI to the URI it prints")
    return SERVER_URI


@pytest.fixture
def collection(server):
    """A fresh collection name; the collection and its side collections are dropped at the end."""
    name = f"siamesedb_test_{uuid.uuid4().hex[:10]}"
    yield name
    backend = MilvusBackend(server, name, DIM)
    backend.drop()


def _add_one(backend: MilvusBackend, label: str, path: str, seed: int) -> int:
    return int(backend.add(None, [label], [path], [path], unit_rows(1, seed, DIM))[0])


def test_concurrent_writer_processes_store_every_add_once_with_unique_ids(server, collection, tmp_path):
    MilvusBackend(server, collection, DIM).close()  # made before the writers start: they only add
    writer = textwrap.dedent(f"""
        import json, sys, time
        import numpy as np
        from siamesedb.backends.milvus import MilvusBackend
        w, start = int(sys.argv[1]), float(sys.argv[2])
        backend = MilvusBackend({server!r}, {collection!r}, {DIM})
        while time.time() < start:
            time.sleep(0.01)
        out = {{}}
        for i in range({WRITER_ADDS}):
            path = f"w{{w}}/{{i}}"
            vector = np.random.default_rng(w * 100000 + i).normal(size=(1, {DIM})).astype(np.float32)
            out[path] = int(backend.add(None, ["w%d" % w], [path], [path], vector)[0])
        print(json.dumps(out))
    """)
    start = time.time() + 5  # all begin together, once every process is connected
    procs = [subprocess.Popen([sys.executable, "-c", writer, str(w), str(start)], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for w in range(WRITERS)]
    acknowledged: dict[str, int] = {}
    for proc in procs:
        out, err = proc.communicate(timeout=1200)
        assert proc.returncode == 0, err[-2000:]
        acknowledged.update(json.loads(out))
    assert len(acknowledged) == WRITERS * WRITER_ADDS
    ids = list(acknowledged.values())
    assert len(set(ids)) == len(ids), "an id was handed to two adds"
    backend = MilvusBackend(server, collection, DIM, must_exist=True)
    try:
        assert backend.count() == WRITERS * WRITER_ADDS  # every acknowledged add is there, exactly once
        stored = {item.path: item.id for item in backend.items(np.asarray(ids, dtype=np.int64))}
        assert stored == acknowledged  # each under the id its add returned
    finally:
        backend.close()


def test_a_reservation_that_a_rival_overlaps_loses_and_retries_above(server, collection):
    """A rival claims the very ids this writer read as free (another host between its read and its claim): this
    writer sees the rival's claim and claims again above it. With the old read-modify-write mark, both got them."""
    first, rival = MilvusBackend(server, collection, DIM), MilvusBackend(server, collection, DIM)
    try:
        assert _add_one(first, "a", "p0", 0) == 1
        real = first._rows_above
        rival_ids: list[int] = []

        def rival_between_read_and_claim(floor):
            rows = real(floor)
            if not rival_ids:  # the first read: the rival adds 3 items before this writer's claim goes in
                rival_ids.extend(rival.add(None, ["b"] * 3, ["r1", "r2", "r3"], ["r1", "r2", "r3"],
                                           unit_rows(3, 1, DIM)).tolist())
            return rows

        first._rows_above = rival_between_read_and_claim
        mine = first.add(None, ["a"] * 2, ["p1", "p2"], ["p1", "p2"], unit_rows(2, 2, DIM)).tolist()
        assert rival_ids == [2, 3, 4] and mine == [5, 6]
        # A claim of a writer that died before its rows (ids 7-9) still blocks those ids: they are never handed out.
        rival._log(CLAIM, 7, 10)
        assert _add_one(first, "a", "p3", 3) == 10
        assert first.count() == 7 and first.vectors()[0].tolist() == [1, 2, 3, 4, 5, 6, 10]
    finally:
        first.close()
        rival.close()


def test_remove_label_while_another_host_adds_to_it_removes_only_what_it_read(server, collection):
    """remove_label removes the items of the label held when it reads them, by id: an item another host adds to the
    label meanwhile stays (and is reported by neither)."""
    here, there = MilvusBackend(server, collection, DIM), MilvusBackend(server, collection, DIM)
    try:
        held = [_add_one(here, "x", f"x{i}", i) for i in range(3)]
        _add_one(here, "y", "y0", 9)
        real = here._ids_where
        late: list[int] = []

        def another_host_adds_after_the_read(expression):
            ids = real(expression)
            late.append(_add_one(there, "x", "x-late", 7))
            return ids

        here._ids_where = another_host_adds_after_the_read
        removed = here.remove_label("x")
        assert removed.tolist() == held
        assert there.label_counts() == {"x": 1, "y": 1}
        assert [item.path for item in there.items(np.asarray(late))] == ["x-late"]
    finally:
        here.close()
        there.close()


def test_two_hosts_share_calibrations_and_see_each_others_adds(server, tmp_path, drawn_shapes, encoder_dir):
    """Two index folders over one collection (the folder copied to a second machine): a calibration made on host A
    answers verify on host B with A's threshold; B's caches follow A's adds (keyed on the server's version)."""
    from siamesedb.db import SiameseDB
    from siamesedb.errors import NotCalibratedError
    from siamesedb.images import load_image

    host_a = SiameseDB.build(drawn_shapes, path=tmp_path / "hostA", encoder=str(encoder_dir), backend="milvus",
                             milvus_uri=server)
    try:
        shutil.copytree(tmp_path / "hostA", tmp_path / "hostB")
        host_b = SiameseDB.open(tmp_path / "hostB")
        try:
            probe = sorted((drawn_shapes / "line").glob("*.png"))[0]
            with pytest.raises(NotCalibratedError):  # nobody calibrated yet (the tiny encoder carries no threshold)
                host_b.verify(probe, label="line")
            calibration = host_a.calibrate(target_far=0.1)
            # A fresh open on B (the CLI) and a long-lived handle that refreshes (a server) both see it.
            with SiameseDB.open(tmp_path / "hostB") as fresh:
                answer = fresh.verify(probe, label="line")
                assert answer.threshold_source.startswith("index:prototype:")  # the index's calibration: A's
                assert answer.threshold == pytest.approx(calibration["threshold"])
            assert host_b.refresh()
            assert host_b.verify(probe, label="line").threshold == pytest.approx(calibration["threshold"])
            assert json.loads((tmp_path / "hostB" / "manifest.json").read_text()).get("calibrations") in (None, {})
            # B's class table and search follow A's adds.
            before = host_b.label_counts()
            new_id = host_a.add(load_image(probe).rotate(90), label="turned")
            assert host_b.label_counts() == {**before, "turned": 1}
            assert new_id in [hit.id for hit in host_b.search(load_image(probe).rotate(90), k=3)]
        finally:
            host_b.close()
    finally:
        host_a.backend.drop()
        host_a.close()
