"""Named exceptions: everything siamesedb raises on purpose derives from SiameseDBError.

The CLI turns any SiameseDBError into one line on stderr and a non-zero exit status, so each
message must make sense on its own: name the file, index or label, and the problem.
"""

from __future__ import annotations


class SiameseDBError(Exception):
    """Base class of every error siamesedb raises on purpose."""


class InvalidInputError(SiameseDBError, ValueError):
    """An argument has the wrong shape, type or value."""


class ImageLoadError(SiameseDBError):
    """A file or object could not be read as an image."""

    def __init__(self, source: object, reason: str):
        self.source = source
        self.reason = reason
        super().__init__(f"{describe_source(source)}: {reason}")


def describe_source(source: object) -> str:
    """How an error names an image: a path as it is; raw bytes, arrays and other objects by kind and size, never by
    their contents (a message must stay one readable line)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    shape = getattr(source, "shape", None)
    if shape is not None and not isinstance(source, str):
        return f"<{type(source).__name__} of shape {tuple(shape)}>"
    text = str(source)
    return text if len(text) <= 200 and "\n" not in text else f"<{type(source).__name__}>"


class FolderError(SiameseDBError):
    """A labelled folder is missing, is not a folder, or holds no readable images."""


class IndexNotFoundError(SiameseDBError):
    """No index exists at the given path."""


class IndexExistsError(SiameseDBError):
    """An index already exists where a new one was to be built."""


class CorruptIndexError(SiameseDBError):
    """An index file (store, vectors or manifest) is unreadable or inconsistent."""


class UnknownLabelError(SiameseDBError):
    """A label was named that the index does not hold."""


class DimensionMismatchError(SiameseDBError):
    """Vectors have a different dimension than the index expects."""


class EncoderError(SiameseDBError):
    """An encoder is unknown, missing or unreadable."""


class EncoderMismatchError(EncoderError):
    """An encoder differs from the one that made an index's vectors."""


class DeviceError(EncoderError, InvalidInputError):
    """A device that is unknown, or CUDA asked for where none is available."""


class NotCalibratedError(SiameseDBError):
    """Verification needs a threshold and none has been calibrated."""


class EmptyIndexError(SiameseDBError):
    """The operation needs items and the index (or the chosen classes) holds none."""


class IndexLockedError(SiameseDBError):
    """Another process holds an index's write lock and did not release it within the timeout."""


class StorageError(SiameseDBError):
    """The disk refused a read or write of an index file (full, read-only, I/O error)."""


class UploadError(InvalidInputError):
    """An uploaded image (HTTP API) is missing, too large, of the wrong type or not decodable."""

    def __init__(self, message: str, status: int = 400):
        self.status = status  # the HTTP status the server answers with (400, 413, 415)
        super().__init__(message)


class ExportFormatError(SiameseDBError):
    """A vectors export file is missing, unreadable, or not one siamesedb wrote."""
