"""Safe image intake: service/BAD_INPUTS.md rows 4-5, 7-18 and 20, each with at least one case.

Every test image is built here, in code (Pillow or hand-written bytes); nothing is read from disk.
    .venv/bin/python -m pytest tests/test_images.py -q
"""

from __future__ import annotations

# Time limits below are on this process's CPU time, so other jobs on a shared CI machine cannot fail them.

import base64
import functools
import io
import pathlib
import random
import re
import struct
import subprocess
import sys
import time
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import GifImagePlugin, Image, ImageFile, PngImagePlugin, WebPImagePlugin

from service import images
from service.errors import (
    BadAspectRatio,
    BadRequest,
    ImageTooLarge,
    ImageTooSmall,
    InvalidBase64,
    InvalidImage,
    PayloadTooLarge,
    ServiceError,
    TooManyItems,
    UnsupportedMediaType,
    UrlNotAllowed,
)
from service.images import (
    DEFAULT_LIMITS,
    ImageLimits,
    check_counts,
    check_question,
    check_url,
    decode_base64,
    decode_text,
    load_image,
    sniff_format,
    to_rgb,
)

MiB = 1024 * 1024
PNG_SIG = b"\x89PNG\r\n\x1a\n"


# --- builders ---------------------------------------------------------------------------------------


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def noise(size=(64, 64)) -> Image.Image:
    """Incompressible content, so a file cut at 10 % is cut inside the pixel data."""
    return Image.merge("RGB", [Image.effect_noise(size, 80 + 10 * i) for i in range(3)])


def png_chunk(ctype: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + ctype + data + struct.pack(">I", zlib.crc32(ctype + data))


def png_raw(width: int, height: int, bit_depth: int, color_type: int, rows: list[bytes], extra=()) -> bytes:
    """A PNG from raw scanlines (filter byte 0 prepended), for what Pillow cannot write (16-bit RGB)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    idat = zlib.compress(b"".join(b"\x00" + r for r in rows))
    return PNG_SIG + png_chunk(b"IHDR", ihdr) + b"".join(extra) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


@functools.lru_cache(maxsize=None)
def png_1bit(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG; the zlib stream is built row by row, so 30000x30000 is ~110 KB."""
    row = b"\x00" * (1 + (width + 7) // 8)
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return PNG_SIG + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def insert_after_ihdr(png: bytes, *chunks: bytes) -> bytes:
    end_of_ihdr = 8 + 8 + 13 + 4
    return png[:end_of_ihdr] + b"".join(chunks) + png[end_of_ihdr:]


def near(a, b, tol=12) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b))


def raises_code(exc_type, code: str, fn, *args, **kwargs) -> ServiceError:
    with pytest.raises(exc_type) as info:
        fn(*args, **kwargs)
    assert info.value.code == code, info.value
    return info.value


# --- row 7: base64 ----------------------------------------------------------------------------------


def test_base64_raw_and_data_url_round_trip():
    data = encode(Image.new("RGB", (16, 16), "red"), "PNG")
    b64 = base64.b64encode(data).decode()
    assert decode_base64(b64) == data
    assert decode_base64(f"  data:image/png;base64,{b64}\n") == data
    assert decode_base64(f"DATA:Image/JPEG;name=x.jpg;base64,{b64}") == data  # the MIME type is only a claim
    assert load_image(decode_base64(f"data:image/png;base64,{b64}")).format == "PNG"


@pytest.mark.parametrize(
    "text",
    [
        "aGVsbG8=!!!",  # junk after padding
        "aGVsbG8=aGVs",  # data after padding
        "aGVsbG8",  # missing padding
        "aGVsbG8==",  # too much padding
        "aGVs bG8=",  # whitespace inside
        "aGVs\nbG8=",
        "aGVs-G8_",  # URL-safe alphabet
        "aGVs*G8=",
        "aGVsbG8\u00e9",  # non-ASCII
        "",
        "   ",
        "data:image/png;base64,",  # empty payload
        "data:image/png,aGVsbG8=",  # not base64-encoded
        "data:text/plain;base64,aGVsbG8=",  # wrong MIME type
        "data:application/pdf;base64,aGVsbG8=",
        "data:image/svg+xml;base64,aGVsbG8=",
        "data:image/tiff;base64,aGVsbG8=",
        "data:;base64,aGVsbG8=",
        "data:image/png;base64",  # no comma
    ],
)
def test_bad_base64_is_400_invalid_base64(text):
    err = raises_code(InvalidBase64, "invalid_base64", decode_base64, text)
    assert err.status == 400


def test_non_string_base64_is_400():
    raises_code(InvalidBase64, "invalid_base64", decode_base64, b"aGVsbG8=")


@pytest.mark.parametrize("prefix", ["", "data:image/png;base64,"])
def test_40mb_base64_is_413_without_decoding(monkeypatch, prefix):
    def must_not_decode(*args, **kwargs):
        raise AssertionError("decoded an over-limit string")

    monkeypatch.setattr(images.base64, "b64decode", must_not_decode)
    huge = prefix + "A" * 40_000_000
    t0 = time.process_time()
    err = raises_code(PayloadTooLarge, "payload_too_large", decode_base64, huge)
    assert time.process_time() - t0 < 0.1
    assert err.status == 413 and "10.0 MiB" in err.message and "28.6 MiB" in err.message


def test_base64_size_limit_boundary():
    limits = ImageLimits(max_image_bytes=30)
    assert len(decode_base64(base64.b64encode(b"x" * 30).decode(), limits)) == 30
    assert len(decode_base64(base64.b64encode(b"x" * 29).decode(), limits)) == 29  # padded
    raises_code(PayloadTooLarge, "payload_too_large", decode_base64, base64.b64encode(b"x" * 31).decode(), limits)


# --- rows 8-9: empty, random, refused formats -------------------------------------------------------


def test_empty_and_random_bytes_are_400_invalid_image():
    raises_code(InvalidImage, "invalid_image", load_image, b"")
    rng = random.Random(0)
    for _ in range(20):
        junk = bytes([0x41]) + rng.randbytes(899)  # 'A': no magic starts with it
        raises_code(InvalidImage, "invalid_image", load_image, junk)
    # Right magic, garbage after it: still 400, from Pillow's parser.
    for magic in (b"\xff\xd8\xff", PNG_SIG, b"GIF89a", b"BM", b"RIFF\x00\x00\x00\x00WEBP"):
        raises_code(InvalidImage, "invalid_image", load_image, magic + rng.randbytes(200))


def _refused_samples() -> dict[str, bytes]:
    small = Image.new("RGB", (16, 16), "red")
    return {
        "pdf": encode(small, "PDF"),
        "svg": b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
        "svg_bare": b'\xef\xbb\xbf  <svg xmlns="http://www.w3.org/2000/svg"><rect/></svg>',
        "eps": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",
        "eps_dos": b"\xc5\xd0\xd3\xc6" + b"\x00" * 60,
        "tiff": encode(small, "TIFF"),
        "tiff_be": b"MM\x00*\x00\x00\x00\x08" + b"\x00" * 40,
        "psd": b"8BPS\x00\x01" + b"\x00" * 20,
        "jp2": encode(small, "JPEG2000"),
        "j2k": b"\xff\x4f\xff\x51" + b"\x00" * 40,
        "ico": encode(small, "ICO"),
        "heic": b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic",
        "avif": encode(small, "AVIF"),
    }


REFUSED = _refused_samples()


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_formats_are_415_by_magic_bytes(monkeypatch, name):
    # They never reach Pillow: EPS can't get to Ghostscript, TIFF can't walk its IFD chains.
    monkeypatch.setattr(Image, "open", lambda *a, **k: pytest.fail("refused format reached Image.open"))
    err = raises_code(UnsupportedMediaType, "unsupported_image_format", load_image, REFUSED[name])
    assert err.status == 415


@pytest.mark.parametrize("name", ["tiff", "eps", "pdf", "svg"])
def test_format_is_decided_by_bytes_not_by_claimed_type(name):
    # The equivalent of `x.png` with Content-Type image/png: only the data URL can claim a type here.
    claimed_png = "data:image/png;base64," + base64.b64encode(REFUSED[name]).decode()
    raises_code(UnsupportedMediaType, "unsupported_image_format", load_image, decode_base64(claimed_png))


def test_sniff_format_allowed():
    small = Image.new("RGB", (16, 16), "red")
    for fmt in ("JPEG", "PNG", "WEBP", "GIF", "BMP"):
        assert sniff_format(encode(small, fmt)) == fmt


def test_format_allowlist_is_configurable():
    gif = encode(Image.new("RGB", (16, 16), "red"), "GIF")
    raises_code(UnsupportedMediaType, "unsupported_image_format", load_image, gif, ImageLimits(formats=("PNG",)))


# --- row 10: truncated and corrupt ------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_truncated_files_are_400_invalid_image(fmt, fraction):
    data = encode(noise(), fmt)
    load_image(data)  # the whole file is fine
    raises_code(InvalidImage, "invalid_image", load_image, data[: int(len(data) * fraction)])


@pytest.mark.parametrize("chunk", [b"IHDR", b"IDAT", b"IEND", b"tEXt"])
def test_png_bad_crc_is_400_invalid_image(chunk):
    data = bytearray(encode(noise(), "PNG", pnginfo=_text_info()))
    start = data.find(chunk) - 4
    length = struct.unpack(">I", data[start : start + 4])[0]
    data[start + 8 + length] ^= 0xFF  # first CRC byte; Pillow itself never checks IDAT's
    raises_code(InvalidImage, "invalid_image", load_image, bytes(data))


def test_png_with_too_many_chunks_is_400():
    many = insert_after_ihdr(_red_png(), png_chunk(b"zzZz", b"") * 60_000)  # 720 KB, 60k chunks
    t0 = time.process_time()
    raises_code(InvalidImage, "invalid_image", load_image, many)
    assert time.process_time() - t0 < 1.0
    assert load_image(insert_after_ihdr(_red_png(), png_chunk(b"zzZz", b"") * 20_000)).format == "PNG"


def _text_info() -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "hello")
    return info


def test_load_truncated_images_flag_is_kept_false(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as some other library might
    data = encode(noise(), "JPEG")
    raises_code(InvalidImage, "invalid_image", load_image, data[: len(data) // 2])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# --- rows 11-13: bombs and large photos -------------------------------------------------------------


class DecodeSpy:
    """Records every ImageFile.load() that reaches a decoder."""

    def __init__(self, monkeypatch):
        self.calls = 0
        original = ImageFile.ImageFile.load

        def load(img):
            self.calls += 1
            return original(img)

        monkeypatch.setattr(ImageFile.ImageFile, "load", load)


def test_png_bomb_30000_is_413_in_milliseconds_without_decoding(monkeypatch):
    data = png_1bit(30000, 30000)
    assert len(data) < 200_000
    spy = DecodeSpy(monkeypatch)
    t0 = time.process_time()
    err = raises_code(ImageTooLarge, "image_too_large", load_image, data)
    assert time.process_time() - t0 < 1.0
    assert err.status == 413 and spy.calls == 0


@pytest.mark.parametrize("side", [12000, 7000])  # Pillow's warning zone; below Pillow's limit, above ours
def test_png_over_our_pixel_cap_is_413_without_decoding(monkeypatch, side):
    spy = DecodeSpy(monkeypatch)
    err = raises_code(ImageTooLarge, "image_too_large", load_image, png_1bit(side, side))
    assert spy.calls == 0
    if side == 7000:
        assert err.message == "image is 7000x7000 = 49.0 megapixels; the limit is 40 megapixels"


def test_pixel_cap_is_configurable():
    raises_code(ImageTooLarge, "image_too_large", load_image, png_1bit(40, 40), ImageLimits(max_pixels=1000))
    assert load_image(png_1bit(40, 40), ImageLimits(max_pixels=1600)).original_size == (40, 40)


def test_large_jpeg_is_decoded_with_draft_and_downscaled():
    img = Image.new("RGB", (8000, 6000), (10, 200, 30))
    img.paste((200, 20, 20), (0, 0, 4000, 3000))
    data = encode(img, "JPEG", quality=85)
    t0 = time.process_time()
    loaded = load_image(data)
    elapsed = time.process_time() - t0
    assert elapsed < 3.0
    assert loaded.original_size == (8000, 6000)
    assert loaded.image.mode == "RGB" and loaded.image.size == (2048, 1536)
    assert near(loaded.image.getpixel((100, 100)), (200, 20, 20), 20)
    assert near(loaded.image.getpixel((2000, 1500)), (10, 200, 30), 20)


def test_progressive_jpeg_is_capped_by_its_header_size():
    # libjpeg keeps a progressive file's coefficients at full size whatever the draft scale.
    img = Image.new("RGB", (8000, 6000), "white")
    raises_code(ImageTooLarge, "image_too_large", load_image, encode(img, "JPEG", progressive=True))
    small = encode(Image.new("RGB", (3000, 2000), "white"), "JPEG", progressive=True)
    assert load_image(small).image.size == (2048, 1365)


def test_baseline_jpeg_decoded_size_still_capped():
    # 16000x3000: draft can't shrink it (the short side is already near the target): 48 MP decoded.
    data = encode(Image.new("L", (16000, 3000), 128), "JPEG")
    raises_code(ImageTooLarge, "image_too_large", load_image, data)


def test_image_bytes_over_limit_is_413():
    data = encode(noise(), "PNG")
    raises_code(PayloadTooLarge, "payload_too_large", load_image, data, ImageLimits(max_image_bytes=len(data) - 1))


# --- row 14: geometry -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "exc", "code"),
    [
        ((1, 1), ImageTooSmall, "image_too_small"),
        ((1, 500), ImageTooSmall, "image_too_small"),
        ((500, 1), ImageTooSmall, "image_too_small"),
        ((2, 10000), ImageTooSmall, "image_too_small"),  # the short side is checked before the ratio
        ((10, 1000), BadAspectRatio, "bad_aspect_ratio"),
        ((1000, 10), BadAspectRatio, "bad_aspect_ratio"),
        ((8, 408), BadAspectRatio, "bad_aspect_ratio"),
        ((20000, 400), ImageTooLarge, "image_too_large"),  # longest side > 16384
    ],
)
def test_bad_geometry(size, exc, code):
    err = raises_code(exc, code, load_image, png_1bit(*size))
    assert f"{size[0]}x{size[1]}" in err.message


@pytest.mark.parametrize("size", [(8, 8), (8, 400), (400, 8), (16384, 400)])
def test_edge_geometry_is_accepted(size):
    loaded = load_image(png_1bit(*size))
    assert loaded.original_size == size and max(loaded.image.size) <= 2048


# --- row 15: animations -----------------------------------------------------------------------------


def _frames(n: int) -> list[Image.Image]:
    return [Image.new("RGB", (16, 16), (i % 256, (i * 7) % 256, 255 - i % 256)) for i in range(n)]


def _seek_spy(monkeypatch, cls) -> list[int]:
    seen: list[int] = []
    original = cls.seek

    def seek(self, frame):
        seen.append(frame)
        return original(self, frame)

    monkeypatch.setattr(cls, "seek", seek)
    return seen


@pytest.mark.parametrize(
    ("fmt", "cls", "n"),
    [("GIF", GifImagePlugin.GifImageFile, 500), ("PNG", PngImagePlugin.PngImageFile, 300), ("WEBP", WebPImagePlugin.WebPImageFile, 300)],
)
def test_animation_uses_frame_zero_only(monkeypatch, fmt, cls, n):
    frames = _frames(n)
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=20, loop=0)
    with Image.open(io.BytesIO(data)) as check:
        assert check.n_frames == n  # the file really is animated
    seen = _seek_spy(monkeypatch, cls)
    t0 = time.process_time()
    loaded = load_image(data)
    assert time.process_time() - t0 < 0.5
    assert set(seen) <= {0}
    assert near(loaded.image.getpixel((8, 8)), (0, 0, 255), 8)


# --- row 16: metadata bombs -------------------------------------------------------------------------


def _red_png() -> bytes:
    return encode(Image.new("RGB", (32, 32), "red"), "PNG")


METADATA_BOMBS = {
    "ztxt_8mib": lambda: insert_after_ihdr(_red_png(), png_chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"\x00" * 8 * MiB))),
    "itxt_compressed_8mib": lambda: insert_after_ihdr(
        _red_png(), png_chunk(b"iTXt", b"XML:com.adobe.xmp\x00\x01\x00\x00\x00" + zlib.compress(b"a" * 8 * MiB))
    ),
    "itxt_plain_3mib": lambda: insert_after_ihdr(_red_png(), png_chunk(b"iTXt", b"Comment\x00\x00\x00\x00\x00" + b"a" * 3 * MiB)),
    "text_after_idat": lambda: (lambda p: p[:-12] + png_chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"\x00" * 8 * MiB)) + p[-12:])(_red_png()),
    "many_text_chunks": lambda: insert_after_ihdr(_red_png(), *[png_chunk(b"tEXt", b"k%d\x00v" % i) for i in range(2000)]),
    "icc_10mb_png": lambda: insert_after_ihdr(_red_png(), png_chunk(b"iCCP", b"icc\x00\x00" + zlib.compress(b"\x00" * 10_000_000))),
    "icc_10mb_jpeg": lambda: encode(Image.new("RGB", (32, 32), "red"), "JPEG", icc_profile=b"\x00" * 10_000_000),
    "exif_looping_ifd": lambda: encode(Image.new("RGB", (48, 32), "red"), "JPEG", exif=_looping_exif()),
    "exif_corrupt": lambda: encode(Image.new("RGB", (48, 32), "red"), "JPEG", exif=b"Exif\x00\x00II*\x00\xff\xff\xff\x7f" + b"\xab" * 50),
    "exif_huge_count": lambda: encode(Image.new("RGB", (48, 32), "red"), "JPEG", exif=b"Exif\x00\x00II*\x00\x08\x00\x00\x00\xff\xff" + b"\x00" * 40),
}


def _looping_exif() -> bytes:
    """IFD0 whose next-IFD pointer and Exif-IFD pointer both point back at IFD0."""
    entries = struct.pack("<HHII", 0x0112, 3, 1, 6) + struct.pack("<HHII", 0x8769, 4, 1, 8)
    ifd0 = struct.pack("<H", 2) + entries + struct.pack("<I", 8)
    return b"Exif\x00\x00" + b"II*\x00" + struct.pack("<I", 8) + ifd0


@pytest.mark.parametrize("name", sorted(METADATA_BOMBS))
def test_metadata_bombs_are_ignored(name):
    # BAD_INPUTS allows 200 or 400; we promise 200: PNG text/ICC chunks are dropped before Pillow
    # parses them, and EXIF failures only cost the orientation.
    data = METADATA_BOMBS[name]()
    assert len(data) <= DEFAULT_LIMITS.max_image_bytes
    t0 = time.process_time()
    loaded = load_image(data)
    assert time.process_time() - t0 < 2.0
    assert near(loaded.image.getpixel((16, 16)), (255, 0, 0), 8)


# --- row 17: mode zoo -------------------------------------------------------------------------------


def test_sixteen_bit_grey_png_is_scaled_not_clipped():
    row = struct.pack("<24H", *([65535] * 8 + [32768] * 8 + [100] * 8))
    img = Image.frombytes("I;16", (24, 8), row * 8)  # (Image.paste of an int into I;16 stores wrong values)
    loaded = load_image(encode(img, "PNG"))
    assert [loaded.image.getpixel((x * 8 + 4, 4)) for x in range(3)] == [(255, 255, 255), (128, 128, 128), (0, 0, 0)]


def test_sixteen_bit_rgb_and_rgba_png():
    rgb = png_raw(8, 8, 16, 2, [struct.pack(">HHH", 0xFFFF, 0x8000, 0x0000) * 8] * 8)
    assert load_image(rgb).image.getpixel((4, 4)) == (255, 128, 0)
    transparent = png_raw(8, 8, 16, 6, [struct.pack(">HHHH", 0, 0, 0xFFFF, 0) * 8] * 8)
    assert load_image(transparent).image.getpixel((4, 4)) == (255, 255, 255)


def test_cmyk_jpeg():
    loaded = load_image(encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95))
    assert near(loaded.image.getpixel((8, 8)), (255, 0, 0), 12)


def test_palette_with_transparency_is_composited_on_white():
    img = Image.new("P", (16, 16), 1)
    img.putpalette([0, 255, 0, 255, 0, 0] + [0] * 762)
    img.paste(0, (0, 0, 8, 16))
    for data in (encode(img, "PNG", transparency=0), encode(img, "GIF", transparency=0)):
        loaded = load_image(data)
        assert loaded.image.getpixel((2, 2)) == (255, 255, 255)
        assert loaded.image.getpixel((12, 2)) == (255, 0, 0)


def test_alpha_modes_are_composited_on_the_background():
    la = Image.new("LA", (16, 16), (0, 0))
    la.paste((0, 255), (8, 0, 16, 16))
    loaded = load_image(encode(la, "PNG"))
    assert loaded.image.getpixel((2, 2)) == (255, 255, 255) and loaded.image.getpixel((12, 2)) == (0, 0, 0)

    rgba = Image.new("RGBA", (24, 8), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (8, 0, 16, 8))
    rgba.paste((0, 0, 0, 128), (16, 0, 24, 8))
    for fmt in ("PNG", "WEBP"):
        out = load_image(encode(rgba, fmt, lossless=True) if fmt == "WEBP" else encode(rgba, fmt)).image
        assert out.getpixel((4, 4)) == (255, 255, 255)
        assert out.getpixel((12, 4)) == (0, 0, 255)
        assert near(out.getpixel((20, 4)), (127, 127, 127), 2)
    black = load_image(encode(rgba, "PNG"), ImageLimits(background=(0, 0, 0))).image
    assert black.getpixel((4, 4)) == (0, 0, 0)


def test_one_bit_grey_and_bmp():
    one = Image.new("1", (16, 16), 0)
    one.paste(1, (8, 0, 16, 16))
    for fmt in ("PNG", "BMP"):
        out = load_image(encode(one, fmt)).image
        assert out.getpixel((2, 2)) == (0, 0, 0) and out.getpixel((12, 2)) == (255, 255, 255)
    assert load_image(encode(Image.new("L", (16, 16), 77), "PNG")).image.getpixel((1, 1)) == (77, 77, 77)


def test_float_and_int32_modes_in_memory():
    f = Image.new("F", (3, 1))
    f.putdata([-5.0, 100.4, 300.0])
    assert [to_rgb(f).getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (100, 100, 100), (255, 255, 255)]
    i = Image.new("I", (4, 1))
    i.putdata([65535, 32768, -5, 100000])
    assert [to_rgb(i).getpixel((x, 0))[0] for x in range(4)] == [255, 128, 0, 255]


@settings(max_examples=60, deadline=None)
@given(
    mode=st.sampled_from(["1", "L", "P", "RGB", "RGBA", "LA", "CMYK", "I;16", "I", "F", "PA"]),
    size=st.tuples(st.integers(1, 20), st.integers(1, 20)),
    seed=st.integers(0, 2**16),
)
def test_to_rgb_property(mode, size, seed):
    rng = random.Random(seed)
    img = Image.frombytes("L", size, rng.randbytes(size[0] * size[1])).convert(mode)
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == size and out is not img


# --- row 18: EXIF orientation -----------------------------------------------------------------------

# EXIF orientation -> the transpose that shows the stored pixels upright (EXIF 2.3, tag 0x0112).
ORIENTATION = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
QUADRANTS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]


def _quadrants(w: int, h: int) -> Image.Image:
    img = Image.new("RGB", (w, h))
    for k, colour in enumerate(QUADRANTS):
        x, y = (k % 2) * w // 2, (k // 2) * h // 2
        img.paste(colour, (x, y, x + w // 2, y + h // 2))
    return img


def _with_orientation(img: Image.Image, value) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return encode(img, "JPEG", exif=exif.tobytes(), quality=95, subsampling=0)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_gives_displayed_orientation(orientation):
    stored = _quadrants(80, 40)
    loaded = load_image(_with_orientation(stored, orientation))
    method = ORIENTATION[orientation]
    expected = stored if method is None else stored.transpose(method)
    assert loaded.original_size == expected.size == loaded.image.size
    w, h = expected.size
    for x, y in ((w // 4, h // 4), (3 * w // 4, h // 4), (w // 4, 3 * h // 4), (3 * w // 4, 3 * h // 4)):
        assert near(loaded.image.getpixel((x, y)), expected.getpixel((x, y)), 40), (orientation, x, y)


def test_orientation_6_swaps_40x20_to_20x40():
    loaded = load_image(_with_orientation(_quadrants(40, 20), 6))
    assert loaded.original_size == (20, 40) and loaded.image.size == (20, 40)


def test_orientation_swap_is_reported_at_full_resolution():
    loaded = load_image(_with_orientation(Image.new("RGB", (6000, 3000), "white"), 8))
    assert loaded.original_size == (3000, 6000)
    assert loaded.image.size == (1024, 2048)


@pytest.mark.parametrize("value", [0, 9, 99, 65535])
def test_invalid_orientation_is_ignored(value):
    loaded = load_image(_with_orientation(_quadrants(40, 20), value))
    assert loaded.original_size == (40, 20) and near(loaded.image.getpixel((5, 5)), QUADRANTS[0], 40)


def test_corrupt_exif_is_ignored():
    assert load_image(METADATA_BOMBS["exif_corrupt"]()).original_size == (48, 32)
    assert load_image(METADATA_BOMBS["exif_huge_count"]()).original_size == (48, 32)


# --- fuzz: only our errors, never anything else -----------------------------------------------------

_SEEDS = [
    encode(noise((24, 16)), "PNG"),
    encode(noise((24, 16)), "JPEG"),
    encode(noise((24, 16)), "GIF"),
    encode(noise((24, 16)), "BMP"),
    encode(noise((24, 16)), "WEBP"),
    _with_orientation(_quadrants(24, 16), 6),
]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_random_bytes_raise_only_service_errors(data):
    try:
        load_image(data)
    except ServiceError as err:
        assert err.status in (400, 413, 415)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.sampled_from(range(len(_SEEDS))), edits=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=8), cut=st.floats(0.05, 1.0))
def test_mutated_images_raise_only_service_errors(seed, edits, cut):
    data = bytearray(_SEEDS[seed])
    for where, value in edits:
        data[min(int(where * len(data)), len(data) - 1)] = value
    data = bytes(data[: max(1, int(len(data) * cut))])
    try:
        loaded = load_image(data)
    except ServiceError as err:
        assert err.status in (400, 413, 415)
    else:
        assert loaded.image.mode == "RGB"


# --- rows 4-5: counts and questions -----------------------------------------------------------------


def test_counts():
    check_counts(images=4, questions=16)
    raises_code(TooManyItems, "too_many_images", check_counts, images=5)
    err = raises_code(TooManyItems, "too_many_questions", check_counts, questions=17)
    assert err.message == "request has 17 questions; the limit is 16"
    check_counts(ImageLimits(max_images=1), images=1)
    raises_code(TooManyItems, "too_many_images", check_counts, ImageLimits(max_images=1), images=2)


def test_questions():
    assert check_question("  What colour is the circle?\n") == "What colour is the circle?"
    assert check_question("a" * 2000 + "   ") == "a" * 2000
    err = raises_code(BadRequest, "question_too_long", check_question, "b" * 2001)
    assert err.message == "question is 2001 characters; the limit is 2000" and err.status == 400
    raises_code(BadRequest, "invalid_question", check_question, "what\x00is this")
    for blank in ("", "   ", "\n\t \r"):
        raises_code(BadRequest, "empty_question", check_question, blank)
    raises_code(BadRequest, "question_too_long", check_question, "abc", ImageLimits(max_question_chars=2))


def test_decode_text():
    assert decode_text("héllo ✓".encode()) == "héllo ✓"
    for raw in (b"\xff\xfe", b"\xc0\xaf", b"abc\xe2\x82", b"\xed\xa0\x80"):  # bad byte, overlong, cut, surrogate
        raises_code(BadRequest, "invalid_utf8", decode_text, raw)


# --- row 20: URLs -----------------------------------------------------------------------------------

PUBLIC = "93.184.216.34"


def fixed(*addresses):
    return lambda host: list(addresses)


def no_dns(host):
    raise AssertionError(f"resolved {host}")


def test_urls_refused_by_default():
    for allow in ([], [""], ["  "]):
        raises_code(UrlNotAllowed, "url_not_allowed", check_url, "https://images.example.com/a.png", allow, resolve=no_dns)


def test_allowlisted_public_host_is_accepted():
    allow = ["images.example.com"]
    assert check_url("https://images.example.com/a.png", allow, resolve=fixed(PUBLIC)) == (PUBLIC,)
    assert check_url("HTTP://Images.Example.COM.:8080/a.png?x=1", allow, resolve=fixed(PUBLIC, "2606:4700:4700::1111"))


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://images.example.com/a.png",
        "gopher://images.example.com/",
        "javascript:alert(1)",
        "images.example.com/a.png",
        "//images.example.com/a.png",
        "http://images.example.com@evil.example/",  # user info
        "http://user:pw@images.example.com/",
        "http://evil.example#@images.example.com/",
        "http://evil.example?@images.example.com/",
        "http://images.example.com.evil.example/",
        "http://evil.example/images.example.com",
        "http://images.example.com\\@evil.example/",
        "http://images.example.com:99999/",
        "http://images.example.com:port/",
        "http://images.example.com /",
        "http://images.example.com/\x00",
        "http://[::1/",
        "https://images.example.com/" + "a" * 3000,
    ],
)
def test_bad_urls_are_refused(url):
    raises_code(UrlNotAllowed, "url_not_allowed", check_url, url, ["images.example.com"], resolve=no_dns)


INTERNAL_HOSTS = [
    "127.0.0.1", "2130706433", "0177.0.0.1", "0x7f.0.0.1", "0x7f000001", "127.1", "017700000001",
    "[::1]", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "[0:0:0:0:0:ffff:a9fe:a9fe]", "169.254.169.254",
    "10.0.0.1", "172.16.5.4", "192.168.1.1", "100.64.0.1", "0.0.0.0", "[::]", "224.0.0.1",
    "255.255.255.255", "240.0.0.1", "[fe80::1]", "[fc00::1]", "[ff02::1]", "[64:ff9b::a00:1]",
    "[2002:7f00:1::]", "192.0.2.1", "198.18.0.1",
]  # fmt: skip


@pytest.mark.parametrize("host", INTERNAL_HOSTS)
def test_internal_ip_literals_are_refused_even_when_listed(host):
    # The allowlist names the host verbatim: only the address checks can refuse it.
    bare = host.strip("[]")
    raises_code(UrlNotAllowed, "url_not_allowed", check_url, f"http://{host}/a.png", [bare, host], resolve=no_dns)


@pytest.mark.parametrize(
    "addresses",
    [
        ["127.0.0.1"],
        [PUBLIC, "10.0.0.5"],  # every resolved address is checked, not just the first
        ["::ffff:10.0.0.1"],
        ["fe80::1%eth0"],
        ["64:ff9b::7f00:1"],
        ["2001:0:4136:e378:8000:63bf:3fff:fdd2"],  # Teredo: its client address, 192.0.2.45 (TEST-NET), is checked
        ["not-an-ip"],
        [],
    ],
)
def test_allowlisted_host_resolving_inside_is_refused(addresses):
    raises_code(UrlNotAllowed, "url_not_allowed", check_url, "https://images.example.com/", ["images.example.com"], resolve=fixed(*addresses))


def test_unresolvable_host_is_refused():
    def fail(host):
        raise OSError("Name or service not known")

    raises_code(UrlNotAllowed, "url_not_allowed", check_url, "https://images.example.com/", ["images.example.com"], resolve=fail)


# --- error hygiene over everything above ------------------------------------------------------------

LEAKS = re.compile(r"0x[0-9a-fA-F]{4,}|/home/|/tmp/|/usr/|\.py\b|Traceback|object at|<_io|BytesIO|Errno", re.I)
MARK = "QZXV"


def _assert_clean(err: ServiceError, echo: str | None = None) -> None:
    assert not LEAKS.search(err.message), err.message
    assert err.message and len(err.message) < 200
    if echo:
        assert echo not in err.message


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=64))
def test_base64_errors_never_echo(text):
    try:
        decode_base64(MARK + text)
    except ServiceError as err:
        _assert_clean(err, MARK)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=3000))
def test_question_errors_never_echo(text):
    try:
        check_question(MARK + text)
    except ServiceError as err:
        _assert_clean(err, MARK)


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=80), st.sampled_from(["http://", "https://", "file://", "", "http://images.example.com/"]))
def test_url_errors_never_echo(text, prefix):
    try:
        check_url(prefix + MARK + text, ["images.example.com"], resolve=fixed("10.0.0.1"))
    except ServiceError as err:
        _assert_clean(err, MARK)


@settings(max_examples=150, deadline=None)
@given(st.binary(min_size=8, max_size=512))
def test_image_errors_never_echo(data):
    try:
        load_image(data)
    except ServiceError as err:
        _assert_clean(err, data.decode("latin-1"))


def test_every_catalogued_error_message_is_clean():
    cases = [
        lambda: load_image(b""),
        lambda: load_image(png_1bit(30000, 30000)),
        lambda: load_image(png_1bit(1, 1)),
        lambda: load_image(REFUSED["eps"]),
        lambda: load_image(encode(noise(), "JPEG")[:300]),
        lambda: decode_base64("A" * 20_000_000),
        lambda: decode_text(b"\xff"),
        lambda: check_url("http://2130706433/", ["2130706433"]),
    ]
    for case in cases:
        with pytest.raises(ServiceError) as info:
            case()
        _assert_clean(info.value)


def test_intake_modules_import_no_model_code():
    code = (
        "import sys, service.images, service.errors; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'qformer', 'training')); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    repo = pathlib.Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=repo)
    assert result.returncode == 0, result.stdout + result.stderr
