"""One image in, one input tensor out: load any image source robustly (path, encoded bytes, binary file object, PIL
image, numpy array) as a PIL image in mode 'L' or 'RGB', then preprocess it as the encoder's config says."""

from __future__ import annotations

import errno
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

from siamesedb.errors import ImageLoadError, InvalidInputError

MAX_PIXELS = 64_000_000  # refuse larger declared sizes: a decompression bomb must fail fast, not fill memory

_HIGH_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})


def _white_level(mode: str, array: np.ndarray) -> float:
    """The value that means white: 65535 for 16-bit modes; 32-bit 'I' and float 'F' are judged by their range."""
    if mode.startswith("I;16"):
        return 65535.0
    peak = float(array.max(initial=0.0))
    if mode == "F" and peak <= 1.0:
        return 1.0
    if peak <= 255.0:
        return 255.0
    return 65535.0 if peak <= 65535.0 else peak


def _to_l_or_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 'L' or 'RGB'; alpha is composited on white (a transparent background reads as paper)."""
    mode = image.mode
    if mode in ("L", "RGB"):
        return image
    if mode == "1":
        return image.convert("L")
    if mode in _HIGH_BIT_MODES:
        # PIL's own convert('L') clips 16-bit values at 255 (a white page of 65535 would stay white, but a mid-grey
        # 30000 would too); scaling keeps the tones.
        array = np.nan_to_num(np.asarray(image, dtype=np.float64))
        scaled = np.clip(array / _white_level(mode, array) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(scaled)
    if mode == "P":
        image = image.convert("RGBA") if "transparency" in image.info else image.convert("RGB")
        mode = image.mode
    if mode in ("LA", "La", "PA", "RGBA", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        out = Image.alpha_composite(background, rgba).convert("RGB")
        return out.convert("L") if mode in ("LA", "La") else out
    return image.convert("RGB")  # CMYK, YCbCr, HSV...


def _decode_opened(opened: Image.Image, source: Any, draft: tuple[int, int] | None = None) -> Image.Image:
    """An image fresh from Image.open -> its decoded first frame, upright, detached from the file; a JPEG at the
    smallest DCT scale covering `draft` (width, height) when given."""
    width, height = opened.size
    # The declared size is known before any pixel is decoded: a bomb is refused here, at no cost.
    if width * height > MAX_PIXELS:
        raise ImageLoadError(source, f"image too large ({width}x{height} pixels, limit {MAX_PIXELS:,})")
    if draft is not None and opened.format == "JPEG":
        # Square request (the longer side both ways): EXIF orientation may still swap width and height below.
        side = max(draft)
        opened.draft(opened.mode, (side, side))  # 4000x3000 -> 500x375 for a 28 px input: ~1/8 of the decoding
    opened.load()  # Image.open leaves an animation on its first frame, so this decodes frame 0
    try:
        return ImageOps.exif_transpose(opened)  # a new, upright image (a plain copy when there is no orientation)
    except Exception:  # a malformed EXIF block says nothing about the pixels, which did decode: keep them as stored
        return opened.copy()


def stat_failure_reason(path: str | os.PathLike, exc: OSError) -> str:
    """Why `os.stat(path)` failed, in the words every reader of a file uses (a query, `add` and `build` alike):
    "symbolic link loop", "broken symbolic link", "no such file", "permission denied", else the OS's own words."""
    if exc.errno == errno.ELOOP:
        return "symbolic link loop"
    if exc.errno == errno.ENOENT:
        return "broken symbolic link" if os.path.islink(path) else "no such file"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return exc.strerror or str(exc)


def _open_path(source: str | os.PathLike, draft: tuple[int, int] | None = None) -> Image.Image:
    path = Path(source)
    try:
        os.stat(path)
    except OSError as exc:
        raise ImageLoadError(source, stat_failure_reason(path, exc)) from None
    if path.is_dir():
        raise ImageLoadError(source, "is a folder, not an image")
    if not path.is_file():
        raise ImageLoadError(source, "not a regular file")  # a FIFO or device would block the reader forever
    if path.stat().st_size == 0:
        raise ImageLoadError(source, "empty file")
    with warnings.catch_warnings():
        # PIL only warns between its own limit and twice that; make it an error so nothing that large is decoded.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as opened:
            return _decode_opened(opened, source, draft)


@dataclass(frozen=True)
class EncodedFile:
    """A file's bytes already read into memory (e.g. to hash and decode them from one read), and where they came from."""

    data: bytes
    name: str

    def __str__(self) -> str:  # error messages name the file, not its bytes
        return self.name


def _open_bytes(source: EncodedFile, draft: tuple[int, int] | None = None) -> Image.Image:
    if not source.data:
        raise ImageLoadError(source, "empty file")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(source.data)) as opened:
            return _decode_opened(opened, source, draft)


def read_file_like(source: Any) -> bytes:
    name = str(getattr(source, "name", "<file object>"))
    data = source.read()
    if isinstance(data, str):
        raise ImageLoadError(name, "file object is open in text mode; open it with 'rb'")
    return bytes(data)


def load_image(source: Any, draft: tuple[int, int] | None = None) -> Image.Image:
    """A path, PIL image, numpy array, the bytes of an encoded image file, or a binary file object -> a PIL image in
    mode 'L' or 'RGB'. Every failure is an ImageLoadError.

    `draft` (width, height): a JPEG file may be decoded at 1/2, 1/4 or 1/8 scale (Pillow's draft mode, the DCT
    scaled in libjpeg), the smallest that still covers this size in both directions; other formats ignore it.
    `Preprocessing.draft_size` is the size that keeps the encoder's input the same within rounding.

    Files: first frame of an animation, EXIF orientation applied, 16-bit scaled to 8-bit, alpha composited on white,
    images declaring more than MAX_PIXELS pixels refused before decoding. A PIL image straight from Image.open is
    treated like its file; any other PIL image is taken as it is.
    """
    try:
        if isinstance(source, (str, os.PathLike)):
            image = _open_path(source, draft)
        elif isinstance(source, EncodedFile):
            image = _open_bytes(source, draft)
        elif isinstance(source, ImageFile.ImageFile):
            image = _decode_opened(source, getattr(source, "filename", None) or "<image>", draft)
        elif isinstance(source, Image.Image):
            image = source
        elif isinstance(source, np.ndarray):
            image = _array_to_image(source)
        elif isinstance(source, (bytes, bytearray, memoryview)):  # an encoded file's bytes (an upload, a blob)
            image = _open_bytes(EncodedFile(bytes(source), f"<{len(source)} bytes>"))
        elif callable(getattr(source, "read", None)):  # a file-like object opened in binary mode
            image = _open_bytes(EncodedFile(read_file_like(source), str(getattr(source, "name", "<file object>"))))
        else:
            raise ImageLoadError(f"<{type(source).__name__}>", f"unsupported image type {type(source).__name__} "
                                 "(give a path, PIL image, numpy array, bytes or binary file object)")
        if image.width < 1 or image.height < 1:
            raise ImageLoadError(source, "image has no pixels")
        return _to_l_or_rgb(image)
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageLoadError(source, "image too large (decompression bomb guard)") from None
    except PermissionError:
        raise ImageLoadError(source, "permission denied") from None
    except Image.UnidentifiedImageError:
        raise ImageLoadError(source, "not a recognised image format") from None
    except Exception as exc:  # decoders raise OSError, SyntaxError, struct.error, zlib.error...: one kind for callers
        text = str(exc).strip()
        reason = text.splitlines()[0] if text else type(exc).__name__
        raise ImageLoadError(source, f"unreadable image ({reason})") from None


def _array_to_image(array: np.ndarray) -> Image.Image:
    """HxW or HxWx{1,3,4} array -> PIL image. uint8 as is; uint16 scaled from 0..65535; float taken in [0, 1]."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ImageLoadError("<array>", f"array of shape {array.shape} is not an HxW or HxWx3/4 image")
    if array.dtype == np.uint8:
        pass
    elif array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype == np.uint16:
        array = (array.astype(np.float64) / 65535.0 * 255.0 + 0.5).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.integer):
        # Other integer arrays (np.array([[0, 255]]) is int64): 8-bit values if they fit, else 16-bit ones.
        low, high = int(array.min(initial=0)), int(array.max(initial=0))
        if low < 0 or high > 65535:
            raise ImageLoadError("<array>", f"integer values {low}..{high} outside 0..65535")
        top = 255.0 if high <= 255 else 65535.0
        array = (array.astype(np.float64) / top * 255.0 + 0.5).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ImageLoadError("<array>", "array contains NaN or infinity")
        array = (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    else:
        raise ImageLoadError("<array>", f"unsupported array dtype {array.dtype}")
    return Image.fromarray(np.ascontiguousarray(array))


# ------------------------------------------------------------------------------------------------ preprocessing


DRAFT_MARGIN = 2  # a JPEG is decoded at a DCT scale covering this many times the input size (see draft_size)


@dataclass
class Preprocessing:
    """How an image becomes the encoder's input tensor; saved in the encoder's config.json."""

    size: tuple[int, int] = (28, 28)  # (H, W)
    channels: int = 1
    invert: bool = True  # dark strokes on white -> bright strokes on black (characters, signatures)
    mean: float = 0.0
    std: float = 1.0
    keep_aspect: bool = False  # fit inside size and pad with background (signatures are wide)
    # A Hugging Face image processor's settings (hf: backbones, siamesedb.pretrained): when set, it alone turns the
    # image (made RGB) into pixel values; `size` is then its output size and the fields above are not used.
    processor: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        try:
            size = (int(self.size), int(self.size)) if np.ndim(self.size) == 0 else tuple(int(s) for s in self.size)
        except (TypeError, ValueError):
            size = ()
        if len(size) != 2 or min(size) < 1:
            raise InvalidInputError(f"size must be (height, width) of positive integers, got {self.size!r}")
        self.size = size
        if self.channels not in (1, 3):
            raise InvalidInputError(f"channels must be 1 or 3, got {self.channels}")
        # Plain Python scalars, so to_dict() is JSON-safe even when numpy values were passed in.
        self.mean, self.std = float(self.mean), float(self.std)
        self.invert, self.keep_aspect = bool(self.invert), bool(self.keep_aspect)
        if not self.std > 0:
            raise InvalidInputError(f"std must be positive, got {self.std}")

    def to_array(self, image: Image.Image) -> np.ndarray:
        """PIL image -> (C, H, W) float32 numpy array (what to_tensor wraps; numpy only, so safe in worker processes)."""
        if image.mode not in ("L", "RGB"):
            image = _to_l_or_rgb(image)
        if self.processor is not None:
            from siamesedb.pretrained import process

            return process(self.processor, image)
        wanted = "L" if self.channels == 1 else "RGB"
        if image.mode != wanted:
            image = image.convert(wanted)
        height, width = self.size
        if self.keep_aspect:
            scale = min(width / image.width, height / image.height)
            inner = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            resized = image.resize(inner, Image.Resampling.BILINEAR, reducing_gap=3.0)
            # Background is white paper before inversion, so padding matches the page, not the ink.
            canvas = Image.new(image.mode, (width, height), 255 if image.mode == "L" else (255, 255, 255))
            canvas.paste(resized, ((width - inner[0]) // 2, (height - inner[1]) // 2))
            image = canvas
        elif image.size != (width, height):
            # BILINEAR in PIL widens its filter when shrinking, so this is antialiased.
            image = image.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=3.0)
        array = np.asarray(image, dtype=np.float32) / 255.0  # (H, W) or (H, W, 3) in [0, 1]
        if self.invert:
            array = 1.0 - array
        array = (array - self.mean) / self.std
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        return np.ascontiguousarray(array, dtype=np.float32)

    @property
    def draft_size(self) -> tuple[int, int]:
        """(width, height) a JPEG may be decoded down to (`load_image(..., draft=)`) without changing the input
        beyond rounding: DRAFT_MARGIN x the input size, so the resize below still averages several decoded pixels
        into each input pixel, as it does from the full decode (tests/test_data.py bounds the difference)."""
        height, width = self.size
        return (DRAFT_MARGIN * width, DRAFT_MARGIN * height)

    def to_tensor(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> (C, H, W) float32 tensor."""
        return torch.from_numpy(self.to_array(image))

    def to_dict(self) -> dict[str, Any]:
        d = {
            "size": list(self.size),
            "channels": self.channels,
            "invert": self.invert,
            "mean": self.mean,
            "std": self.std,
            "keep_aspect": self.keep_aspect,
        }
        if self.processor is not None:  # only when set: other encoders keep their fingerprints
            d["processor"] = self.processor
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        """Inverse of to_dict; unknown keys are ignored so older readers accept newer configs."""
        known = {k: d[k] for k in ("size", "channels", "invert", "mean", "std", "keep_aspect", "processor") if k in d}
        if "size" in known:
            known["size"] = tuple(known["size"])
        return cls(**known)

