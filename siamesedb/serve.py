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
names it in the answer) or as multipart/form-data with one file field named `file`.

Safety: the request body is capped (`max_upload_bytes`, checked on Content-Length and again while streaming), an
image's declared pixel count is checked before any pixel is decoded (`max_pixels`), only known image formats are
opened, labels pass the label rule (`checks.as_label`), and nothing the client sends is ever used as a file path: an
added image is saved as `uploads/<sha256>.<ext>` in the index, and `/items/{id}/image` reads only stored paths.

Concurrency: requests are served from a thread pool. Encoding (the slow part) runs in parallel; every call into the
index (FAISS, SQLite, the prototype cache) holds one lock, so reads never see a half-done write. Before each call the
server catches up, reading only, with what other processes wrote (`SiameseDB.refresh`: adds, removals, calibrations).
"""

from __future__ import annotations

import hashlib
import io
import ipaddress
import os
import secrets
import sys
import threading
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from siamesedb import __version__
from siamesedb.checks import as_label, as_threshold
from siamesedb.data import load_image
from siamesedb.errors import (EmptyIndexError, ImageLoadError, IndexNotFoundError, InvalidInputError,
                              NotCalibratedError, SiameseDBError, UnknownLabelError)
from siamesedb.classes import CLASSIFY_METHODS
from siamesedb.rules import VERIFY_RULES
from siamesedb.uploads import (DEFAULT_MAX_PIXELS, DEFAULT_MAX_UPLOAD_BYTES, UPLOAD_FORMATS,  # noqa: F401
                               BodySizeLimit, UploadTooLarge, decode_upload, display_name, read_upload, too_large)

UPLOAD_FOLDER = "uploads"
STATIC_DIR = Path(str(resources.files("siamesedb") / "static"))

# Named errors -> HTTP status; everything else a SiameseDBError is a 400.
ERROR_STATUS: list[tuple[type[SiameseDBError], int]] = [
    (UnknownLabelError, 404), (IndexNotFoundError, 404), (NotCalibratedError, 409), (EmptyIndexError, 409),
    (ImageLoadError, 400), (InvalidInputError, 422),
]


# ---------------------------------------------------------------------------------------------- answer schemas


class HitModel(BaseModel):
    id: int
    label: str
    path: str
    score: float
    distance: float | None = None  # Euclidean indexes only (score = -distance), as the CLI's JSON; left out otherwise


class SearchAnswer(BaseModel):
    query: str
    hits: list[HitModel]


class RankedLabel(BaseModel):
    label: str
    score: float


class ClassifyAnswer(BaseModel):
    query: str
    label: str
    score: float
    ranking: list[RankedLabel]


class VerifyAnswer(BaseModel):
    query: str
    label: str
    accepted: bool
    score: float
    threshold: float
    threshold_source: str  # index:<rule>:<genuine>/<impostor> pairs, encoder, or given


class ItemAnswer(BaseModel):
    id: int
    label: str
    path: str
    sha256: str
    image: str  # URL of the item's image on this server


class AddAnswer(BaseModel):
    label: str
    ids: list[int]
    paths: list[str]  # as stored (absolute), the path GET /items/{id} gives
    added: int  # 1, or 0 when the index held this image under this label already (its id is returned)
    already_stored: int  # 1 - added, as `siamesedb add --json` counts them


class RemoveAnswer(BaseModel):
    removed: int
    items: int


class LabelCount(BaseModel):
    label: str
    count: int


class ErrorAnswer(BaseModel):
    detail: str


# The request body of every image endpoint, for the OpenAPI schema (the handlers read the body themselves so that
# raw bytes and multipart are both accepted and the size limit applies while streaming).
IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "description": "The image: raw bytes with an image/* Content-Type, or multipart/form-data with a `file` field.",
        "content": {
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {"type": "object", "required": ["file"],
                           "properties": {"file": {"type": "string", "format": "binary"}}}
            },
        },
    }
}
ERRORS = {status: {"model": ErrorAnswer} for status in (400, 404, 409, 413, 415, 422)}


# ---------------------------------------------------------------------------------------------- the app


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
) -> FastAPI:
    """The FastAPI app over one index (a folder, or an open SiameseDB).

    `token`: when given, POST /items and DELETE /items/{id} need `Authorization: Bearer <token>`; when None they
    are open (what `siamesedb serve` does only on a loopback address).
    """
    from siamesedb.db import SiameseDB

    db = index if isinstance(index, SiameseDB) else SiameseDB.open(index, device=device)
    lock = threading.Lock()
    app = FastAPI(
        title="siamesedb",
        version=__version__,
        description=f"Similarity search, one-shot classification and verification over the index `{db.path}`. "
                    "Scores are cosine similarities: higher is more similar.",
    )
    app.state.db = db
    app.state.lock = lock
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

    async def encode_upload(request: Request) -> tuple[np.ndarray, str]:
        """(1, D) vector of the request's image and its display name; the decoding and encoding run in a thread."""
        data, name = await read_upload(request)

        def work() -> np.ndarray:
            image, _ = decode_upload(data, name, max_pixels)
            return np.atleast_2d(db.encoder.encode([image]))

        return await run_in_threadpool(work), name

    def locked(fn: Any, *args: Any, **kwargs: Any) -> Any:
        """fn(...) under the index lock, after catching up with what other processes wrote to the index."""
        with lock:
            db.refresh()
            return fn(*args, **kwargs)

    # ------------------------------------------------------------------ questions about an image

    @app.post("/search", response_model=SearchAnswer, response_model_exclude_none=True, responses=ERRORS,
              openapi_extra=IMAGE_BODY, tags=["query"])
    async def search(request: Request, k: int = Query(5, ge=1, le=1000, description="Neighbours to return.")):
        """The k most similar indexed items (highest cosine similarity first)."""
        vector, name = await encode_upload(request)

        def hits() -> list[dict[str, Any]]:  # labels and paths are read lazily: inside the lock, like the search
            return [h.to_dict() for h in db.search_vectors(vector, k)[0]]

        return {"query": name, "hits": await run_in_threadpool(locked, hits)}

    @app.post("/classify", response_model=ClassifyAnswer, responses=ERRORS, openapi_extra=IMAGE_BODY, tags=["query"])
    async def classify(
        request: Request,
        method: Literal[CLASSIFY_METHODS] = Query("prototype", description="Nearest prototype, or a k-NN vote."),  # type: ignore[valid-type]
        k: int = Query(5, ge=1, le=1000, description="Neighbours that vote (knn only)."),
        classes: list[str] | None = Query(None, alias="class", description="Restrict to these classes (repeatable)."),
    ):
        """Which class the image belongs to, with every candidate class ranked best first."""
        vector, name = await encode_upload(request)
        predictions = await run_in_threadpool(locked, db.classify_vectors, vector, method, k, classes or None)
        return {"query": name, **predictions[0].to_dict()}

    @app.post("/verify", response_model=VerifyAnswer, responses=ERRORS, openapi_extra=IMAGE_BODY, tags=["query"])
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
        vector, name = await encode_upload(request)
        result = await run_in_threadpool(locked, db.verify_vector, vector[0], label, threshold, rule)
        return {**result.to_dict(), "query": name}

    # ------------------------------------------------------------------ the index

    @app.get("/info", tags=["index"])
    def info() -> dict[str, Any]:
        """Size, classes, dimension, encoder and calibration (as `siamesedb info --json`)."""
        return locked(db.info)

    @app.get("/labels", response_model=list[LabelCount], tags=["index"])
    def labels():
        """Every class and how many items it holds, sorted by label."""
        counts = locked(db.label_counts)
        return [{"label": label, "count": counts[label]} for label in sorted(counts)]

    def get_item(item_id: int) -> Any:
        """The item's metadata (call under the lock); 404 when the index holds no such id."""
        item = db.item(item_id)
        if item is None:
            raise HTTPException(404, f"{db.path}: no item with id {item_id}")
        return item

    @app.get("/items/{item_id}", response_model=ItemAnswer, responses=ERRORS, tags=["items"])
    def item_metadata(item_id: int):
        """An item's label, source path, content hash, and the URL of its image."""
        item = locked(get_item, item_id)
        return {"id": item.id, "label": item.label, "path": item.path, "sha256": item.sha256,
                "image": f"/items/{item.id}/image"}

    @app.get("/items/{item_id}/image", responses={200: {"content": {"image/png": {}}}, **ERRORS}, tags=["items"])
    def item_image(item_id: int) -> Response:
        """The item's image, re-encoded as PNG (the path comes from the store, never from the request)."""
        item = locked(get_item, item_id)
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

        def work() -> dict[str, Any]:
            _, image_format = decode_upload(data, name, max_pixels)  # refuse before anything is written
            folder = Path(db.path) / UPLOAD_FOLDER
            folder.mkdir(exist_ok=True)
            target = folder / (hashlib.sha256(data).hexdigest() + UPLOAD_FORMATS[image_format])
            created = not target.exists()
            if created:
                partial = target.with_name(target.name + f".{secrets.token_hex(4)}.part")
                partial.write_bytes(data)
                os.replace(partial, target)
            def add() -> tuple[int, int, str]:  # (id, images added, stored path), read under the lock
                item_id = int(db.add(target, label))
                return item_id, 1 - db.last_add_duplicates, get_item(item_id).path

            try:
                item_id, added, path = locked(add)
            except Exception:
                if created:
                    target.unlink(missing_ok=True)  # the store refused it: leave no orphan file
                raise
            return {"label": label, "ids": [item_id], "paths": [path], "added": added, "already_stored": 1 - added}

        return await run_in_threadpool(work)

    @app.delete("/items/{item_id}", response_model=RemoveAnswer, responses={401: {"model": ErrorAnswer}, **ERRORS},
                dependencies=[Depends(require_token)], tags=["items"])
    def remove_item(item_id: int):
        """Remove one item."""
        with lock:
            db.refresh()
            get_item(item_id)
            removed = db.remove(ids=[item_id])
            return {"removed": removed, "items": len(db)}

    # ------------------------------------------------------------------ the web page

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse((STATIC_DIR / "index.html").read_text(encoding="utf-8"))

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def serve(
    index: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    device: str = "auto",
    log_level: str = "info",
) -> None:
    """Open the index and serve it with uvicorn until interrupted.

    Bound to anything but a loopback address, the write endpoints always need a token: a random one is made (and
    printed on stderr) when none is given.
    """
    import uvicorn

    if token is None and not is_loopback(host):
        token = secrets.token_urlsafe(24)
        print(f"write endpoints (POST /items, DELETE /items/ID) need: Authorization: Bearer {token}",
              file=sys.stderr, flush=True)
    app = create_app(index, token=token, max_upload_bytes=max_upload_bytes, device=device)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


__all__ = ["DEFAULT_MAX_PIXELS", "DEFAULT_MAX_UPLOAD_BYTES", "create_app", "decode_upload", "serve"]
