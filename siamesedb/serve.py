"""`siamesedb serve`: an HTTP API (FastAPI) and a web page over one index.

Endpoints (the answers use the CLI's `--json` schema; one upload -> one element of the CLI's list):

    POST   /search          image -> {"query", "hits": [{"id", "label", "path", "score"[, "distance"]}]}
    POST   /classify        image -> {"query", "label", "score", "ranking": [{"label", "score"}]}
    POST   /verify?label=L  image -> {"query", "label", "accepted", "score", "threshold", "threshold_source"}
    GET    /info                  -> `siamesedb info --json`
    GET    /labels                -> [{"label", "count"}]
    GET    /items/{id}            -> {"id", "label", "path", "sha256", "image"}
    GET    /items/{id}/image      -> the item's image as PNG
    POST   /items?label=L   image -> {"label", "ids", "paths", "added", "already_stored"}  (token unless localhost)
    DELETE /items/{id}            -> {"removed", "items"}              (token-guarded unless bound to localhost)
    GET    /                      -> the web page (siamesedb/static/, no external resources)
    GET    /openapi.json, /docs   -> FastAPI's own schema and its interactive page

An image is sent either as the raw request body (Content-Type image/png, image/jpeg, ...; an optional `?name=`
names it in the answer) or as multipart/form-data with a file field named `file`. Several `file` fields (at most
64) ask about several images at once: /search, /classify and /verify then answer a list, one element per image in
the order sent, each of the one-image shape (the CLI's `--json` list); one image keeps the one-object answer.

Safety: the request body is capped (`max_upload_bytes`, checked on Content-Length and again while streaming), an
image's declared pixel count is checked before any pixel is decoded (`max_pixels`), only known image formats are
opened, labels pass the label rule (`checks.as_label`), and nothing the client sends is ever used as a file path: an
added image is saved as `uploads/<sha256>.<ext>` in the index, and `/items/{id}/image` reads only stored paths.

Under load (batching.py): each request's images are decoded in a worker thread, then concurrent requests are encoded
together, one encoder call per batch (`max_batch` requests, waiting at most `max_wait_ms` for requests still being
decoded, never for ones not sent), and searched with one call per kind of question. Reads never wait behind writes:
an add encodes through the same batcher, outside any lock, then commits through `db.add_vectors`, the adds that
queued meanwhile in one group (one hold of the index's write lock); the derived index files are saved once writes
pause (batching.DeferredSave). Searches meanwhile read the committed state (each thread its own SQLite connection)
and wait only for the in-memory FAISS add itself, not the commit nor the file save. An add that has been answered is
seen by every later request. (That is the FAISS backend; over any other the server asks the index one thing
at a time, as before.) Before reading, the server catches up with what other processes wrote
(`SiameseDB.refresh`), except while it is writing itself (its write catches up under the lock). `serve --workers N`
runs N such processes on one port (see `serve`; by default one per CPU core, `default_workers`).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import ipaddress
import json
import os
import secrets
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager, nullcontext
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from siamesedb import __version__
from siamesedb.batching import (DEFAULT_MAX_BATCH, DEFAULT_MAX_WAIT, DeferredSave, MicroBatcher, NewItem, Question,
                                answer_questions, commit_items)
from siamesedb.checks import as_label, as_threshold
from siamesedb.data import load_image
from siamesedb.errors import (EmptyIndexError, ImageLoadError, IndexNotFoundError, InvalidInputError,
                              NotCalibratedError, SiameseDBError, UnknownLabelError)
from siamesedb.classes import CLASSIFY_METHODS
from siamesedb.rules import VERIFY_RULES
from siamesedb.serve_models import (ERRORS, IMAGE_BODY, AddAnswer, ClassifyAnswer, ErrorAnswer, ItemAnswer, LabelCount,
                                    RemoveAnswer, SearchAnswer, VerifyAnswer)
from siamesedb.uploads import (DEFAULT_MAX_FILES, DEFAULT_MAX_PIXELS, DEFAULT_MAX_UPLOAD_BYTES,  # noqa: F401
                               UPLOAD_FORMATS, BodySizeLimit, UploadTooLarge, decode_upload, display_name, read_upload,
                               read_uploads, too_large)

UPLOAD_FOLDER = "uploads"
STATIC_DIR = Path(str(resources.files("siamesedb") / "static"))

# Named errors -> HTTP status; everything else a SiameseDBError is a 400.
ERROR_STATUS: list[tuple[type[SiameseDBError], int]] = [
    (UnknownLabelError, 404), (IndexNotFoundError, 404), (NotCalibratedError, 409), (EmptyIndexError, 409),
    (ImageLoadError, 400), (InvalidInputError, 422),
]


# ---------------------------------------------------------------------------------------------- the app


def one_torch_thread() -> None:
    """A CPU batch worker runs torch on one thread: the server runs one such worker per core, and a worker whose
    torch spread over every core too would ask for cores x cores threads (OpenMP teams spinning on each other)."""
    torch.set_num_threads(1)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def create_app(
    index: str | os.PathLike | Any,
    token: str | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    device: str = "auto",
    max_batch: int = DEFAULT_MAX_BATCH,
    max_wait_ms: float = DEFAULT_MAX_WAIT * 1000,
    encode_workers: int | None = None,
    max_files: int = DEFAULT_MAX_FILES,
) -> FastAPI:
    """The FastAPI app over one index (a folder, or an open SiameseDB).

    `token`: when given, POST /items and DELETE /items/{id} need `Authorization: Bearer <token>`; when None they
    are open (what `siamesedb serve` does only on a loopback address).
    `max_batch` / `max_wait_ms`: the micro-batcher's largest batch (requests) and longest wait for requests still
    being decoded (batching.py); `encode_workers`: threads running batches (default: one per torch CPU thread, one
    on a GPU); `max_files`: images one multipart request may carry.
    """
    from siamesedb.db import SiameseDB

    db = index if isinstance(index, SiameseDB) else SiameseDB.open(index, device=device)
    if encode_workers is None:
        encode_workers = 1 if db.encoder.device.type != "cpu" else max(1, torch.get_num_threads())
    # The FAISS backend reads while it writes (backends/faiss/backend.py: per-thread SQLite connections, a
    # readers-writer guard on the in-memory index); any other backend is asked one thing at a time, as before.
    one_at_a_time: Any = nullcontext() if db.manifest.get("backend", "faiss") == "faiss" else threading.RLock()
    refresh_lock = threading.Lock()  # held while catching up with other processes, and to start / end a write
    writes = [0]  # this server's writes in progress (under refresh_lock): no catching up meanwhile
    write_mutex = threading.Lock()  # this server's writes, one at a time

    def catch_up() -> None:
        """Catch up with what other processes wrote, unless this server is writing: that write caught up under the
        index's lock, and a refresh now would rebuild the in-memory index beside the writer's change."""
        with refresh_lock:
            if not writes[0]:
                db.refresh()

    @contextmanager
    def reading() -> Iterator[None]:
        """A read of the index: after catching up with what other processes wrote to it."""
        with one_at_a_time:
            catch_up()
            yield

    batcher = MicroBatcher(lambda questions: answer_questions(db, questions, reading), max_batch=max_batch,
                           max_wait=max_wait_ms / 1000, workers=encode_workers, name="serve-batch",
                           initializer=one_torch_thread if db.encoder.device.type == "cpu" else None)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        batcher.close()
        writer.close()
        saver.close()  # the index files saved before the process ends

    app = FastAPI(
        title="siamesedb",
        version=__version__,
        description=f"Similarity search, one-shot classification and verification over the index `{db.path}`. "
                    "Scores are cosine similarities: higher is more similar.",
        lifespan=lifespan,
    )
    app.state.db = db
    app.state.batcher = batcher  # batcher.batch_sizes: how many batches of each size ran
    app.add_middleware(BodySizeLimit, limit=max_upload_bytes)
    bearer = HTTPBearer(auto_error=False, description="The token printed by `siamesedb serve` (or given by --token).")

    def require_token(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if token is None:
            return
        if credentials is None or not secrets.compare_digest(credentials.credentials.encode(), token.encode()):
            raise HTTPException(401, "this endpoint needs the server's token (Authorization: Bearer TOKEN)",
                                headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(SiameseDBError)
    async def siamesedb_error(request: Request, exc: SiameseDBError) -> JSONResponse:
        status = getattr(exc, "status", None) or next((s for kind, s in ERROR_STATUS if isinstance(exc, kind)), 400)
        return JSONResponse({"detail": str(exc)}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own 422 body is a list of error objects; every error here has the one documented shape.
        problems = []
        for error in exc.errors():
            where = ".".join(str(part) for part in error.get("loc", ())[1:]) or "request"
            problems.append(f"{where}: {error.get('msg', 'invalid')}")
        return JSONResponse({"detail": "; ".join(problems) or "invalid request"}, status_code=422)

    @app.exception_handler(UploadTooLarge)
    async def upload_too_large(request: Request, exc: UploadTooLarge) -> JSONResponse:
        return too_large(max_upload_bytes)

    async def ask(request: Request, kind: str, params: tuple[Any, ...]) -> tuple[list[Any], list[str]]:
        """(answers, display names), one per image of the request: decoded in a worker thread (requests decode in
        parallel), then answered in a batch with other requests' images (batching.answer_questions)."""
        uploads = await read_uploads(request, max_files)
        with batcher.reserve() as submit:  # announced: a batch being cut waits (briefly) for this one
            images = await run_in_threadpool(lambda: tuple(decode_upload(d, n, max_pixels)[0] for d, n in uploads))
            future = submit(Question(kind, images, params))
        answers = await asyncio.wrap_future(future)
        return answers, [name for _, name in uploads]

    def shaped(answers: list[dict[str, Any]]) -> dict[str, Any] | list[dict[str, Any]]:
        """One image -> its answer (the shape clients had before batches); several -> the list, in the order sent."""
        return answers[0] if len(answers) == 1 else answers

    def read(fn: Any, *args: Any, **kwargs: Any) -> Any:
        """fn(...) after catching up with what other processes wrote to the index."""
        with reading():
            return fn(*args, **kwargs)

    @contextmanager
    def writing() -> Iterator[None]:
        """One write of this server at a time; no catching up with other processes while it runs (see catch_up)."""
        with write_mutex, one_at_a_time:
            with refresh_lock:
                writes[0] += 1
            try:
                yield
            finally:
                with refresh_lock:
                    writes[0] -= 1

    # ------------------------------------------------------------------ questions about an image

    @app.post("/search", response_model=SearchAnswer | list[SearchAnswer], response_model_exclude_none=True,
              responses=ERRORS, openapi_extra=IMAGE_BODY, tags=["query"])
    async def search(request: Request, k: int = Query(5, ge=1, le=1000, description="Neighbours to return.")):
        """The k most similar indexed items (highest cosine similarity first); several images: a list."""
        answers, names = await ask(request, "search", (k,))
        return shaped([{"query": name, "hits": hits} for name, hits in zip(names, answers)])

    @app.post("/classify", response_model=ClassifyAnswer | list[ClassifyAnswer], responses=ERRORS,
              openapi_extra=IMAGE_BODY, tags=["query"])
    async def classify(
        request: Request,
        method: Literal[CLASSIFY_METHODS] = Query("prototype", description="Nearest prototype, or a k-NN vote."),  # type: ignore[valid-type]
        k: int = Query(5, ge=1, le=1000, description="Neighbours that vote (knn only)."),
        classes: list[str] | None = Query(None, alias="class", description="Restrict to these classes (repeatable)."),
    ):
        """Which class the image belongs to, with every candidate class ranked best first; several images: a list."""
        answers, names = await ask(request, "classify", (method, k, tuple(classes) if classes else None))
        return shaped([{"query": name, **prediction} for name, prediction in zip(names, answers)])

    @app.post("/verify", response_model=VerifyAnswer | list[VerifyAnswer], responses=ERRORS,
              openapi_extra=IMAGE_BODY, tags=["query"])
    async def verify(
        request: Request,
        label: str = Query(..., min_length=1, description="The claimed class."),
        threshold: float | None = Query(None, description="Accept at or above this score (default: the index's "
                                        "calibration for the rule, else the encoder's own threshold)."),
        rule: Literal[VERIFY_RULES] | None = Query(None, description="Scoring rule (default: the calibrated one)."),  # type: ignore[valid-type]
    ):
        """Is the image of class `label`? Its score against the class's support set, compared with the threshold."""
        if threshold is not None:
            as_threshold(threshold)  # NaN / infinity: refused before the upload is decoded
        answers, names = await ask(request, "verify", (label, threshold, rule))
        return shaped([{**result, "query": name} for name, result in zip(names, answers)])

    # ------------------------------------------------------------------ the index

    @app.get("/info", tags=["index"])
    def info() -> dict[str, Any]:
        """Size, classes, dimension, encoder and calibration (as `siamesedb info --json`)."""
        return read(db.info)

    @app.get("/labels", response_model=list[LabelCount], tags=["index"])
    def labels():
        """Every class and how many items it holds, sorted by label."""
        counts = read(db.label_counts)
        return [{"label": label, "count": counts[label]} for label in sorted(counts)]

    def get_item(item_id: int) -> Any:
        """The item's metadata; 404 when the index holds no such id."""
        item = db.item(item_id)
        if item is None:
            raise HTTPException(404, f"{db.path}: no item with id {item_id}")
        return item

    @app.get("/items/{item_id}", response_model=ItemAnswer, responses=ERRORS, tags=["items"])
    def item_metadata(item_id: int):
        """An item's label, source path, content hash, and the URL of its image."""
        item = read(get_item, item_id)
        return {"id": item.id, "label": item.label, "path": item.path, "sha256": item.sha256,
                "image": f"/items/{item.id}/image"}

    @app.get("/items/{item_id}/image", responses={200: {"content": {"image/png": {}}}, **ERRORS}, tags=["items"])
    def item_image(item_id: int) -> Response:
        """The item's image, re-encoded as PNG (the path comes from the store, never from the request)."""
        item = read(get_item, item_id)
        if not item.path:
            raise HTTPException(404, f"item {item_id} was added without a file; there is no image to show")
        try:
            image = load_image(item.path)
        except ImageLoadError as exc:
            raise HTTPException(404, f"item {item_id}: {exc}") from None
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return Response(buffer.getvalue(), media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    @app.post("/items", response_model=AddAnswer, responses={401: {"model": ErrorAnswer}, **ERRORS},
              openapi_extra=IMAGE_BODY, dependencies=[Depends(require_token)], tags=["items"])
    async def add_item(request: Request, label: str = Query(..., min_length=1, description="Class of the image.")):
        """Add the image under `label`. It is stored as <index>/uploads/<sha256>.<ext>, a name the server chooses."""
        as_label(label)  # the label rule (README "Labels"), before the upload is read or written
        data, name = await read_upload(request)
        with batcher.reserve() as submit:
            image, image_format = await run_in_threadpool(decode_upload, data, name, max_pixels)
            future = submit(Question("encode", (image,)))  # refused above before anything is written
        vector = (await asyncio.wrap_future(future))[0]  # encoded with other requests, outside any lock
        digest = hashlib.sha256(data).hexdigest()  # = the content hash `db.add` stores for the same file
        target, created = await run_in_threadpool(save_upload, data, digest + UPLOAD_FORMATS[image_format])
        try:  # committed with the adds queued meanwhile (batching.commit_items); searches go on
            item_id, added = await asyncio.wrap_future(writer.submit(NewItem(vector, label, digest, str(target))))
        except Exception:
            if created:
                target.unlink(missing_ok=True)  # the store refused it: leave no orphan file
            raise
        item = await run_in_threadpool(read, get_item, item_id)
        return {"label": label, "ids": [item_id], "paths": [item.path], "added": added, "already_stored": 1 - added}

    def save_upload(data: bytes, name: str) -> tuple[Path, bool]:
        """uploads/<name> in the index (written via a temporary file and a rename); whether this call created it."""
        folder = Path(db.path) / UPLOAD_FOLDER
        folder.mkdir(exist_ok=True)
        target = (folder / name).resolve()
        if target.exists():
            return target, False
        partial = target.with_name(target.name + f".{secrets.token_hex(4)}.part")
        partial.write_bytes(data)
        os.replace(partial, target)
        return target, True

    def commit(items: list[NewItem]) -> list[Any]:
        with writing():
            answers = commit_items(db, items)  # durable in the store; the index files wait for `saver`
        saver.touched()
        return answers

    def save_files() -> None:
        with writing():
            db.save_files()

    writer = app.state.writer = MicroBatcher(commit, max_batch=256, max_wait=0, workers=1, name="serve-write")
    saver = app.state.saver = DeferredSave(save_files)

    @app.delete("/items/{item_id}", response_model=RemoveAnswer, responses={401: {"model": ErrorAnswer}, **ERRORS},
                dependencies=[Depends(require_token)], tags=["items"])
    def remove_item(item_id: int):
        """Remove one item."""
        with writing():  # db.remove catches up with other processes under the index's lock
            get_item(item_id)
            removed = db.remove(ids=[item_id])
            return {"removed": removed, "items": len(db)}

    # ------------------------------------------------------------------ the web page

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse((STATIC_DIR / "index.html").read_text(encoding="utf-8"))

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


SERVE_ENV = "SIAMESEDB_SERVE_APP"  # the app's settings, handed to `--workers` processes (JSON)


def app_from_env() -> FastAPI:
    """The app of one `serve --workers N` process, made from the settings its parent put in $SIAMESEDB_SERVE_APP;
    its torch threads are the CPU's share of one worker (N processes x 2 threads on 2 cores would thrash)."""
    settings = json.loads(os.environ[SERVE_ENV])
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // settings.pop("workers")))
    return create_app(settings.pop("index"), **settings)


MAX_DEFAULT_WORKERS = 4


def default_workers(index: str | os.PathLike, device: str = "auto") -> int:
    """`serve`'s process count when none is given: one per CPU core (at most 4) for a FAISS index encoded on the
    CPU, else 1. Why processes: one Python process serves HTTP, decodes, runs the encoder's layers and searches
    under one interpreter lock, so on the CPU it uses about one core however many there are (BENCHMARKS.md "Serving
    under load"); a GPU does the encoding in one process, and a Milvus Lite file admits one process only."""
    from siamesedb import devices
    from siamesedb.layout import read_manifest

    try:
        backend = read_manifest(Path(index)).get("backend", "faiss")
    except Exception:  # noqa: BLE001 - the index is checked (one clear line) where it is opened
        backend = "faiss"
    if backend != "faiss" or devices.resolve_device(device) != "cpu":
        return 1
    return max(1, min(MAX_DEFAULT_WORKERS, os.cpu_count() or 1))


def serve(
    index: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    device: str = "auto",
    log_level: str = "info",
    workers: int | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_wait_ms: float = DEFAULT_MAX_WAIT * 1000,
) -> None:
    """Open the index and serve it with uvicorn until interrupted.

    Bound to anything but a loopback address, the write endpoints always need a token: a random one is made (and
    printed on stderr) when none is given. `workers`: default_workers' choice when None; > 1: that many server
    processes share the port (uvicorn's
    workers), each with the index open: their writes take turns through the index's write lock, and each catches
    up with the others' writes before answering (SiameseDB.refresh), so an add answered by one is seen by the next
    request whichever process takes it; one token for all.
    """
    import uvicorn

    workers = workers or default_workers(index, device)
    if token is None and not is_loopback(host):
        token = secrets.token_urlsafe(24)
        print(f"write endpoints (POST /items, DELETE /items/ID) need: Authorization: Bearer {token}",
              file=sys.stderr, flush=True)
    settings = {"token": token, "max_upload_bytes": max_upload_bytes, "device": device, "max_batch": max_batch,
                "max_wait_ms": max_wait_ms}
    if workers > 1:
        os.environ[SERVE_ENV] = json.dumps({"index": str(Path(index).resolve()), "workers": workers, **settings})
        uvicorn.run("siamesedb.serve:app_from_env", factory=True, workers=workers, host=host, port=port,
                    log_level=log_level)
        return
    uvicorn.run(create_app(index, **settings), host=host, port=port, log_level=log_level)


__all__ = ["DEFAULT_MAX_PIXELS", "DEFAULT_MAX_UPLOAD_BYTES", "create_app", "decode_upload", "serve"]
