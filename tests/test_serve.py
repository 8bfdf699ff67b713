"""The HTTP API of `siamesedb serve`: same answers as the Python API / CLI, the published OpenAPI schema, the write
endpoints' token, upload limits (size, pixels, content type), no client path on disk, and a real server process
answering concurrent requests.

Most tests use FastAPI's in-process TestClient (milliseconds each); one starts `python -m siamesedb serve`.
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn, python-multipart) is not installed")
pytest.importorskip("httpx", reason="httpx (FastAPI's TestClient) is not installed")

from fastapi.testclient import TestClient  # noqa: E402

from siamesedb.db import SiameseDB  # noqa: E402
from siamesedb.serve import UPLOAD_FOLDER, create_app, is_loopback  # noqa: E402

from helpers import SHAPE_NAMES as NAMES  # noqa: E402 - tests/helpers.py
from helpers import draw_shape as draw  # noqa: E402
from helpers import free_port, png_bytes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def index_dir(drawn_shapes, tmp_path_factory) -> Path:
    """4 classes x 4 drawn shapes, indexed with the shipped encoder and calibrated."""
    path = tmp_path_factory.mktemp("index") / "shapes"
    with SiameseDB.build(drawn_shapes, path=path, device="cpu") as db:
        db.calibrate()
    return path


@pytest.fixture()
def writable_index(index_dir, tmp_path) -> Path:
    """A private copy of the index for tests that add or remove."""
    import shutil

    copy = tmp_path / "index"
    shutil.copytree(index_dir, copy)
    return copy


@pytest.fixture(scope="module")
def client(index_dir):
    with TestClient(create_app(index_dir, device="cpu")) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def reference(index_dir):
    db = SiameseDB.open(index_dir, device="cpu")
    yield db
    db.close()


QUERY = draw(1, 7)  # a square no indexed file holds


def test_search_answers_like_the_python_api(client, reference):
    response = client.post("/search?k=3&name=sq.png", content=png_bytes(QUERY), headers={"Content-Type": "image/png"})
    assert response.status_code == 200, response.text
    answer = response.json()
    expected = reference.search(QUERY, k=3)
    assert answer["query"] == "sq.png"
    assert [h["id"] for h in answer["hits"]] == [h.id for h in expected]
    assert [h["label"] for h in answer["hits"]] == [h.label for h in expected]
    np.testing.assert_allclose([h["score"] for h in answer["hits"]], [h.score for h in expected], atol=1e-5)
    assert set(answer["hits"][0]) == {"id", "label", "path", "score"}


def test_multipart_and_raw_uploads_give_the_same_answer(client):
    data = png_bytes(QUERY)
    raw = client.post("/search", content=data, headers={"Content-Type": "image/png"}).json()
    multipart = client.post("/search", files={"file": ("my query.png", data, "image/png")}).json()
    assert multipart["query"] == "my query.png" and raw["query"] == "upload"
    assert multipart["hits"] == raw["hits"]


def test_classify_and_an_episode_restricted_to_two_classes(client, reference):
    answer = client.post("/classify", content=png_bytes(QUERY), headers={"Content-Type": "image/png"}).json()
    expected = reference.classify(QUERY)
    assert answer["label"] == expected.label == "round/square"
    assert [r["label"] for r in answer["ranking"]] == [label for label, _ in expected.ranking]
    episode = client.post("/classify?class=line&class=triangle", content=png_bytes(QUERY),
                          headers={"Content-Type": "image/png"}).json()
    assert {r["label"] for r in episode["ranking"]} == {"line", "triangle"}
    knn = client.post("/classify?method=knn&k=3", content=png_bytes(QUERY), headers={"Content-Type": "image/png"})
    assert knn.json()["ranking"] == reference.classify(QUERY, method="knn", k=3).to_dict()["ranking"]
    unknown = client.post("/classify?class=nope", content=png_bytes(QUERY), headers={"Content-Type": "image/png"})
    assert unknown.status_code == 404 and "nope" in unknown.json()["detail"]


def test_verify_uses_the_calibrated_threshold(client, reference):
    accepted = client.post("/verify?label=round/square", content=png_bytes(QUERY),
                           headers={"Content-Type": "image/png"}).json()
    expected = reference.verify(QUERY, "round/square")
    assert accepted == {**expected.to_dict(), "query": "upload"}
    strict = client.post("/verify?label=round/square&threshold=1.01", content=png_bytes(QUERY),
                         headers={"Content-Type": "image/png"}).json()
    assert strict["accepted"] is False and strict["threshold"] == 1.01
    missing = client.post("/verify?label=hexagon", content=png_bytes(QUERY), headers={"Content-Type": "image/png"})
    assert missing.status_code == 404 and "hexagon" in missing.json()["detail"]
    no_label = client.post("/verify", content=png_bytes(QUERY), headers={"Content-Type": "image/png"})
    assert no_label.status_code == 422


def test_info_labels_and_items(client, reference):
    info = client.get("/info").json()
    assert info["items"] == 16 and info["classes"] == 4 and info["calibration"]["threshold"] > 0
    assert client.get("/labels").json() == [{"label": n, "count": 4} for n in sorted(NAMES)]
    hit = reference.search(QUERY, k=1)[0]
    item = client.get(f"/items/{hit.id}").json()
    assert item["label"] == hit.label and item["path"] == hit.path and item["image"] == f"/items/{hit.id}/image"
    image = client.get(item["image"])
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    served = np.asarray(Image.open(io.BytesIO(image.content)).convert("L"))
    assert np.array_equal(served, np.asarray(Image.open(hit.path).convert("L")))
    assert client.get("/items/999999").status_code == 404
    assert client.get("/items/999999/image").status_code == 404
    assert client.get("/items/abc").status_code == 422


def test_the_openapi_schema_documents_every_endpoint(client):
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    expected = {"/search": "post", "/classify": "post", "/verify": "post", "/info": "get", "/labels": "get",
                "/items/{item_id}": "get", "/items/{item_id}/image": "get", "/items": "post"}
    for path, method in expected.items():
        assert method in paths[path], path
    assert "delete" in paths["/items/{item_id}"]
    body = paths["/search"]["post"]["requestBody"]["content"]
    assert set(body) == {"image/*", "multipart/form-data"}
    answer = paths["/search"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    # One image: a SearchAnswer; several `file` fields: a list of them.
    one, several = answer["anyOf"]
    assert one["$ref"].endswith("/SearchAnswer") and several["items"]["$ref"].endswith("/SearchAnswer")
    file_field = body["multipart/form-data"]["schema"]["properties"]["file"]
    assert file_field["type"] == "array" and file_field["items"]["format"] == "binary"
    assert set(schema["components"]["schemas"]["VerifyAnswer"]["properties"]) == {
        "query", "label", "accepted", "score", "threshold", "threshold_source"}
    assert "security" in paths["/items"]["post"] and "security" not in paths["/search"]["post"]
    assert "swagger" in client.get("/docs").text.lower()


def test_the_web_page_and_its_assets_are_served_without_external_resources(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for asset in ("/static/app.js", "/static/style.css"):
        assert asset in page.text
        assert client.get(asset).status_code == 200
    for text in (page.text, client.get("/static/app.js").text, client.get("/static/style.css").text):
        assert "http://" not in text and "https://" not in text  # offline: nothing from a CDN


def test_wrong_content_is_refused_with_the_right_status(client):
    cases = [
        ({"content": b"hello", "headers": {"Content-Type": "text/plain"}}, 415),
        ({"content": b"<svg/>", "headers": {"Content-Type": "image/svg+xml"}}, 415),  # not a raster format we open
        ({"content": b"not a png", "headers": {"Content-Type": "image/png"}}, 415),
        ({"content": b"", "headers": {"Content-Type": "image/png"}}, 400),
        ({"content": png_bytes(QUERY)[:60], "headers": {"Content-Type": "image/png"}}, 400),  # truncated
        ({"files": {"image": ("q.png", png_bytes(QUERY), "image/png")}}, 422),  # wrong field name
        ({"files": {"file": ("q.txt", b"hello", "text/plain")}}, 415),
        ({"json": {"path": "/etc/passwd"}}, 415),  # a path is never an image
    ]
    for kwargs, status in cases:
        response = client.post("/search", **kwargs)
        assert response.status_code == status, (kwargs, response.text)
        detail = response.json()["detail"]
        assert isinstance(detail, (str, list)) and "\n" not in str(detail)


def bomb_png(width: int, height: int) -> bytes:
    """A valid tiny PNG whose header declares width x height pixels (the IHDR is patched, its CRC recomputed)."""
    data = bytearray(png_bytes(Image.new("L", (1, 1), 255)))
    ihdr = 8 + 8  # signature, then length + type of the first chunk
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])))
    return bytes(data)


def test_size_and_pixel_limits(index_dir):
    with TestClient(create_app(index_dir, max_upload_bytes=4096, max_pixels=100_000, device="cpu")) as small:
        big = png_bytes(Image.effect_noise((128, 128), 64).convert("L"))  # noise does not compress: > 4 KiB
        assert len(big) > 4096
        assert small.post("/search", content=big, headers={"Content-Type": "image/png"}).status_code == 413

        def chunks():  # no Content-Length: the limit must hold while the body streams
            for start in range(0, len(big), 1000):
                yield big[start:start + 1000]

        streamed = small.post("/search", content=chunks(), headers={"Content-Type": "image/png"})
        assert streamed.status_code == 413
        boundary = "xyzzy"
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"q.png\"\r\n"
                f"Content-Type: image/png\r\n\r\n").encode()

        def multipart_chunks():  # the same limit while a multipart form streams in
            yield head
            yield from chunks()
            yield f"\r\n--{boundary}--\r\n".encode()

        streamed = small.post("/search", content=multipart_chunks(),
                              headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        assert streamed.status_code == 413
        # Refused from the header, nothing decoded: no PIL pixel load starts (asserted on behaviour, not on a
        # wall-clock bound, which a busy shared machine would break).
        from PIL import ImageFile

        decoded = []
        real_load = ImageFile.ImageFile.load
        ImageFile.ImageFile.load = lambda self: decoded.append(self.size) or real_load(self)
        try:
            bomb = small.post("/search", content=bomb_png(9000, 9000), headers={"Content-Type": "image/png"})
            assert bomb.status_code == 413 and "9000x9000" in bomb.json()["detail"]
            huge = small.post("/search", content=bomb_png(50_000, 50_000), headers={"Content-Type": "image/png"})
            assert huge.status_code == 413 and "too large" in huge.json()["detail"]
        finally:
            ImageFile.ImageFile.load = real_load
        assert decoded == []
        ok = small.post("/search", content=png_bytes(QUERY), headers={"Content-Type": "image/png"})
        assert ok.status_code == 200


def test_add_and_remove_store_uploads_under_server_chosen_names(writable_index):
    with TestClient(create_app(writable_index, device="cpu")) as client:
        data = png_bytes(draw(3, 9))
        added = client.post("/items?label=triangle&name=../../../../tmp/evil.png", content=data,
                            headers={"Content-Type": "image/png"})
        assert added.status_code == 200, added.text
        answer = added.json()
        saved = Path(answer["paths"][0])
        assert saved.parent == writable_index / UPLOAD_FOLDER and saved.read_bytes() == data
        assert saved.stem == __import__("hashlib").sha256(data).hexdigest()
        assert not Path("/tmp/evil.png").exists()
        new_id = answer["ids"][0]
        assert client.get(f"/items/{new_id}").json()["label"] == "triangle"
        assert client.get("/info").json()["items"] == 17
        # A multipart file name with a path is only ever a display name, never a place on disk.
        multipart = client.post("/items?label=line", files={"file": ("/etc/cron.d/x.png", png_bytes(draw(2, 9)),
                                                                      "image/png")})
        assert multipart.status_code == 200 and Path(multipart.json()["paths"][0]).parent == saved.parent
        bad = client.post("/items?label=line", content=b"junk", headers={"Content-Type": "image/png"})
        assert bad.status_code == 415 and len(list(saved.parent.iterdir())) == 2
        removed = client.delete(f"/items/{new_id}")
        assert removed.json() == {"removed": 1, "items": 17}
        assert client.delete(f"/items/{new_id}").status_code == 404
    with SiameseDB.open(writable_index, device="cpu") as db:
        assert len(db) == 17  # what the server did is on disk


def test_write_endpoints_need_the_token_when_one_is_set(writable_index):
    with TestClient(create_app(writable_index, token="s3cret", device="cpu")) as client:
        data = png_bytes(draw(0, 9))
        headers = {"Content-Type": "image/png"}
        assert client.post("/items?label=x", content=data, headers=headers).status_code == 401
        wrong = client.post("/items?label=x", content=data, headers={**headers, "Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert client.delete("/items/1").status_code == 401
        assert client.post("/search", content=data, headers=headers).status_code == 200  # reading stays open
        right = client.post("/items?label=x", content=data, headers={**headers, "Authorization": "Bearer s3cret"})
        assert right.status_code == 200
        assert client.delete("/items/1", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client.get("/info").json()["items"] == 16


def test_the_server_sees_what_another_process_writes(writable_index):
    with TestClient(create_app(writable_index, device="cpu")) as client:
        query = png_bytes(draw(0, 9))
        headers = {"Content-Type": "image/png"}
        before = client.post("/verify?label=round/circle", content=query, headers=headers).json()
        with SiameseDB.open(writable_index, device="cpu") as other:  # e.g. `siamesedb add` while the server runs
            new_id = int(other.add(draw(0, 9), "hexagon"))
            other.calibrate(target_far=0.0)
            threshold = other.manifest["calibration"]["threshold"]
        hits = client.post("/search?k=1", content=query, headers=headers).json()["hits"]
        assert hits[0]["id"] == new_id and hits[0]["label"] == "hexagon"
        assert client.get("/info").json()["items"] == 17
        after = client.post("/verify?label=round/circle", content=query, headers=headers).json()
        assert after["threshold"] == threshold != before["threshold"]
        with SiameseDB.open(writable_index, device="cpu") as other:
            other.remove(label="hexagon")
        assert client.post("/search?k=1", content=query, headers=headers).json()["hits"][0]["id"] != new_id
        assert client.get(f"/items/{new_id}").status_code == 404


def test_refresh_mid_write_rebuilds_in_memory_and_writes_nothing(writable_index):
    from siamesedb.db import MANIFEST_FILE, VECTORS_FILE

    with SiameseDB.open(writable_index, device="cpu") as server_view, \
            SiameseDB.open(writable_index, device="cpu") as writer:
        assert server_view.refresh() is False  # nothing happened yet
        files = {name: (writable_index / name).stat().st_mtime_ns for name in (MANIFEST_FILE, VECTORS_FILE)}
        vector = writer.encoder.encode(draw(2, 9))[None, :]
        # The writer has committed to the store but not yet written its FAISS file and manifest.
        new_id = int(writer.store.add(["line"], [""], ["f" * 64], vector)[0])
        assert server_view.refresh() is True
        assert server_view.search_vectors(vector, k=1)[0][0].id == new_id
        assert server_view.refresh() is False  # caught up: no second rebuild until something else changes
        assert {name: (writable_index / name).stat().st_mtime_ns for name in files} == files


def test_loopback_detection():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1") and is_loopback("127.0.0.2")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4") and not is_loopback("example.org")


# ---------------------------------------------------------------------------------------------- a real server


def start_server(index: Path, *args: str) -> tuple[subprocess.Popen, str]:
    """`python -m siamesedb serve` on a free port; returns once GET /info answers (or fails the test)."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "siamesedb", "serve", "--index", str(index), "--port", str(port), "--device", "cpu",
         *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited: {process.stderr.read()}")
        try:
            with urllib.request.urlopen(url + "/info", timeout=2):
                return process, url
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.2)
    process.kill()
    pytest.fail("server did not start within 60 s")


def stop_server(process: subprocess.Popen) -> str:
    process.terminate()
    try:
        _, err = process.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        _, err = process.communicate()
    return err


def post(url: str, data: bytes, content_type: str = "image/png", headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=data, method="POST",
                                     headers={"Content-Type": content_type, **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_the_real_server_answers_concurrent_requests_like_sequential_ones(writable_index):
    process, url = start_server(writable_index)
    try:
        queries = [png_bytes(draw(kind, variant)) for kind in range(4) for variant in (5, 6, 7)]
        sequential = [post(f"{url}/search?k=4", q) for q in queries]
        assert all(status == 200 for status, _ in sequential)
        with ThreadPoolExecutor(max_workers=8) as pool:
            concurrent = list(pool.map(lambda q: post(f"{url}/search?k=4", q), queries * 2))
        assert concurrent == sequential * 2
        # Concurrent writes: each add gets its own id, and all of them are there afterwards.
        with ThreadPoolExecutor(max_workers=6) as pool:
            adds = list(pool.map(lambda i: post(f"{url}/items?label=new", png_bytes(draw(i % 4, 10 + i))), range(6)))
        ids = [answer["ids"][0] for status, answer in adds if status == 200]
        assert len(set(ids)) == 6
        with urllib.request.urlopen(url + "/labels") as response:
            assert {"label": "new", "count": 6} in json.loads(response.read())
        with urllib.request.urlopen(url + "/openapi.json") as response:
            assert "/search" in json.loads(response.read())["paths"]
    finally:
        stop_server(process)


def test_a_server_on_all_interfaces_guards_writes_with_a_made_up_token(writable_index):
    process, url = start_server(writable_index, "--host", "0.0.0.0")
    try:
        status, answer = post(f"{url}/items?label=x", png_bytes(draw(0, 9)))
        assert status == 401 and "token" in answer["detail"]
        assert post(f"{url}/search", png_bytes(draw(0, 9)))[0] == 200
    finally:
        err = stop_server(process)
    token_lines = [line for line in err.splitlines() if "Bearer" in line]
    assert len(token_lines) == 1 and len(token_lines[0].split("Bearer ")[1].strip()) >= 24


def test_serving_a_missing_index_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "siamesedb", "serve", "--index", str(tmp_path / "none")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "no index" in result.stderr
