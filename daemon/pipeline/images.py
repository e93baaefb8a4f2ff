"""Image decoding for the worker's decode pool.

The worker reads a file once, hashes the bytes, and hands the same bytes to
:func:`decode_image`. Decoding is thread-safe and touches no global Pillow state:
the pixel limit is passed in and checked against the header before any pixel
data is decoded. Every failure becomes :class:`~daemon.errors.BadImageError`.

The default list of image extensions lives in
:data:`daemon.config.DEFAULT_IMAGE_EXTENSIONS`.
"""

from __future__ import annotations

import functools
import io
import math

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from daemon.errors import BadImageError

DEFAULT_MAX_PIXELS = 178_956_970  # Pillow's own hard limit (2 * MAX_IMAGE_PIXELS)
# JPEG draft decoding keeps the side a generator resamples from at no less than this
# many times the size it resamples to (Pillow's thumbnail() uses the same 2.0).
DRAFT_GAP = 2.0

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_RGB_CONVERTIBLE = frozenset({"1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"})
_JPEG_FORMATS = frozenset({"JPEG", "MPO"})
# Greyscale with more than 8 bits per sample: scaled to 8 bits by to_8bit().
HIGH_DEPTH_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


# Only these decoders are tried: fewer parsers exposed to untrusted files, and plugins
# that other libraries register (ultralytics adds a HEIF opener that fails without
# pi_heif) cannot turn "not an image" into an import error.
DECODE_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "BMP", "DIB", "GIF", "TIFF", "AVIF")


# Pillow's own open(), taken before anything patches it: ultralytics replaces
# Image.open with a wrapper that tries to pip-install a HEIF plugin on unknown files.
_OPEN = Image.open


@functools.cache
def _formats() -> tuple[str, ...]:
    Image.init()
    return tuple(f for f in DECODE_FORMATS if f in Image.OPEN)


# where decode_image keeps the undrafted size in ``Image.info``
FULL_SIZE = "captiond_full_size"


def decode_image(
    data: bytes,
    *,
    draft_size: int | None = None,
    draft_longer_side: bool = False,
    draft_gap: float = DRAFT_GAP,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Decode ``data`` into a fully loaded ``RGB`` or ``RGBA`` image.

    - ``draft_size``: the size the generator resamples the image to next (both sides,
      or with ``draft_longer_side`` the longer side: for a model that pads to a square
      first). JPEGs are then decoded by libjpeg at 1/2, 1/4 or 1/8 scale while that
      side stays >= ``draft_gap`` x ``draft_size``, as Pillow's ``thumbnail()`` does
      with its ``reducing_gap``: libjpeg's scaling is a crude box-like filter, and
      left at no less than twice the target size the generator's own resampling still
      sees nearly the pixels a full decode gives (for the WD tagger on textured
      JPEGs: 0.12-0.41 grey levels from the reference preprocessing on average,
      against 0.43-3.16 when drafted down to the model size; bench/README.md). A
      4032x3024 photo for 448 px decodes at 1/4 (1008x756), a 3000x2000 one at 1/2.
    - ``max_pixels``: images whose header declares more pixels are refused before
      decoding. Pillow's own process-wide limit (``Image.MAX_IMAGE_PIXELS``, twice
      of which is the default here) still applies inside ``Image.open``.
    - EXIF orientation is applied; animated GIF/WebP/APNG yield their first frame.
    - Alpha is kept (``RGBA``) so that a generator can composite it as it needs.
    - 16-bit, 32-bit integer and 32-bit float greyscale (``I;16``, ``I``, ``F``, as
      16-bit PNGs and scientific TIFFs give) are scaled to 8 bits by :func:`to_8bit`.
    - ``full_size(image)`` (``image.info[FULL_SIZE]``) is the full size as shown, also
      after a draft.
    """
    if not data:
        raise BadImageError("empty file")
    try:
        img = _OPEN(io.BytesIO(data), formats=_formats())
    except Image.DecompressionBombError as exc:
        raise BadImageError(f"image too large (decompression bomb): {exc}") from exc
    except (UnidentifiedImageError, ImportError) as exc:  # ImportError: a patched open()
        raise BadImageError("not a recognised image format") from exc
    except MemoryError:
        raise
    except Exception as exc:
        raise BadImageError(f"unreadable image header: {_short(exc)}") from exc

    w, h = img.size
    if w < 1 or h < 1:
        raise BadImageError(f"invalid image size {w}x{h}")
    if w * h > max_pixels:
        raise BadImageError(
            f"image too large: {w}x{h} = {w * h:,} pixels exceeds the limit of {max_pixels:,}"
        )

    try:
        if draft_size and img.format in _JPEG_FORMATS:
            keep = math.ceil(max(1.0, draft_gap) * draft_size)  # the side to keep
            side = max(w, h) if draft_longer_side else min(w, h)
            if side >= 2 * keep:
                # libjpeg's scale keeps both sides >= the requested box: a box with the
                # image's aspect keeps the longer side >= keep
                box = (-(-keep * w // side), -(-keep * h // side))
                img.draft("RGB", box if draft_longer_side else (keep, keep))
        img.load()
    except Image.DecompressionBombError as exc:
        raise BadImageError(f"image too large (decompression bomb): {exc}") from exc
    except MemoryError:
        raise
    except Exception as exc:
        # Truncated data ("image file is truncated"), broken chunks, bad codecs...
        raise BadImageError(f"truncated or corrupt image data: {_short(exc)}") from exc

    drafted = img.size
    try:
        before = img.size
        ImageOps.exif_transpose(img, in_place=True)
        if img.size != before:  # turned by a quarter: the full size turns too
            full = (h, w)
    except MemoryError:
        raise
    except Exception:
        pass  # malformed EXIF: the pixels are fine, keep them unrotated
    full = (h, w) if img.size != drafted else (w, h)  # turned a quarter by EXIF

    try:
        out = _to_rgb_or_rgba(img)
    except BadImageError:
        raise
    except MemoryError:
        raise
    except Exception as exc:
        raise BadImageError(f"cannot convert image mode {img.mode}: {_short(exc)}") from exc
    out.info[FULL_SIZE] = full
    return out


def full_size(img: Image.Image) -> tuple[int, int]:
    """The image's own width and height as it is shown (after EXIF rotation), whatever
    scale :func:`decode_image` decoded it at."""
    size = img.info.get(FULL_SIZE)
    return tuple(size) if size else img.size  # type: ignore[return-value]


def _to_rgb_or_rgba(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode in ("RGB", "RGBA"):
        return img
    if mode in HIGH_DEPTH_MODES:
        return _high_depth_to_rgb(img)
    if mode in _ALPHA_MODES or "transparency" in img.info:
        return img.convert("RGBA")
    if mode in _RGB_CONVERTIBLE:
        return img.convert("RGB")
    raise BadImageError(f"unsupported image mode {mode}")


def to_8bit(img: Image.Image) -> np.ndarray:
    """Grey levels 0-255 (``uint8``) of a high-bit-depth greyscale image, by the range
    its own mode and values say:

    - ``I;16``, ``I;16B``, ``I;16L``, ``I;16N`` (unsigned 16-bit): the full range,
      0-65535 -> 0-255;
    - ``I`` (32-bit signed): values all within 0-255 are kept (8-bit data in a wide
      mode), all within 0-65535 are scaled as 16-bit, anything else is stretched;
    - ``F`` (32-bit float): values all within 0.0-1.0 are scaled by 255, anything else
      is stretched;
    - stretched = min-max over the finite values: the smallest -> 0, the largest -> 255
      (an image of one value becomes black). NaN becomes 0; +inf and -inf take the
      largest and smallest finite values.
    """
    mode = img.mode
    if mode not in HIGH_DEPTH_MODES:
        raise ValueError(f"{mode} is not a high-bit-depth mode")
    arr = np.asarray(img)
    if mode.startswith("I;16"):  # round(v / 257) in integers: 2 bytes in, 4 while working
        return ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if mode == "I":
        lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        if lo >= 0 and hi <= 255:
            return arr.astype(np.uint8)
        if lo >= 0 and hi <= 65535:
            return ((arr + 128) // 257).astype(np.uint8)
        return _stretch(arr.astype(np.float32), float(lo), float(hi))
    vals = arr.astype(np.float32)  # F: a copy, NaN and infinities replaced in it
    finite = np.isfinite(vals)
    if not finite.all():
        nan = np.isnan(vals)
        lo = float(vals[finite].min()) if finite.any() else 0.0
        hi = float(vals[finite].max()) if finite.any() else 0.0
        np.clip(vals, lo, hi, out=vals)  # +-inf -> the finite extremes
        vals[nan] = lo
    else:
        nan = None
        lo, hi = (float(vals.min()), float(vals.max())) if vals.size else (0.0, 0.0)
    if lo >= 0.0 and hi <= 1.0:
        vals *= 255.0
        out = np.rint(vals).astype(np.uint8)
    else:
        out = _stretch(vals, lo, hi)
    if nan is not None:
        out[nan] = 0
    return out


def _stretch(vals: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Min-max to 0-255 in place (float32); one value throughout becomes black."""
    if hi <= lo:
        return np.zeros(vals.shape, np.uint8)
    vals -= lo
    vals *= 255.0 / (hi - lo)
    return np.clip(np.rint(vals), 0, 255).astype(np.uint8)


def _high_depth_to_rgb(img: Image.Image) -> Image.Image:
    """:func:`to_8bit` as RGB; a transparent grey value (PNG ``tRNS``) becomes alpha."""
    grey = Image.fromarray(to_8bit(img), "L")
    key = img.info.get("transparency")
    if isinstance(key, (int, float)) and not isinstance(key, bool):
        alpha = np.where(np.asarray(img) == key, 0, 255).astype(np.uint8)
        out = Image.merge("RGBA", (grey, grey, grey, Image.fromarray(alpha, "L")))
        return out
    return grey.convert("RGB")


def _short(exc: BaseException, limit: int = 120) -> str:
    text = str(exc) or type(exc).__name__
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
