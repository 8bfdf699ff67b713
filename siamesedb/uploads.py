"""What `siamesedb serve` accepts as an upload: the request-size cap, and one image read and decoded safely.

The body is capped (by Content-Length up front and by counting while it streams), only known image formats are opened,
and an image's declared pixel count is checked before any pixel is decoded. Nothing here touches an index.
"""

from __future__ import annotations

import io
from pathlib import PurePath
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from PIL import Image, UnidentifiedImageError
from starlette.datastructures import UploadFile

from siamesedb.errors import ImageLoadError, UploadError
from siamesedb.images import load_image

DEFAULT_MAX_UPLOAD_BYTES = 10 * 1024 * 1024  # 10 MiB: far above any character or signature scan
DEFAULT_MAX_PIXELS = 16_000_000  # declared width x height; a 40-byte PNG may declare 10^10 pixels
# PIL format name -> file extension for saved uploads. Nothing else is opened (no EPS/PDF/ICNS/... plugins).
DEFAULT_MAX_FILES = 64  # images in one multipart request (a batch); the body cap applies to them all together
UPLOAD_FORMATS = {"PNG": ".png", "JPEG": ".jpg", "GIF": ".gif", "BMP": ".bmp", "WEBP": ".webp", "TIFF": ".tif",
                  "PPM": ".pnm"}


# ---------------------------------------------------------------------------------------------- request size


class UploadTooLarge(Exception):
    """The request body grew past the limit while streaming (no or a false Content-Length)."""


def too_large(limit: int) -> JSONResponse:
    """The 413 answer to a body over `limit` bytes, whether Content-Length said so or the stream grew past it."""
    return JSONResponse({"detail": f"upload larger than the limit of {limit:,} bytes"}, status_code=413)


class BodySizeLimit:
    """ASGI middleware: refuse bodies over `limit` bytes, by Content-Length up front and by counting as they stream."""

    def __init__(self, app: Any, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                declared_too_large = int(declared) > self.limit
            except ValueError:
                await JSONResponse({"detail": "bad Content-Length header"}, status_code=400)(scope, receive, send)
                return
            if declared_too_large:
                await too_large(self.limit)(scope, receive, send)
                return
        received = 0

        async def counted_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise UploadTooLarge()
            return message

        await self.app(scope, counted_receive, send)


# ---------------------------------------------------------------------------------------------- uploads


def display_name(name: str | None) -> str:
    """The client's file name for the answer's `query` field only: last path component, printable, short."""
    base = PurePath((name or "").replace("\\", "/")).name
    base = "".join(ch for ch in base if ch.isprintable())[:200]
    return base or "upload"


def decode_upload(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Image.Image, str]:
    """Uploaded bytes -> (PIL image in mode L or RGB, PIL format name). UploadError for anything else.

    The header is read first: the format must be a known image format and the declared size at most `max_pixels`,
    both checked before a single pixel is decoded.
    """
    if not data:
        raise UploadError(f"{name}: empty upload")
    try:
        opened = Image.open(io.BytesIO(data), formats=list(UPLOAD_FORMATS))
    except UnidentifiedImageError:
        raise UploadError(f"{name}: not an image in a supported format ({', '.join(UPLOAD_FORMATS)})", 415) from None
    except Image.DecompressionBombError:
        raise UploadError(f"{name}: image too large (decompression bomb guard)", 413) from None
    except Exception as exc:  # a damaged header: PIL raises SyntaxError, OSError, struct.error...
        raise UploadError(f"{name}: unreadable image ({type(exc).__name__})") from None
    width, height = opened.size
    if width * height > max_pixels:
        raise UploadError(f"{name}: image too large ({width}x{height} pixels, limit {max_pixels:,})", 413)
    image_format = opened.format or ""
    try:
        return load_image(opened), image_format  # first frame, EXIF orientation, alpha on white, 16-bit scaled
    except ImageLoadError as exc:
        raise UploadError(f"{name}: {exc.reason}") from None


def _image_part(upload: Any) -> tuple[bytes, str] | None:
    """None for a form field that is not a file; UploadError for a file part that does not claim to be an image."""
    if not isinstance(upload, UploadFile):
        return None
    part_type = (upload.content_type or "").lower()
    if part_type and not (part_type.startswith("image/") or part_type == "application/octet-stream"):
        raise UploadError(f"{display_name(upload.filename)}: content type {part_type!r} is not an image", 415)
    return b"", display_name(upload.filename)


async def read_uploads(request: Request, max_files: int = DEFAULT_MAX_FILES) -> list[tuple[bytes, str]]:
    """[(bytes, display name)] of the images a request carries: one raw body, or every multipart `file` field (a
    batch, in the order sent; at most `max_files`, else UploadError 413)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        # One more than allowed is parsed, so that a request over the limit gets this module's 413, not a 400.
        async with request.form(max_files=max_files + 1, max_fields=16) as form:
            files = form.getlist("file")
            if len(files) > max_files:
                raise UploadError(f"{len(files)} files in one request; the limit is {max_files}", 413)
            parts = []
            for upload in files:
                part = _image_part(upload)
                if part is None:
                    raise UploadError("multipart upload needs file fields named 'file' (a text field was sent)", 422)
                parts.append((await upload.read(), part[1]))
            if not parts:
                raise UploadError("multipart upload needs one file field named 'file'", 422)
            return parts
    if content_type.startswith("image/") or content_type == "application/octet-stream":
        return [(await request.body(), display_name(request.query_params.get("name")))]
    raise UploadError(
        f"content type {content_type or 'none'!r} is not accepted: send image/* bytes or multipart/form-data", 415
    )


async def read_upload(request: Request) -> tuple[bytes, str]:
    """(bytes, display name) of the one image a request carries, raw or multipart (a second `file` field: 422)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        async with request.form(max_files=1, max_fields=16) as form:
            upload = form.get("file")
            if _image_part(upload) is None:
                raise UploadError("multipart upload needs one file field named 'file'", 422)
            return await upload.read(), display_name(upload.filename)
    return (await read_uploads(request))[0]
