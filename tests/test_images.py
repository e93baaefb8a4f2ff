from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from daemon.errors import BadImageError
from daemon.pipeline.images import decode_image, full_size


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def noisy(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def png_header_only(w: int, h: int) -> bytes:
    """A PNG whose IHDR declares w x h but carries almost no pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )


def test_png_roundtrip_keeps_pixels() -> None:
    src = Image.new("RGB", (40, 30), (10, 200, 30))
    img = decode_image(encode(src, "PNG"))
    assert img.mode == "RGB"
    assert img.size == (40, 30)
    assert img.getpixel((5, 5)) == (10, 200, 30)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"hello, this is a text file\n" * 10, "not a recognised image"),
        (b"\x89PNG\r\n\x1a\n", "not a recognised image"),  # signature only
    ],
)
def test_not_images(data: bytes, reason: str) -> None:
    with pytest.raises(BadImageError) as ei:
        decode_image(data)
    assert reason in str(ei.value)
    assert ei.value.retryable is False


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_files_fail_at_decode(fmt: str) -> None:
    data = encode(noisy(256, 256), fmt)
    with pytest.raises(BadImageError) as ei:
        decode_image(data[: len(data) // 2])
    assert "truncated or corrupt" in str(ei.value)


def test_pixel_limit_checked_from_header() -> None:
    data = encode(Image.new("RGB", (100, 100)), "PNG")
    assert decode_image(data, max_pixels=10_000).size == (100, 100)
    with pytest.raises(BadImageError) as ei:
        decode_image(data, max_pixels=9_999)
    assert "too large" in str(ei.value)


def test_decompression_bomb_header_is_refused_without_decoding() -> None:
    # 30000 x 30000 = 900 Mpx declared in a ~60-byte file: refused before decoding,
    # both by our explicit limit and by Pillow's own hard limit above the default.
    data = png_header_only(30_000, 30_000)
    assert len(data) < 100
    with pytest.raises(BadImageError, match="too large"):
        decode_image(data, max_pixels=1_000_000)
    with pytest.raises(BadImageError, match="too large"):
        decode_image(data)  # default limit


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_pillow_warning_range_is_an_error_under_our_limit() -> None:
    # 10000 x 10000 = 100 Mpx is above Pillow's *warning* level (89.5 Mpx): with a
    # smaller explicit limit this is an error, not a warning, and no pixels are decoded.
    data = png_header_only(10_000, 10_000)
    with pytest.raises(BadImageError, match="too large"):
        decode_image(data, max_pixels=50_000_000)


def test_draft_mode_keeps_twice_the_requested_size() -> None:
    data = encode(noisy(3000, 2000), "JPEG", quality=85)
    full = decode_image(data)
    assert full.size == (3000, 2000)
    small = decode_image(data, draft_size=448)
    assert min(small.size) >= 2 * 448  # as Pillow's thumbnail() with reducing_gap=2
    assert small.size == (1500, 1000)  # libjpeg's 1/2 scale (1/4 would leave 500)
    assert small.mode == "RGB"
    # draft_gap=1 is the rule before issue 10: down to the requested size itself
    assert decode_image(data, draft_size=448, draft_gap=1.0).size == (750, 500)


def test_draft_on_the_longer_side_decodes_a_phone_photo_at_one_quarter() -> None:
    """4032x3024 (a 12 MP phone photo) for 448 px: both sides >= 896 needs 1/2; for a
    model that pads to a square only the longer side counts, so 1/4 is enough."""
    data = encode(noisy(4032, 3024), "JPEG", quality=85)
    assert decode_image(data, draft_size=448).size == (2016, 1512)
    assert decode_image(data, draft_size=448, draft_longer_side=True).size == (1008, 756)
    portrait = encode(noisy(3024, 4032), "JPEG", quality=85)
    assert decode_image(portrait, draft_size=448, draft_longer_side=True).size == (756, 1008)
    # never below twice the size asked for on the longer side
    for w, h in [(3583, 2000), (3584, 2000), (7000, 900), (900, 7000), (1792, 1000)]:
        got = decode_image(encode(noisy(w, h), "JPEG"), draft_size=448, draft_longer_side=True)
        assert max(got.size) >= 896, (w, h, got.size)


def test_draft_mode_leaves_small_jpeg_and_png_alone() -> None:
    jpg = encode(noisy(600, 500), "JPEG")
    assert decode_image(jpg, draft_size=448).size == (600, 500)
    jpg = encode(noisy(1791, 1000), "JPEG")  # 1/2 would go below 2 x 448
    assert decode_image(jpg, draft_size=448, draft_longer_side=True).size == (1791, 1000)
    png = encode(noisy(2000, 2000), "PNG", compress_level=1)
    assert decode_image(png, draft_size=448).size == (2000, 2000)


def test_exif_orientation_applied() -> None:
    src = Image.new("RGB", (60, 20), (255, 0, 0))
    src.paste((0, 0, 255), (0, 0, 10, 20))  # blue strip on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img = decode_image(encode(src, "PNG", exif=exif))
    assert img.size == (20, 60)
    # After a 90 degree clockwise turn the left strip is at the top.
    assert img.getpixel((10, 2)) == (0, 0, 255)
    assert img.getpixel((10, 57)) == (255, 0, 0)


def test_exif_orientation_applied_with_draft() -> None:
    src = noisy(2000, 1000)
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 270 CW
    img = decode_image(encode(src, "JPEG", exif=exif.tobytes()), draft_size=200)
    assert img.size == (500, 1000)  # drafted to 1/2 (both sides >= 400), then upright
    assert full_size(img) == (1000, 2000)  # the image as shown, not as decoded


def test_full_size_is_the_images_own_whatever_the_draft() -> None:
    data = encode(noisy(4032, 3024), "JPEG", quality=85)
    small = decode_image(data, draft_size=448, draft_longer_side=True)
    assert small.size == (1008, 756) and full_size(small) == (4032, 3024)
    png = decode_image(encode(noisy(300, 200), "PNG"))
    assert full_size(png) == png.size == (300, 200)
    exif = Image.Exif()
    exif[0x0112] = 6
    turned = decode_image(encode(noisy(3000, 2000), "JPEG", exif=exif.tobytes()), draft_size=200)
    assert full_size(turned) == (2000, 3000) and turned.size == (500, 750)


def test_animated_gif_and_webp_use_the_first_frame() -> None:
    frames = [Image.new("RGB", (32, 32), c) for c in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    for fmt in ("GIF", "WEBP"):
        buf = io.BytesIO()
        kw: dict[str, object] = {"lossless": True} if fmt == "WEBP" else {}
        frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], duration=50, **kw)
        img = decode_image(buf.getvalue())
        r, g, b = img.convert("RGB").getpixel((16, 16))  # type: ignore[misc]
        assert r > 240 and g < 15 and b < 15, fmt


def test_alpha_kept_and_modes_normalised() -> None:
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert decode_image(encode(rgba, "PNG")).mode == "RGBA"
    la = Image.new("LA", (8, 8), (128, 10))
    assert decode_image(encode(la, "PNG")).mode == "RGBA"
    grey = Image.new("L", (8, 8), 77)
    out = decode_image(encode(grey, "PNG"))
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (77, 77, 77)
    pal = Image.new("RGB", (8, 8), (0, 128, 255)).convert("P")
    assert decode_image(encode(pal, "PNG")).mode == "RGB"
    cmyk = Image.new("CMYK", (8, 8), (0, 0, 0, 0))
    assert decode_image(encode(cmyk, "JPEG")).mode == "RGB"


def test_16bit_greyscale_is_scaled_not_clipped() -> None:
    arr = np.full((4, 4), 32896, dtype=np.uint16)  # ~ half of 65535
    data = encode(Image.fromarray(arr), "PNG")
    img = decode_image(data)
    assert img.mode == "RGB"
    assert img.getpixel((0, 0)) == (128, 128, 128)


def test_foreign_pil_plugins_are_not_tried(monkeypatch):
    from PIL import Image

    def broken_accept(prefix: bytes) -> bool:
        raise ImportError("No module named 'pi_heif'")

    monkeypatch.setitem(Image.OPEN, "FAKEHEIF", (lambda fp, fn: None, broken_accept))
    monkeypatch.setattr(Image, "ID", [*Image.ID, "FAKEHEIF"])
    with pytest.raises(BadImageError, match="not a recognised image"):
        decode_image(b"this is text, not an image")


def test_a_patched_pil_open_is_not_used(monkeypatch):
    from PIL import Image

    def patched_open(*args, **kwargs):
        raise ImportError("No module named 'pi_heif'")  # what ultralytics' patch may do

    monkeypatch.setattr(Image, "open", patched_open)
    with pytest.raises(BadImageError, match="not a recognised image"):
        decode_image(b"this is text, not an image")
    assert decode_image(encode(Image.new("RGB", (8, 8)), "PNG")).size == (8, 8)


# -- high bit depth: scaled to 8 bits by the image's own range --------------------------


def grey_of(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    arr = np.asarray(img)
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    return arr[..., 0]


def test_float_image_in_unit_range_is_scaled_by_255() -> None:
    values = np.linspace(0.0, 1.0, 64, dtype=np.float32).reshape(8, 8)
    img = decode_image(encode(Image.fromarray(values, "F"), "TIFF"))
    assert grey_of(img).tolist() == np.rint(values * 255).astype(np.uint8).tolist()


def test_float_image_outside_unit_range_is_stretched_min_max() -> None:
    values = np.linspace(-10.0, 30.0, 81, dtype=np.float32).reshape(9, 9)
    grey = grey_of(decode_image(encode(Image.fromarray(values, "F"), "TIFF")))
    assert grey.min() == 0 and grey.max() == 255
    assert grey[4, 4] == 128  # the middle value, 10.0
    assert (np.diff(grey.reshape(-1).astype(int)) >= 0).all()  # order kept


def test_float_image_with_nan_and_infinities() -> None:
    values = np.array([[0.0, 0.5, np.nan], [np.inf, -np.inf, 1.0]], dtype=np.float32)
    grey = grey_of(decode_image(encode(Image.fromarray(values, "F"), "TIFF")))
    # finite values span 0..1: scaled by 255; NaN -> 0; +-inf -> the finite extremes
    assert grey.tolist() == [[0, 128, 0], [255, 0, 255]]


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([0, 7, 200, 255], [0, 7, 200, 255]),  # 8-bit data in a 32-bit mode: kept
        ([0, 257, 32896, 65535], [0, 1, 128, 255]),  # 16-bit data: full 16-bit range
        ([-1000, 0, 1000, 3000], [0, 64, 128, 255]),  # anything else: min-max
        ([70000, 70000, 70000, 70000], [0, 0, 0, 0]),  # one value, out of range: black
    ],
)
def test_32bit_integer_images(values: list[int], expected: list[int]) -> None:
    arr = np.array(values, dtype=np.int32).reshape(2, 2)
    img = decode_image(encode(Image.fromarray(arr, "I"), "TIFF"))
    assert grey_of(img).reshape(-1).tolist() == expected


@pytest.mark.parametrize(("fmt", "mode"), [("PNG", "I;16"), ("TIFF", "I;16"), ("TIFF", "I;16B")])
def test_16bit_images_use_the_full_16bit_range(fmt: str, mode: str) -> None:
    values = np.array([0, 257, 4095, 32896, 65535, 65535], dtype=np.uint16).reshape(2, 3)
    dtype = ">u2" if mode == "I;16B" else "<u2"
    src = Image.frombytes(mode, (3, 2), values.astype(dtype).tobytes())
    data = encode(src, fmt)
    assert Image.open(io.BytesIO(data)).mode == mode
    assert grey_of(decode_image(data)).reshape(-1).tolist() == [0, 1, 16, 128, 255, 255]


def test_16bit_png_with_a_transparent_grey_value() -> None:
    values = np.array([[0, 1000], [1000, 65535]], dtype=np.uint16)
    img = decode_image(encode(Image.fromarray(values), "PNG", transparency=1000))
    assert img.mode == "RGBA"
    assert np.asarray(img)[..., 3].tolist() == [[255, 0], [0, 255]]
    assert img.getpixel((1, 1)) == (255, 255, 255, 255)


def test_float_tiff_is_tagged(wd_model_dir) -> None:
    from pathlib import Path

    from daemon.generators.base import ImageInput
    from daemon.generators.wd_tagger import WDTagger, WDTaggerConfig

    gen = WDTagger(WDTaggerConfig(model=str(wd_model_dir)))
    gen.load()
    bright = decode_image(encode(Image.new("F", (300, 300), 1.0), "TIFF"))
    dark = decode_image(encode(Image.new("F", (300, 300), 0.0), "TIFF"))
    got = gen.generate(
        [
            gen.prepare(ImageInput(Path(f"{n}.tif"), im))
            for n, im in (("bright", bright), ("dark", dark))
        ]
    )
    assert got[0].startswith("white background") and got[1].startswith("black background")
