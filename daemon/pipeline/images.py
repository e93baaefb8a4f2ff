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

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from daemon.errors import BadImageError

DEFAULT_MAX_PIXELS = 178_956_970  # Pillow's own hard limit (2 * MAX_IMAGE_PIXELS)
# info key of a decoded image: (width, height) of the whole image as shown (after EXIF
# orientation), also when a JPEG was decoded at a reduced scale (draft).
FULL_SIZE = "captiond_full_size"

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_RGB_CONVERTIBLE = frozenset({"1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"})
_JPEG_FORMATS = frozenset({"JPEG", "MPO"})


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


def decode_image(
    data: bytes,
    *,
    draft_size: int | None = None,
    draft_longer_side: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Decode ``data`` into a fully loaded ``RGB`` or ``RGBA`` image.

    - ``draft_size``: for JPEGs, let libjpeg decode at 1/2, 1/4 or 1/8 scale while
      both sides stay >= ``draft_size`` (much faster for camera-sized files); with
      ``draft_longer_side`` only the longer side must (for a model that pads to a
      square first: a 4032x3024 photo then decodes at 1/8, not 1/4, for 448 px).
    - ``max_pixels``: images whose header declares more pixels are refused before
      decoding. Pillow's own process-wide limit (``Image.MAX_IMAGE_PIXELS``, twice
      of which is the default here) still applies inside ``Image.open``.
    - EXIF orientation is applied; animated GIF/WebP/APNG yield their first frame.
    - Alpha is kept (``RGBA``) so that a generator can composite it as it needs.
    - ``image.info[FULL_SIZE]`` is the full size as shown, also after a draft.
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
            side = max(w, h) if draft_longer_side else min(w, h)
            if side >= 2 * draft_size:
                # libjpeg's scale keeps both sides >= the requested box: a box with the
                # image's aspect keeps the longer side >= draft_size
                box = (-(-draft_size * w // side), -(-draft_size * h // side))
                img.draft("RGB", box if draft_longer_side else (draft_size, draft_size))
        img.load()
    except Image.DecompressionBombError as exc:
        raise BadImageError(f"image too large (decompression bomb): {exc}") from exc
    except MemoryError:
        raise
    except Exception as exc:
        # Truncated data ("image file is truncated"), broken chunks, bad codecs...
        raise BadImageError(f"truncated or corrupt image data: {_short(exc)}") from exc

    full = (w, h)  # the size as stored; a draft decodes fewer pixels
    try:
        before = img.size
        ImageOps.exif_transpose(img, in_place=True)
        if img.size != before:  # turned by a quarter: the full size turns too
            full = (h, w)
    except MemoryError:
        raise
    except Exception:
        pass  # malformed EXIF: the pixels are fine, keep them unrotated

    try:
        out = _to_rgb_or_rgba(img)
        out.info[FULL_SIZE] = full
        return out
    except BadImageError:
        raise
    except MemoryError:
        raise
    except Exception as exc:
        raise BadImageError(f"cannot convert image mode {img.mode}: {_short(exc)}") from exc


def _to_rgb_or_rgba(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode in ("RGB", "RGBA"):
        return img
    if mode in _ALPHA_MODES or "transparency" in img.info:
        return img.convert("RGBA")
    if mode in _RGB_CONVERTIBLE:
        return img.convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        # 16-bit greyscale: scale to 8 bits instead of clipping everything to white.
        arr = np.asarray(img).astype(np.float32)
        eight_bit = mode == "I" and arr.size and float(arr.max()) <= 255.0
        scaled = arr if eight_bit else arr / 257.0
        grey = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    raise BadImageError(f"unsupported image mode {mode}")


def _short(exc: BaseException, limit: int = 120) -> str:
    text = str(exc) or type(exc).__name__
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
