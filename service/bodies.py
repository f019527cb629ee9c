"""Request bodies: JSON or multipart/form-data into a validated model, plus the image it names.

    parsed = await read_body(request, CaptionRequest, limits, list_fields=())
    parsed.model        # the validated pydantic model (422 with a fixed message when invalid)
    parsed.file         # bytes of the uploaded image (multipart part `file` or `image`), or None
    source = image_source(parsed)        # ("file", bytes) | ("image", base64 text) | ("image_id", id)
    loaded = await decode_image(*source, limits, limiter)  # service.images.LoadedImage, in a thread

JSON is validated strictly (`"5"` is not an integer). Multipart is parsed here with python-multipart
rather than by Starlette, so that text fields are decoded as strict UTF-8 (Starlette falls back to
latin-1), the file part is capped at the image limit while it streams, and every parser complaint becomes
one fixed 400 message. Form values are strings, so they are validated in lax mode; a list field repeats
(`questions=a&questions=b`); an empty value counts as absent. Urlencoded forms work too (without a file).

The image may be uploaded as the part `file` or the part `image` (`curl -F image=@photo.jpg` is what people
type); a text field `image` (no filename) is base64 or a data URL, as in JSON.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from urllib.parse import parse_qsl

import anyio
from pydantic import BaseModel, ValidationError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from service.errors import BadRequest, PayloadTooLarge, ServiceError, UnsupportedMediaType, validation_error
from service.images import ImageLimits, LoadedImage, check_counts, decode_base64, decode_text, load_image
from service.memory import LARGE_BYTES, release_free_memory

M = TypeVar("M", bound=BaseModel)

MAX_PARTS = 64  # a task request has a handful of fields; questions/labels repeat up to 16/32 times
MAX_BOUNDARY = 200
MAX_PART_HEADER = 4096  # RFC 2046 says 70; some clients are generous
FILE_FIELD = "file"  # a part of this name is the upload, with or without a filename
UPLOAD_PARTS = (FILE_FIELD, "image")  # parts that may carry the uploaded image (`image` only with a filename)


@dataclass
class Parsed(Generic[M]):
    model: M
    file: bytes | None = None
    file_part: str = FILE_FIELD  # the multipart part the upload came in, for messages


def media_type(request: Request) -> tuple[bytes, dict[bytes, bytes]]:
    try:
        ctype, params = parse_options_header(request.headers.get("content-type", ""))
    except Exception:  # a malformed header is the client's problem, whatever the parser thinks of it
        raise UnsupportedMediaType("the Content-Type header could not be parsed",
                                   code="unsupported_media_type") from None
    return ctype.lower(), params


async def read_json(request: Request, model_cls: type[M]) -> M:
    text = decode_text(await request.body(), param="body")  # strict UTF-8: 400 invalid_utf8, not a JSON error
    try:
        return model_cls.model_validate_json(text, strict=True)
    except ValidationError as exc:
        raise validation_error(list(exc.errors())) from None


async def read_body(
    request: Request, model_cls: type[M], limits: ImageLimits, *, list_fields: tuple[str, ...] = ()
) -> Parsed[M]:
    ctype, params = media_type(request)
    if ctype == b"application/json" or ctype.endswith(b"+json"):
        return Parsed(await read_json(request, model_cls))
    if ctype in (b"multipart/form-data", b"application/x-www-form-urlencoded"):
        if ctype == b"multipart/form-data":
            fields, file, file_part = await read_multipart(request, params, limits)
        else:
            fields, file, file_part = read_urlencoded(await request.body()), None, FILE_FIELD
        data: dict[str, Any] = {}
        for name, value in fields:
            if value == "":
                continue
            if name in list_fields:
                data.setdefault(name, []).append(value)
            elif name in data:
                existing = data[name]
                data[name] = (existing if isinstance(existing, list) else [existing]) + [value]  # -> 422
            else:
                data[name] = value
        try:
            model = model_cls.model_validate(data)
        except ValidationError as exc:
            raise validation_error(list(exc.errors())) from None
        return Parsed(model, file, file_part)
    raise UnsupportedMediaType(
        "the request body must be application/json or multipart/form-data", code="unsupported_media_type"
    )


def read_urlencoded(body: bytes) -> list[tuple[str, str]]:
    """A urlencoded form (no file: `image` or `image_id` name the image), decoded as strict UTF-8."""
    text = decode_text(body, param="body")
    try:
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=False, encoding="utf-8", errors="strict",
                          max_num_fields=MAX_PARTS)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("the form body is malformed", param="body", code="invalid_form") from None
    return pairs


@dataclass
class _Part:
    disposition: bytes = b""
    name: str | None = None
    is_file: bool = False
    data: bytearray | None = None


async def read_multipart(
    request: Request, params: dict[bytes, bytes], limits: ImageLimits
) -> tuple[list[tuple[str, str]], bytes | None, str]:
    """(text fields in order, bytes of the uploaded image, the part it came in).

    The upload is the part `file`, or a part `image` with a filename; a file in any other part, or two
    uploads, is a 400 that says so.
    """
    boundary = params.get(b"boundary")
    if not boundary or len(boundary) > MAX_BOUNDARY:
        raise BadRequest("the multipart body has no usable boundary", param="body", code="invalid_multipart")

    parts: list[_Part] = []
    header_name = bytearray()
    header_value = bytearray()
    ended = False
    files = 0

    def on_part_begin() -> None:
        if len(parts) >= MAX_PARTS:
            raise BadRequest(f"the multipart body has more than {MAX_PARTS} parts", param="body",
                             code="too_many_parts")
        parts.append(_Part(data=bytearray()))

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header_name.extend(data[start:end])
        _check_header(header_name)

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header_value.extend(data[start:end])
        _check_header(header_value)

    def on_header_end() -> None:
        if bytes(header_name).lower() == b"content-disposition":
            parts[-1].disposition = bytes(header_value)
        header_name.clear()
        header_value.clear()

    def on_headers_finished() -> None:
        nonlocal files
        part = parts[-1]
        _, options = parse_options_header(part.disposition)
        if b"name" not in options:
            raise BadRequest("a multipart part has no name", param="body", code="invalid_multipart")
        part.name = decode_text(options[b"name"], param="body")
        part.is_file = part.name == FILE_FIELD or b"filename" in options
        if part.is_file:
            files += 1
            check_counts(limits, images=files)

    def on_part_data(data: bytes, start: int, end: int) -> None:
        part = parts[-1]
        part.data.extend(data[start:end])
        if part.is_file and len(part.data) > limits.max_image_bytes:
            raise PayloadTooLarge(
                f"the uploaded image is over {limits.max_image_bytes / 2**20:.1f} MiB, the limit",
                param=_param(part.name),
            )

    def on_end() -> None:
        nonlocal ended
        ended = True

    callbacks = dict(
        on_part_begin=on_part_begin, on_header_field=on_header_field, on_header_value=on_header_value,
        on_header_end=on_header_end, on_headers_finished=on_headers_finished, on_part_data=on_part_data,
        on_end=on_end,
    )
    try:
        parser = MultipartParser(boundary, callbacks)
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except (ServiceError, ClientDisconnect):
        raise
    except Exception:  # python-multipart's parse errors and anything it trips over in hostile input
        raise BadRequest("the multipart body is malformed", param="body", code="invalid_multipart") from None
    if not ended:
        raise BadRequest("the multipart body ended before its closing boundary", param="body",
                         code="invalid_multipart")

    fields: list[tuple[str, str]] = []
    file: bytes | None = None
    file_part = FILE_FIELD
    for part in parts:
        if part.name is None:
            continue
        if part.is_file:
            if part.name not in UPLOAD_PARTS:  # e.g. curl -F photo=@photo.jpg: say where the file goes
                raise BadRequest(f"a file was uploaded as the multipart part {part.name!r}; upload the image as "
                                 "the part 'file' or 'image'", param=part.name, code="invalid_multipart")
            if file is not None:
                raise BadRequest(f"send exactly one image per request; this request uploads one as the part "
                                 f"'{file_part}' and another as '{part.name}'", param=part.name,
                                 code="multiple_image_sources")
            file, file_part = bytes(part.data), part.name
        else:
            fields.append((part.name, decode_text(bytes(part.data), param=_param(part.name))))
    return fields, file, file_part


def _check_header(buf: bytearray) -> None:
    if len(buf) > MAX_PART_HEADER:
        raise BadRequest("a multipart part header is too long", param="body", code="invalid_multipart")


def _param(name: str) -> str:
    """A field name safe to return in `param` (it is client text): known-looking names only."""
    return name if name.isidentifier() and len(name) <= 64 else "body"


def image_source(parsed: Parsed) -> tuple[str, Any]:
    model = parsed.model
    given = [(kind, value, name) for kind, value, name in (
        ("file", parsed.file, f"the upload '{parsed.file_part}'"),
        ("image", getattr(model, "image", None), "the field 'image'"),
        ("image_id", getattr(model, "image_id", None), "the field 'image_id'"),
    ) if value is not None]
    if not given:
        raise BadRequest(
            "no image: upload one as the multipart part 'file' or 'image', or send 'image' (base64 or data URL) "
            "or 'image_id'", param="image", code="missing_image",
        )
    if len(given) > 1:
        names = " and ".join(name for _, _, name in given)
        raise BadRequest(f"send exactly one image source; this request has {names}", param="image",
                         code="multiple_image_sources")
    kind, value, _ = given[0]
    return kind, value


def _decode(kind: str, value: Any, limits: ImageLimits) -> LoadedImage:
    large = len(value) > LARGE_BYTES
    try:
        raw = decode_base64(value, limits) if kind == "image" else value
        loaded = load_image(raw, limits)
        width, height = loaded.original_size
        large = large or width * height * 3 > LARGE_BYTES
        return loaded
    finally:
        if large:
            release_free_memory()  # the full-size raster is gone: give its pages back (see service.memory)


async def decode_image(kind: str, value: Any, limits: ImageLimits, limiter: anyio.CapacityLimiter) -> LoadedImage:
    """base64 decoding and `load_image` off the event loop, at most `limiter.total_tokens` at a time."""
    return await anyio.to_thread.run_sync(_decode, kind, value, limits, limiter=limiter)
