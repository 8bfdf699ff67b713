"""The answers of `siamesedb serve` as pydantic models (the CLI's `--json` schema, for FastAPI's validation and its
OpenAPI page), the request body every image endpoint takes, and the error responses they document."""

from __future__ import annotations

from pydantic import BaseModel

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
        "description": "The image: raw bytes with an image/* Content-Type, or multipart/form-data with a `file` "
                       "field; /search, /classify and /verify take several `file` fields (then answer a list).",
        "content": {
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {"type": "object", "required": ["file"],
                           "properties": {"file": {"type": "array", "items": {"type": "string", "format": "binary"},
                                                   "description": "One image, or several (a batch)."}}}
            },
        },
    }
}
ERRORS = {status: {"model": ErrorAnswer} for status in (400, 404, 409, 413, 415, 422)}


__all__ = ["AddAnswer", "ClassifyAnswer", "ERRORS", "ErrorAnswer", "HitModel", "IMAGE_BODY", "ItemAnswer", "LabelCount",
           "RankedLabel", "RemoveAnswer", "SearchAnswer", "VerifyAnswer"]
