"""Safe intake of untrusted images, questions and URLs (service/BAD_INPUTS.md rows 4-5, 7-18, 20).

Pure Pillow + stdlib, no model imports. Every refusal is a `service.errors.ServiceError` with a fixed
message; anything Pillow raises while parsing becomes 400 `invalid_image`, so a malformed file can
never surface as a 500.

    raw = decode_base64(request.image_b64, limits)     # or the bytes of a multipart file
    loaded = load_image(raw, limits)                    # LoadedImage(image=<RGB>, original_size, format)

The order in `load_image` is the point: byte size -> magic bytes -> header (dimensions, no pixels) ->
pixel/side/aspect limits -> decode (JPEG draft mode) -> EXIF transpose -> RGB -> downscale.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import logging
import re
import socket
import warnings
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from PIL import Image, ImageFile, ImageOps

from service.errors import (
    BadAspectRatio,
    BadRequest,
    ImageTooLarge,
    ImageTooSmall,
    InvalidBase64,
    InvalidImage,
    PayloadTooLarge,
    TooManyItems,
    UnsupportedMediaType,
    UrlNotAllowed,
)

log = logging.getLogger(__name__)

MiB = 1024 * 1024
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")  # Pillow's format names


@dataclass(frozen=True)
class ImageLimits:
    max_body_bytes: int = 16 * MiB  # whole request; enforced while streaming, by the app
    max_image_bytes: int = 10 * MiB  # one image, after base64 decoding
    # Checked before decoding, on the header size (on the draft size for baseline JPEG, see load_image);
    # below Pillow's own bomb threshold (89.5 MP), whose warning is an error here anyway.
    max_pixels: int = 40_000_000
    min_side: int = 8  # smaller images carry no signal for a 224-px encoder and break some resizers
    max_side: int = 16384
    max_aspect: float = 50.0
    max_images: int = 4
    max_questions: int = 16
    max_question_chars: int = 2000
    formats: tuple[str, ...] = ALLOWED_FORMATS
    max_decode_side: int = 2048  # longest side kept after decode; encoders want <= 1K, 2K keeps boxes sharp
    background: tuple[int, int, int] = (255, 255, 255)  # transparent pixels are composited on this


DEFAULT_LIMITS = ImageLimits()


@dataclass(frozen=True)
class LoadedImage:
    image: Image.Image  # RGB, EXIF-transposed, frame 0, longest side <= max_decode_side
    original_size: tuple[int, int]  # (width, height) of the full-resolution image as displayed
    format: str  # one of ALLOWED_FORMATS, from the magic bytes


# --- format sniffing --------------------------------------------------------------------------------

_ALLOWED_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
)
# Recognised formats we refuse (415). Anything unrecognised is 400 invalid_image.
_REFUSED_MAGIC = (
    (b"%PDF", "PDF"),
    (b"%!PS", "PostScript/EPS"),
    (b"\xc5\xd0\xd3\xc6", "PostScript/EPS"),  # DOS EPS binary header
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"),  # BigTIFF
    (b"MM\x00+", "TIFF"),
    (b"8BPS", "PSD"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),  # raw codestream
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEG XL"),
    (b"\xff\x0a", "JPEG XL"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"\x00\x00\x02\x00", "CUR"),
    (b"icns", "ICNS"),
    (b"qoif", "QOI"),
    (b"DDS ", "DDS"),
    (b"gimp xcf", "XCF"),
    (b"\x76\x2f\x31\x01", "OpenEXR"),
    (b"\xd7\xcd\xc6\x9a", "WMF"),
)


def _refuse_format(name: str) -> UnsupportedMediaType:
    return UnsupportedMediaType(
        f"image format {name} is not supported; allowed formats: JPEG, PNG, WebP, GIF, BMP", param="image"
    )


def sniff_format(data: bytes) -> str:
    """The allowed format named by the magic bytes; 415 for a known other format, 400 for anything else.

    The filename and the Content-Type header are never consulted: Pillow picks its parser from these
    same bytes, so `x.png` holding EPS would otherwise reach Ghostscript.
    """
    head = bytes(data[:64])
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    for magic, name in _ALLOWED_MAGIC:
        if head.startswith(magic):
            return name
    if head[4:8] == b"ftyp":  # ISO base media: HEIC/HEIF, AVIF, MP4
        brand = head[8:12]
        if brand in (b"avif", b"avis"):
            raise _refuse_format("AVIF")
        raise _refuse_format("HEIC/HEIF" if brand[:3] in (b"hei", b"hev", b"mif", b"msf") else "ISO media")
    for magic, name in _REFUSED_MAGIC:
        if head.startswith(magic):
            raise _refuse_format(name)
    text = bytes(data[:1024]).lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith(b"<") and (b"<svg" in text or text.startswith((b"<?xml", b"<!doctype svg"))):
        raise _refuse_format("SVG/XML")
    if not data:
        raise InvalidImage("the image is empty", param="image")
    raise InvalidImage("the image format was not recognised (no known magic bytes)", param="image")


# --- base64 -----------------------------------------------------------------------------------------

_DATA_URL_MIME = {
    "image/jpeg", "image/jpg", "image/pjpeg", "image/png", "image/apng", "image/webp",
    "image/gif", "image/bmp", "image/x-bmp", "image/x-ms-bmp",
}  # fmt: skip


def _mib(n: float) -> str:
    return f"{n / MiB:.1f} MiB"


def decode_base64(s: str, limits: ImageLimits = DEFAULT_LIMITS, *, param: str = "image") -> bytes:
    """Strict base64 (RFC 4648 alphabet, correct padding, no inner whitespace), raw or as a data URL.

    A data URL must say `;base64` and name an allowed image MIME type, else 400 `invalid_base64` (the
    MIME type is only a claim: the format is still decided by the magic bytes). The decoded size is
    computed from the length first, so a 40 MB string is refused (413) without being decoded.
    """
    if not isinstance(s, str):
        raise InvalidBase64("the image must be a base64 string", param=param)
    head = s[:512]
    start = len(head) - len(head.lstrip())
    if head[start : start + 5].lower() == "data:":
        comma = head.find(",", start)
        if comma < 0:
            raise InvalidBase64("the data URL has no ',' within its first 512 characters", param=param)
        params = [p.strip().lower() for p in head[start + 5 : comma].split(";")]
        if len(params) < 2 or params[-1] != "base64":
            raise InvalidBase64("the data URL must be base64-encoded (';base64,')", param=param)
        if params[0] not in _DATA_URL_MIME:
            raise InvalidBase64(
                "the data URL must declare an image MIME type "
                "(image/jpeg, image/png, image/webp, image/gif or image/bmp)",
                param=param,
            )
        start = comma + 1
    approx = (len(s) - start) * 3 // 4
    if approx > limits.max_image_bytes + 2:  # + 2: the padding this estimate counts
        raise PayloadTooLarge(
            f"image is about {_mib(approx)} after base64 decoding; "
            f"the limit is {_mib(limits.max_image_bytes)}",
            param=param,
        )
    payload = s[start:].strip()
    if not payload:
        raise InvalidBase64("the base64 string is empty", param=param)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):  # bad alphabet, padding, data after padding, non-ASCII
        raise InvalidBase64(
            "the image is not valid base64 (standard alphabet, '=' padding, no whitespace inside)", param=param
        ) from None
    if len(data) > limits.max_image_bytes:
        raise PayloadTooLarge(
            f"image is {_mib(len(data))}; the limit is {_mib(limits.max_image_bytes)}", param=param
        )
    return data


# --- decoding ---------------------------------------------------------------------------------------

# Text and ICC chunks are never used. Dropping them before Pillow sees them makes zTXt/iTXt/iCCP
# bombs (Pillow raises ValueError past MAX_TEXT_CHUNK, and holds up to 64 MiB of text) a non-event.
_PNG_METADATA_CHUNKS = {b"tEXt", b"zTXt", b"iTXt", b"iCCP"}
# Real files have a few thousand at most (8 KiB IDATs, or 2 per APNG frame); 850k empty chunks fit in
# 10 MiB and cost ~3 s of Python-level parsing here and in Pillow.
_MAX_PNG_CHUNKS = 50_000


def _check_png_chunks(data: bytes) -> bytes:
    """Verify every chunk's CRC (Pillow skips IDAT's) and drop metadata chunks.

    A truncated tail is left in place for Pillow to reject at `load()`.
    """
    view = memoryview(data)
    kept: list[memoryview] = [view[:8]]
    pos, dropped = 8, False
    for _ in range(_MAX_PNG_CHUNKS):
        if pos + 12 > len(data):
            break
        length = int.from_bytes(view[pos : pos + 4], "big")
        end = pos + 12 + length
        if end > len(data):
            break
        ctype = bytes(view[pos + 4 : pos + 8])
        if zlib.crc32(view[pos + 4 : end - 4]) != int.from_bytes(view[end - 4 : end], "big"):
            raise InvalidImage("the PNG file is corrupt (bad chunk checksum)", param="image")
        if ctype in _PNG_METADATA_CHUNKS:
            dropped = True
        else:
            kept.append(view[pos:end])
        pos = end
        if ctype == b"IEND":
            break
    else:
        raise InvalidImage(f"the PNG file has more than {_MAX_PNG_CHUNKS} chunks", param="image")
    if not dropped:
        return data
    kept.append(view[pos:])
    return b"".join(kept)


def _mp(pixels: int) -> str:
    return f"{pixels / 1e6:.1f} megapixels"


def check_dimensions(width: int, height: int, limits: ImageLimits = DEFAULT_LIMITS) -> None:
    """Side limits from the header: longest side (413), shortest side and aspect ratio (400)."""
    if max(width, height) > limits.max_side:
        raise ImageTooLarge(
            f"image is {width}x{height}; the longest side may be at most {limits.max_side} px", param="image"
        )
    if min(width, height) < max(limits.min_side, 1):
        raise ImageTooSmall(
            f"image is {width}x{height}; each side must be at least {limits.min_side} px", param="image"
        )
    aspect = max(width, height) / min(width, height)
    if aspect > limits.max_aspect:
        raise BadAspectRatio(
            f"image is {width}x{height} (aspect ratio {aspect:.1f}); the limit is {limits.max_aspect:g}",
            param="image",
        )


def check_pixels(width: int, height: int, limits: ImageLimits = DEFAULT_LIMITS) -> None:
    """The pixel cap (413), on the raster that decoding will allocate."""
    if width * height > limits.max_pixels:
        raise ImageTooLarge(
            f"image is {width}x{height} = {_mp(width * height)}; "
            f"the limit is {limits.max_pixels / 1e6:g} megapixels",
            param="image",
        )


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any Pillow mode -> a new RGB image with the intended colours.

    Pillow's own `convert("RGB")` clips 16-bit grey (32768 becomes white) and drops alpha to whatever
    colour the transparent pixels happen to hold, so both get explicit handling.
    """
    mode = img.mode
    if mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        # 16-bit samples -> 8 bit by v >> 8 (65535 -> 255, 32768 -> 128). "I" is how some Pillow versions
        # read 16-bit PNG grey; values outside 0..65535 clip.
        img = img.convert("I").point(lambda v: v * (1 / 256)).convert("L")
        img.info.pop("transparency", None)  # a 16-bit tRNS key means nothing after scaling; ignored
        mode = "L"
    elif mode == "F":
        img = img.convert("L")  # clips to 0..255
        img.info.pop("transparency", None)
        mode = "L"
    has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, background)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return img.convert("RGB")


_warned_truncated_flag = False


def _keep_truncated_images_refused() -> None:
    # Pillow reads this global at load(); True would turn truncated files into silently grey-filled images.
    global _warned_truncated_flag
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        if not _warned_truncated_flag:
            log.warning("PIL.ImageFile.LOAD_TRUNCATED_IMAGES was set to True elsewhere; resetting it to False")
            _warned_truncated_flag = True
        ImageFile.LOAD_TRUNCATED_IMAGES = False


def load_image(data: bytes, limits: ImageLimits = DEFAULT_LIMITS) -> LoadedImage:
    """Decode untrusted bytes into a bounded RGB image, refusing before decode whatever is too big."""
    if len(data) > limits.max_image_bytes:
        raise PayloadTooLarge(
            f"image is {_mib(len(data))}; the limit is {_mib(limits.max_image_bytes)}", param="image"
        )
    fmt = sniff_format(data)
    if fmt not in limits.formats:
        raise UnsupportedMediaType(
            f"image format {fmt} is not enabled; allowed formats: {', '.join(limits.formats)}", param="image"
        )
    if fmt == "PNG":
        data = _check_png_chunks(data)
    _keep_truncated_images_refused()

    # catch_warnings is process-global before Python 3.14: threads decoding at once can restore each
    # other's filters. Harmless here: a lost "error" filter only turns Pillow's bomb check back into a
    # warning, and check_pixels below refuses anything over our cap (< Pillow's) regardless.
    with warnings.catch_warnings():
        # Pillow's metadata noise ("Corrupt EXIF data", ...) is irrelevant; the bomb warning is a refusal.
        warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=[fmt])
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageTooLarge(
                "image dimensions exceed the decoder's safety limit; "
                f"the limit is {limits.max_pixels / 1e6:g} megapixels",
                param="image",
            ) from None
        except Exception:  # UnidentifiedImageError, SyntaxError, ValueError, struct.error, ...
            log.info("image open failed", exc_info=True)
            raise InvalidImage("the image could not be decoded", param="image") from None

        with img:
            width, height = img.size  # from the header; no pixel has been decoded yet
            check_dimensions(width, height, limits)
            try:
                img.seek(0)  # frame 0; n_frames is never touched (it walks the whole file)
                if fmt == "JPEG":
                    # libjpeg scales by 1/2, 1/4 or 1/8 while decoding: an 8000x6000 photo costs 4000x3000.
                    img.draft("RGB", (limits.max_decode_side, limits.max_decode_side))
            except Exception:
                log.info("image seek/draft failed", exc_info=True)
                raise InvalidImage("the image could not be decoded", param="image") from None
            # The cap bounds the raster decoding allocates. A baseline JPEG is decoded at the draft scale
            # with row buffers, so its decoded size counts (this is what admits a 48 MP photo,
            # service/BAD_INPUTS.md row 13). A progressive JPEG keeps every DCT coefficient at full size (~3 bytes/pixel) until
            # the last scan, so like every other format it is capped by its header size.
            baseline_jpeg = fmt == "JPEG" and not img.info.get("progressive")
            check_pixels(*(img.size if baseline_jpeg else (width, height)), limits)
            try:
                img.load()
            except Exception:  # truncated data, broken zlib/huffman streams, bad frame extents, ...
                log.info("image decode failed", exc_info=True)
                raise InvalidImage("the image data is corrupt or truncated", param="image") from None

            decoded_size = img.size
            try:
                ImageOps.exif_transpose(img, in_place=True)
            except Exception:  # corrupt EXIF: shown as stored (Pillow itself ignores invalid values)
                log.info("EXIF orientation ignored", exc_info=True)
            swapped = img.size != decoded_size
            try:
                rgb = to_rgb(img, limits.background)  # a new image: `img` is closed on leaving this block
            except Exception:
                log.info("image mode conversion failed (mode %s)", img.mode, exc_info=True)
                raise InvalidImage("the image colour mode is not supported", param="image") from None

    if max(rgb.size) > limits.max_decode_side:
        rgb.thumbnail((limits.max_decode_side, limits.max_decode_side), Image.Resampling.BICUBIC)
    original_size = (height, width) if swapped else (width, height)
    return LoadedImage(image=rgb, original_size=original_size, format=fmt)


# --- questions and counts ---------------------------------------------------------------------------


def decode_text(raw: bytes, *, param: str = "question") -> str:
    """Strict UTF-8 (multipart fields arrive as bytes); invalid sequences are a 400, never replaced."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("the text is not valid UTF-8", param=param, code="invalid_utf8") from None


def check_question(text: str, limits: ImageLimits = DEFAULT_LIMITS, *, param: str = "question") -> str:
    """The stripped question; 400 for too long, NUL characters, or nothing but whitespace."""
    if len(text) > limits.max_question_chars:  # raw length first: cheap, and bounds the work below
        text = text.strip()
        if len(text) > limits.max_question_chars:
            raise BadRequest(
                f"question is {len(text)} characters; the limit is {limits.max_question_chars}",
                param=param,
                code="question_too_long",
            )
    text = text.strip()
    if "\x00" in text:
        raise BadRequest("the question contains a NUL character", param=param, code="invalid_question")
    if not text:
        raise BadRequest("the question is empty", param=param, code="empty_question")
    return text


def check_counts(limits: ImageLimits = DEFAULT_LIMITS, *, images: int = 0, questions: int = 0) -> None:
    if images > limits.max_images:
        raise TooManyItems(
            f"request has {images} images; the limit is {limits.max_images}", param="images", code="too_many_images"
        )
    if questions > limits.max_questions:
        raise TooManyItems(
            f"request has {questions} questions; the limit is {limits.max_questions}",
            param="questions",
            code="too_many_questions",
        )


# --- remote URLs ------------------------------------------------------------------------------------

MAX_URL_CHARS = 2048
Resolver = Callable[[str], Iterable[str]]


def _system_resolve(host: str) -> list[str]:
    return [info[4][0] for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)]


def _is_public(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(addr, ipaddress.IPv6Address):
        # An IPv4 address tunnelled in IPv6 reaches that IPv4 host: judge the embedded address.
        if addr.ipv4_mapped is not None:
            return _is_public(addr.ipv4_mapped)
        if addr.sixtofour is not None:
            return _is_public(addr.sixtofour)
        if addr.teredo is not None:
            return _is_public(addr.teredo[1])
        if addr in ipaddress.IPv6Network("64:ff9b::/96"):  # NAT64
            return _is_public(ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF))
    return addr.is_global and not (
        addr.is_private
        or addr.is_loopback
        or addr.is_link_local
        or addr.is_multicast
        or addr.is_reserved
        or addr.is_unspecified
    )


def check_url(url: str, allowlist: Iterable[str], *, resolve: Resolver | None = None) -> tuple[str, ...]:
    """Refuse (400 `url_not_allowed`) any URL but http(s) to an allowlisted host whose every address is public.

    With an empty allowlist every remote URL is refused. Allowlist entries are exact host names (no
    wildcards). IP literals in any spelling are refused unless listed verbatim in canonical form and
    public; `resolve(host)` (default: the system resolver) must return only public addresses.
    Returns the vetted addresses: the fetcher should connect to one of them, not resolve the name
    again, or a DNS answer that changes in between (rebinding) bypasses this check.
    """
    allowed = {h.strip().lower().rstrip(".") for h in allowlist if h and h.strip()}
    if not allowed:
        raise UrlNotAllowed("remote image URLs are disabled on this server; send the image bytes instead", param="url")
    if not isinstance(url, str) or len(url) > MAX_URL_CHARS:
        raise UrlNotAllowed(f"the URL is too long; the limit is {MAX_URL_CHARS} characters", param="url")
    if any(c in url for c in "\\\x00") or any(ord(c) <= 32 or ord(c) == 127 for c in url):
        raise UrlNotAllowed("the URL contains characters that are not allowed", param="url")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a non-numeric or out-of-range port
    except ValueError:
        raise UrlNotAllowed("the URL could not be parsed", param="url") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise UrlNotAllowed("only http and https URLs are allowed", param="url")
    if "@" in parts.netloc:  # http://allowed@evil: user info is never needed and only ever used to mislead
        raise UrlNotAllowed("URLs with user information ('user@host') are not allowed", param="url")
    host = (parts.hostname or "").rstrip(".")
    if not host or host not in allowed:
        raise UrlNotAllowed("the URL's host is not on this server's allowlist", param="url")

    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        literal = None
        # 2130706433, 0177.0.0.1, 0x7f.1: resolvers read these as IPv4, `ipaddress` does not; no real
        # host name ends in a numeric label.
        if re.fullmatch(r"0x[0-9a-f]*|[0-9]+", host.rsplit(".", 1)[-1]):
            raise UrlNotAllowed("IP addresses must be written in canonical dotted form", param="url") from None
    if literal is not None:
        candidates: Iterable[str] = [str(literal)]
    else:
        try:
            candidates = list((resolve or _system_resolve)(host))
        except (OSError, UnicodeError, ValueError):
            raise UrlNotAllowed("the URL's host could not be resolved", param="url") from None
    vetted = []
    for text in candidates:
        try:
            addr = ipaddress.ip_address(str(text).split("%", 1)[0])  # drop an IPv6 zone id
        except ValueError:
            raise UrlNotAllowed("the URL's host resolved to an invalid address", param="url") from None
        if not _is_public(addr):
            raise UrlNotAllowed("the URL's host resolves to a private, loopback or reserved address", param="url")
        vetted.append(str(addr))
    if not vetted:
        raise UrlNotAllowed("the URL's host could not be resolved", param="url")
    return tuple(vetted)
