"""`siamesedb serve` under load (issue 28): micro-batching gives each request its own answer, batch endpoints answer
in the CLI's shapes, reads never wait behind a write (a write made slow on purpose, reads completing meanwhile), a
read after an acknowledged add sees it, mixed load loses and doubles nothing, and `--workers 2` shares one index.

Ordering is asserted with events (a read completed while the write was still held), never with timings; the
timeouts below only turn a hang into a failure.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn, python-multipart) is not installed")
pytest.importorskip("httpx", reason="httpx (FastAPI's TestClient) is not installed")

from fastapi.testclient import TestClient  # noqa: E402

from siamesedb.backends.faiss.backend import FaissBackend  # noqa: E402
from siamesedb.backends.faiss.store import ItemStore  # noqa: E402
from siamesedb.batching import MicroBatcher, Question, answer_questions  # noqa: E402
from siamesedb.db import SiameseDB  # noqa: E402
from siamesedb.errors import ImageLoadError, InvalidInputError  # noqa: E402
from siamesedb.locking import ReadWriteLock  # noqa: E402
from siamesedb.serve import create_app  # noqa: E402

from helpers import free_port, png_bytes  # noqa: E402 - tests/helpers.py
from test_serve import start_server, stop_server  # noqa: E402

WAIT = 60  # seconds before a test that would hang fails instead


def noise(seed: int, size: int = 40) -> Image.Image:
    """A distinct grey image per seed: its nearest indexed neighbour is itself (cosine 1)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), mode="L")


@pytest.fixture(scope="module")
def noise_index(tmp_path_factory) -> Path:
    """40 distinct images, each its own class `c00`..`c39`."""
    root = tmp_path_factory.mktemp("noise")
    for n in range(40):
        (root / "images" / f"c{n:02d}").mkdir(parents=True)
        noise(n).save(root / "images" / f"c{n:02d}" / "a.png")
    SiameseDB.build(root / "images", path=root / "index", device="cpu").close()
    return root / "index"


@pytest.fixture()
def index_copy(noise_index, tmp_path) -> Path:
    import shutil

    shutil.copytree(noise_index, tmp_path / "index")
    return tmp_path / "index"


def files(*images: Image.Image) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("file", (f"q{n}.png", png_bytes(image), "image/png")) for n, image in enumerate(images)]


class ThreadServer:
    """uvicorn serving `app` on a free port in a thread (real concurrency, unlike TestClient)."""

    def __init__(self, app):
        import uvicorn

        self.app = app
        self.url = f"http://127.0.0.1:{free_port()}"
        port = int(self.url.rsplit(":", 1)[1])
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        for _ in range(600):
            if self.server.started:
                return self
            threading.Event().wait(0.05)
        raise AssertionError("the server did not start")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=WAIT)

    def post(self, path: str, body: bytes, headers: dict | None = None) -> tuple[int, object]:
        request = urllib.request.Request(self.url + path, data=body, method="POST",
                                         headers={"Content-Type": "image/png", **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=WAIT) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def get(self, path: str) -> object:
        with urllib.request.urlopen(self.url + path, timeout=WAIT) as response:
            return json.loads(response.read())


# ---------------------------------------------------------------------------------------------- the batcher


def test_a_lone_request_never_waits_for_the_batch_window():
    # A 60 s window: a lone item waited for it would fail the 30 s result() below.
    batcher = MicroBatcher(lambda items: [item * 2 for item in items], max_batch=8, max_wait=10, workers=1)
    try:
        assert batcher.submit(21).result(timeout=30) == 42
        with batcher.reserve():
            pass  # announced, then refused (a bad upload): withdrawn, no batch waits for it
        assert batcher.submit(5).result(timeout=30) == 10
        assert batcher.batch_sizes == {1: 2}
    finally:
        batcher.close()


def test_the_batcher_groups_queued_items_and_answers_each_its_own():
    gate, started = threading.Event(), threading.Event()

    def run(items):
        started.set()
        gate.wait(WAIT)  # the first batch is held: the others queue behind it
        return [("done", item) for item in items]

    batcher = MicroBatcher(run, max_batch=4, max_wait=0, workers=1)
    try:
        first = batcher.submit(-1)
        assert started.wait(WAIT)
        futures = [batcher.submit(n) for n in range(10)]
        gate.set()
        assert first.result(WAIT) == ("done", -1)
        assert [f.result(WAIT) for f in futures] == [("done", n) for n in range(10)]
        assert batcher.batch_sizes == {1: 1, 4: 2, 2: 1}  # 10 queued items: batches of at most 4
    finally:
        batcher.close()


def test_a_failing_batch_fails_each_of_its_requests_and_the_batcher_goes_on():
    calls = []

    def run(items):
        calls.append(list(items))
        if "bad" in items:
            raise InvalidInputError("bad batch")
        return [item.upper() for item in items]

    batcher = MicroBatcher(run, workers=1)
    try:
        with pytest.raises(InvalidInputError, match="bad batch"):
            batcher.submit("bad").result(WAIT)
        assert batcher.submit("ok").result(WAIT) == "OK"
    finally:
        batcher.close()


@pytest.mark.parametrize("kwargs, message", [({"max_batch": 0}, "max_batch"), ({"max_wait": float("nan")}, "max_wait"),
                                             ({"workers": 0}, "workers")])
def test_batcher_settings_are_checked(kwargs, message):
    with pytest.raises(InvalidInputError, match=message):
        MicroBatcher(lambda items: items, **kwargs)


def test_one_bad_image_in_a_batch_fails_only_its_own_question(noise_index):
    with SiameseDB.open(noise_index, device="cpu") as db:
        questions = [Question("search", (noise(3),), (1,)), Question("search", ("/no/such/file.png",), (1,)),
                     Question("classify", (noise(7),), ("prototype", 5, None)), Question("encode", (noise(9),))]
        answers = answer_questions(db, questions)
        assert answers[0][0][0]["label"] == "c03"
        assert isinstance(answers[1], ImageLoadError)
        assert answers[2][0]["label"] == "c07"
        np.testing.assert_allclose(answers[3][0], db.encoder.encode(noise(9)), atol=1e-6)


# ---------------------------------------------------------------------------------------------- the HTTP answers


def test_each_concurrent_request_gets_its_own_answer_under_batching(noise_index):
    app = create_app(noise_index, device="cpu", max_batch=8, max_wait_ms=20, encode_workers=1)
    db, batcher = app.state.db, app.state.batcher
    encode, held = db.encoder.encode, threading.Event()

    def slow_first_encode(images, *args, **kwargs):
        if not held.is_set():  # hold the first batch until many requests queue behind it: batches must form
            held.set()
            for _ in range(WAIT * 5):
                if len(batcher._queue) >= 12:
                    break
                threading.Event().wait(0.05)
        return encode(images, *args, **kwargs)

    db.encoder.encode = slow_first_encode
    with ThreadServer(app) as server:
        def ask(n: int):
            kind = ("search?k=3", "classify", f"verify?label=c{n:02d}&threshold=0.99")[n % 3]
            return n, server.post(f"/{kind}", png_bytes(noise(n)))

        with ThreadPoolExecutor(max_workers=20) as pool:
            answers = list(pool.map(ask, range(40)))
    for n, (status, answer) in answers:
        assert status == 200, answer
        if n % 3 == 0:
            assert answer["hits"][0]["label"] == f"c{n:02d}" and answer["hits"][0]["score"] > 0.999
        elif n % 3 == 1:
            assert answer["label"] == f"c{n:02d}"
        else:
            assert answer["label"] == f"c{n:02d}" and answer["accepted"] is True
    assert max(batcher.batch_sizes) > 1, batcher.batch_sizes  # they were answered in batches
    assert sum(size * count for size, count in batcher.batch_sizes.items()) == 40


def test_several_files_answer_a_list_in_order_and_one_file_the_old_shape(noise_index):
    with TestClient(create_app(noise_index, device="cpu")) as client:
        images = [noise(4), noise(11), noise(30)]
        for path in ("/search?k=2", "/classify", "/verify?label=c11"):
            several = client.post(path, files=files(*images))
            assert several.status_code == 200
            answers = several.json()
            assert isinstance(answers, list) and len(answers) == 3
            for n, (image, answer) in enumerate(zip(images, answers)):
                alone = client.post(path, files=files(image)).json()
                assert isinstance(alone, dict)
                assert {**alone, "query": f"q{n}.png"} == answer
            raw = client.post(path, content=png_bytes(images[0]), headers={"Content-Type": "image/png"}).json()
            assert isinstance(raw, dict) and raw == {**answers[0], "query": "upload"}
        assert [a["hits"][0]["label"] for a in client.post("/search", files=files(*images)).json()] == \
            ["c04", "c11", "c30"]


def test_batch_requests_are_refused_whole_with_the_right_codes(noise_index):
    with TestClient(create_app(noise_index, device="cpu", max_files=4)) as client:
        too_many = client.post("/search", files=files(*[noise(n) for n in range(5)]))
        assert too_many.status_code == 413 and "limit is 4" in too_many.json()["detail"]
        junk = files(noise(1)) + [("file", ("junk.png", b"not an image", "image/png"))]
        refused = client.post("/search", files=junk)
        assert refused.status_code == 415 and "junk.png" in refused.json()["detail"]
        text_part = client.post("/search", files=files(noise(1)) + [("file", ("a.txt", b"hi", "text/plain"))])
        assert text_part.status_code == 415
        text_field = client.post("/search", data={"file": "text"}, files=[("other", ("a.png", b"x", "image/png"))])
        assert text_field.status_code == 422 and "file fields named 'file'" in text_field.json()["detail"]
        assert client.post("/verify?label=nope", files=files(noise(1), noise(2))).status_code == 404


# ---------------------------------------------------------------------------------------------- reads and writes


@pytest.mark.parametrize("hook", ["transaction", "file_save"])
def test_a_long_write_does_not_block_reads(index_copy, monkeypatch, hook):
    """A write held inside its open SQLite transaction, or in the FAISS file save (which the server runs after
    the add is answered, batching.DeferredSave), until the reads are done: the reads are answered meanwhile."""
    in_write, release, saved = threading.Event(), threading.Event(), threading.Event()
    original = ItemStore._bump if hook == "transaction" else FaissBackend.save

    def held(self, *args, **kwargs):
        if threading.current_thread().name != "MainThread" and not release.is_set():
            in_write.set()
            release.wait(WAIT)
        result = original(self, *args, **kwargs)
        saved.set()
        return result

    monkeypatch.setattr(ItemStore if hook == "transaction" else FaissBackend,
                        "_bump" if hook == "transaction" else "save", held)
    with ThreadServer(create_app(index_copy, device="cpu")) as server:
        with ThreadPoolExecutor(max_workers=1) as writer:
            add = writer.submit(server.post, "/items?label=new", png_bytes(noise(100)))
            assert in_write.wait(WAIT), "the add never reached the held step"
            reads = [server.post("/search?k=1", png_bytes(noise(5))), server.post("/classify", png_bytes(noise(6))),
                     server.post("/verify?label=c07", png_bytes(noise(7)))]
            labels = server.get("/labels")
            if hook == "transaction":
                write_still_held = not add.done()
            else:  # the add was answered without waiting for the file save, which is still held
                status, added = add.result(WAIT)
                write_still_held = not saved.is_set()
                found = server.post("/search?k=1", png_bytes(noise(100)))
            release.set()
            status, added = add.result(WAIT)
        assert saved.wait(WAIT) or hook == "transaction"
    assert write_still_held, "the write finished before the reads: nothing was tested"
    assert [r[0] for r in reads] == [200, 200, 200]
    assert reads[0][1]["hits"][0]["label"] == "c05" and reads[1][1]["label"] == "c06"
    if hook == "transaction":  # read while the transaction was open: the committed state, not half of the write
        assert "new" not in {entry["label"] for entry in labels}
    else:  # answered before its file save: already seen by searches
        assert found[1]["hits"][0]["label"] == "new"
    assert status == 200 and added["added"] == 1


def test_the_index_files_catch_up_once_adds_pause(index_copy):
    """Adds are durable in the store when answered; the FAISS file and manifest are saved once writes pause
    (DeferredSave), and an index opened before that save still holds every answered add (rebuilt from the store)."""
    from siamesedb.db import SiameseDB
    from siamesedb.layout import read_manifest

    app = create_app(index_copy, device="cpu")
    app.state.saver.delay = 0.3
    with ThreadServer(app) as server:
        for n in range(3):
            assert server.post(f"/items?label=late{n}", png_bytes(noise(300 + n)))[0] == 200
        with SiameseDB.open(index_copy, device="cpu") as other:  # before the save: rebuilt from the store
            assert {f"late{n}" for n in range(3)} <= set(other.label_counts())
            assert other.search(noise(301), k=1)[0].label == "late1"
        deadline = time.monotonic() + WAIT
        while app.state.saver.saves == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert app.state.saver.saves >= 1
        with SiameseDB.open(index_copy, device="cpu") as other:
            assert read_manifest(index_copy)["vectors_store_version"] == other.backend.version  # the file caught up


def test_a_read_after_an_acknowledged_add_sees_it(index_copy):
    with ThreadServer(create_app(index_copy, device="cpu")) as server:
        def add_then_search(n: int):
            status, added = server.post(f"/items?label=fresh{n}", png_bytes(noise(200 + n)))
            assert status == 200
            _, found = server.post("/search?k=1", png_bytes(noise(200 + n)))
            _, predicted = server.post("/classify", png_bytes(noise(200 + n)))
            return added["ids"][0], found["hits"][0]["id"], predicted["label"]

        with ThreadPoolExecutor(max_workers=6) as pool:  # adds of some threads while the others search
            seen = list(pool.map(add_then_search, range(12)))
        assert all(new_id == hit for new_id, hit, _ in seen)
        assert [label for _, _, label in seen] == [f"fresh{n}" for n in range(12)]


def test_mixed_load_loses_and_doubles_nothing(index_copy):
    token = "s3cret-token-for-the-test"
    with ThreadServer(create_app(index_copy, device="cpu", token=token)) as server:
        auth = {"Authorization": f"Bearer {token}"}
        adds = [n % 8 for n in range(24)]  # 8 distinct images, each sent 3 times

        def job(n: int):
            kind = n % 4
            if kind == 0:
                return "add", adds[n // 4], server.post(f"/items?label=m{adds[n // 4]}",
                                                        png_bytes(noise(300 + adds[n // 4])), auth)
            if kind == 1:
                return "search", None, server.post("/search?k=3", png_bytes(noise(n % 40)))
            if kind == 2:
                return "tokenless", None, server.post("/items?label=intruder", png_bytes(noise(999)))
            return "junk", None, server.post("/search", b"\x89PNG\r\n\x1a\n garbage")

        with ThreadPoolExecutor(max_workers=10) as pool:
            results = list(pool.map(job, range(96)))
        statuses = {kind: {s for k, _, (s, _) in results if k == kind} for kind in ("add", "search", "tokenless",
                                                                                    "junk")}
        assert statuses == {"add": {200}, "search": {200}, "tokenless": {401}, "junk": {400}}
        ids: dict[int, set[int]] = {}
        for kind, image, (_, answer) in results:
            if kind == "add":
                ids.setdefault(image, set()).update(answer["ids"])
        assert all(len(held) == 1 for held in ids.values())  # three sends of one image: one id
        assert sum(a["added"] for k, _, (_, a) in results if k == "add") == 8  # each stored exactly once
        counts = {entry["label"]: entry["count"] for entry in server.get("/labels")}
        assert {label: counts[label] for label in counts if label.startswith("m")} == {f"m{n}": 1 for n in range(8)}
        assert "intruder" not in counts and server.get("/info")["items"] == 48
    with SiameseDB.open(index_copy, device="cpu") as db:  # and on disk: the store and the FAISS file agree
        assert len(db) == 48 and db.search(noise(303), k=1)[0].label == "m3"


def test_two_worker_processes_share_one_index(index_copy):
    process, url = start_server(index_copy, "--workers", "2")
    try:
        def post(path: str, body: bytes):
            request = urllib.request.Request(url + path, data=body, method="POST",
                                             headers={"Content-Type": "image/png"})
            with urllib.request.urlopen(request, timeout=WAIT) as response:
                return json.loads(response.read())

        added = [post(f"/items?label=w{n}", png_bytes(noise(400 + n)))["ids"][0] for n in range(4)]
        with ThreadPoolExecutor(max_workers=8) as pool:  # many connections: both processes answer
            hits = list(pool.map(lambda n: post("/search?k=1", png_bytes(noise(400 + n % 4)))["hits"][0]["id"],
                                 range(32)))
        assert hits == [added[n % 4] for n in range(32)]
        with urllib.request.urlopen(url + "/info", timeout=WAIT) as response:
            assert json.loads(response.read())["items"] == 44
    finally:
        stop_server(process)


# ---------------------------------------------------------------------------------------------- the pieces


def test_the_read_write_lock_lets_readers_share_and_a_writer_wait():
    lock = ReadWriteLock()
    order = []
    reading, writer_waiting = threading.Event(), threading.Event()
    done = threading.Event()

    def reader():
        with lock.reading():
            reading.set()
            writer_waiting.wait(WAIT)
            with lock.reading():  # a nested read while a writer waits: no deadlock
                order.append("nested read")
            order.append("read")

    def writer():
        reading.wait(WAIT)
        writer_waiting.set()
        with lock.writing():
            order.append("write")
        done.set()

    threads = [threading.Thread(target=reader), threading.Thread(target=writer)]
    for thread in threads:
        thread.start()
    assert done.wait(WAIT)
    for thread in threads:
        thread.join(WAIT)
    assert order == ["nested read", "read", "write"]
    with lock.reading(), pytest.raises(RuntimeError, match="cannot take the write lock"):
        with lock.writing():
            pass


def test_each_thread_reads_the_store_through_its_own_connection(noise_index):
    store = ItemStore(Path(noise_index) / "items.sqlite")
    try:
        seen = []
        conn = store._db  # this thread's connection: an open write, never committed
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("UPDATE items SET label = 'changed' WHERE id = 1")
        assert store.labels_of(np.array([1])) == ["changed"]  # the writer sees its own change
        thread = threading.Thread(target=lambda: seen.append(store.labels_of(np.array([1]))))
        thread.start()
        thread.join(WAIT)
        conn.execute("ROLLBACK")
        assert seen == [["c00"]]  # the other thread read the committed state
    finally:
        store.close()



def test_serve_passes_its_batching_and_worker_options_on(noise_index, monkeypatch):
    from click.testing import CliRunner

    import siamesedb.serve
    from siamesedb.cli import cli

    seen = {}
    monkeypatch.setattr(siamesedb.serve, "serve", lambda index, **kwargs: seen.update(kwargs))
    result = CliRunner().invoke(cli, ["serve", "--index", str(noise_index), "--device", "cpu", "--workers", "3",
                                      "--max-batch", "8", "--max-wait-ms", "0.5"])
    assert result.exit_code == 0, result.output
    assert (seen["workers"], seen["max_batch"], seen["max_wait_ms"]) == (3, 8, 0.5)
    refused = CliRunner().invoke(cli, ["serve", "--index", str(noise_index), "--max-batch", "0"])
    assert refused.exit_code == 2 and "--max-batch" in refused.output


def test_serve_runs_one_process_per_core_on_the_cpu_by_default(noise_index, monkeypatch, tmp_path):
    """One Python process serves on about one core (its interpreter lock), so `serve` with no --workers runs one
    per core, at most 4, for a FAISS index on the CPU; one on a GPU and for other backends."""
    import json as json_module

    from click.testing import CliRunner

    import siamesedb.serve
    from siamesedb import devices
    from siamesedb.cli import cli
    from siamesedb.serve import default_workers

    monkeypatch.setattr(siamesedb.serve.os, "cpu_count", lambda: 2)
    assert default_workers(noise_index, "cpu") == 2
    monkeypatch.setattr(siamesedb.serve.os, "cpu_count", lambda: 16)
    assert default_workers(noise_index, "cpu") == 4
    monkeypatch.setattr(siamesedb.serve.os, "cpu_count", lambda: 1)
    assert default_workers(noise_index, "cpu") == 1
    monkeypatch.setattr(siamesedb.serve.os, "cpu_count", lambda: 8)
    monkeypatch.setattr(devices, "resolve_device", lambda device: "cuda")
    assert default_workers(noise_index, "auto") == 1
    monkeypatch.setattr(devices, "resolve_device", lambda device: "cpu")
    milvus = tmp_path / "milvus-index"
    milvus.mkdir()
    manifest = json_module.loads((noise_index / "manifest.json").read_text())
    (milvus / "manifest.json").write_text(json_module.dumps({**manifest, "backend": "milvus"}))
    assert default_workers(milvus, "cpu") == 1
    seen = {}
    monkeypatch.setattr(siamesedb.serve, "serve", lambda index, **kwargs: seen.update(kwargs))
    result = CliRunner().invoke(cli, ["serve", "--index", str(noise_index), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert seen["workers"] == 4 and "with 4 processes" in result.output


def test_adds_queued_behind_a_save_are_committed_together_once_each(index_copy, monkeypatch):
    app = create_app(index_copy, device="cpu")
    writer, saves, held = app.state.writer, [], threading.Event()
    original = FaissBackend.save

    def counted_save(self):
        if not held.is_set():  # the first group's save waits until the other adds queue behind it
            held.set()
            for _ in range(WAIT * 5):  # a quarter of the client's timeout at most
                if len(writer._queue) >= 3:
                    break
                threading.Event().wait(0.05)
        saves.append(1)
        return original(self)

    monkeypatch.setattr(FaissBackend, "save", counted_save)
    images = [noise(500 + n % 4) for n in range(8)]  # 4 distinct images, each sent twice
    with ThreadServer(app) as server:
        with ThreadPoolExecutor(max_workers=8) as pool:
            answers = list(pool.map(lambda n: server.post(f"/items?label=g{n % 4}", png_bytes(images[n])), range(8)))
        counts = {entry["label"]: entry["count"] for entry in server.get("/labels")}
    assert [status for status, _ in answers] == [200] * 8
    ids = {}
    for n, (_, answer) in enumerate(answers):
        ids.setdefault(n % 4, set()).update(answer["ids"])
    assert all(len(one) == 1 for one in ids.values()) and len(set().union(*ids.values())) == 4
    assert sum(answer["added"] for _, answer in answers) == 4
    assert {label: counts[label] for label in counts if label.startswith("g")} == {f"g{n}": 1 for n in range(4)}
    assert len(saves) < 8 and max(writer.batch_sizes) > 1  # grouped: fewer file saves than adds
    with SiameseDB.open(index_copy, device="cpu") as db:  # the last save mirrors the store
        assert db.backend.fresh and len(db) == 44
