"""service/BAD_INPUTS.md, every row through the HTTP endpoints (the intake itself is unit-tested in tests/test_images.py).

Each case checks the status and the error envelope (fixed message, no exception text, paths, addresses or
echo), then that the server is still ready and the next good request answers 200. In-process cases use
FastAPI's TestClient; rows 1 (streaming), 2, 3, 21 (raw paths) and 22, and the memory checks, use the real
`qbridge serve` process of `live_server`.
    .venv/bin/python -m pytest tests/service/test_service_bad_inputs.py -q
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import http.server
import json
import math
import re
import select
import socket
import struct
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from conftest import API_KEY, AUTH, StubBackend, assert_envelope, encode, make_app
from tests.test_images import METADATA_BOMBS, REFUSED, png_1bit, png_raw

MiB = 1024 * 1024


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def client(bundle):
    with TestClient(make_app(bundle, max_body_bytes=4 * MiB, max_image_bytes=3 * MiB)) as c:
        yield c


@pytest.fixture(scope="module")
def good(png):
    return {"image": b64(png), "max_new_tokens": 2}


def still_healthy(client, good) -> None:
    assert client.get("/health/ready").status_code == 200
    assert client.post("/v1/caption", json=good).status_code == 200


# --- row 1: body over the limit --------------------------------------------------------------------


def test_row01_body_over_limit_json_and_multipart(client, good):
    big = b64(b"\x00" * (4 * MiB))  # 5.3 MiB of base64 > the 4 MiB body limit of this app
    assert_envelope(client.post("/v1/caption", json={"image": big}), 413, "payload_too_large")
    assert_envelope(client.post("/v1/caption", files={"file": ("x.png", b"\x89PNG" + b"\x00" * (5 * MiB))}), 413,
                    "payload_too_large")
    # under the body limit but over the image limit (3 MiB): 413 too, from the part's size while it streams
    assert_envelope(client.post("/v1/caption", files={"file": ("x.png", b"\x89PNG" + b"\x00" * (3 * MiB + 10))}),
                    413, "payload_too_large")
    # chunked (no Content-Length): counted as it streams
    chunks = (b'{"image": "' + b"A" * MiB for _ in range(6))
    resp = client.post("/v1/caption", content=chunks, headers={"Content-Type": "application/json"})
    assert_envelope(resp, 413, "payload_too_large")
    still_healthy(client, good)


def _read_response(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """The status line, headers and body read off a raw socket; b"" if the server reset the connection."""
    sock.settimeout(timeout)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            part = sock.recv(65536)
            if not part:
                break
            data += part
        head, _, rest = data.partition(b"\r\n\r\n")
        length = re.search(rb"content-length: (\d+)", head, re.I)
        if length:
            while len(rest) < int(length.group(1)):
                part = sock.recv(65536)
                if not part:
                    break
                rest += part
    except ConnectionResetError:
        return data
    return data if not data else head + b"\r\n\r\n" + rest


def _status(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


def test_row01_real_server_rejects_while_streaming(live_server):
    host, port = "127.0.0.1", live_server.port
    rss = live_server.rss_mb()
    # Content-Length over the limit: 413 before a single body byte is sent.
    with socket.create_connection((host, port)) as s:
        s.sendall(b"POST /v1/caption HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + API_KEY.encode()
                  + b"\r\nContent-Type: application/json\r\nContent-Length: 104857600\r\n\r\n")
        raw = _read_response(s)
        assert _status(raw) == 413 and b"payload_too_large" in raw
    # Chunked, no Content-Length: the answer arrives while we are still sending.
    preambles = {b"application/json": b'{"image": "',
                 b"multipart/form-data; boundary=XyZ": b'--XyZ\r\nContent-Disposition: form-data; name="file"; '
                                                       b'filename="x"\r\n\r\n'}
    for ctype, preamble in preambles.items():
        with socket.create_connection((host, port)) as s:
            s.sendall(b"POST /v1/vqa HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + API_KEY.encode()
                      + b"\r\nContent-Type: " + ctype + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
                      + b"%x\r\n%s\r\n" % (len(preamble), preamble))
            chunk = b"%x\r\n%s\r\n" % (MiB // 4, b"a" * (MiB // 4))
            sent = 0
            answered = False
            try:
                for _ in range(256):  # up to 64 MiB
                    if select.select([s], [], [], 0)[0]:
                        answered = True
                        break
                    s.sendall(chunk)
                    sent += MiB // 4
            except (BrokenPipeError, ConnectionResetError):
                answered = True
            # Answered long before the upload would end (it never does: no final chunk). The slack over the
            # 16 MiB limit is what the two sockets' kernel buffers absorb on loopback.
            assert answered and sent <= 32 * MiB, sent
            raw = _read_response(s)
            # The 413 normally arrives; a reset racing it (we were still sending) also means "refused early".
            assert raw == b"" or _status(raw) == 413, raw[:200]
    assert live_server.rss_mb() - rss < 50
    assert httpx.get(live_server.url + "/health/ready").status_code == 200


# --- row 2: a 1 MB header --------------------------------------------------------------------------


def test_row02_one_megabyte_header_gets_431(live_server, http, png):
    rss = live_server.rss_mb()
    with socket.create_connection(("127.0.0.1", live_server.port)) as s:
        try:
            s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Junk: " + b"a" * MiB + b"\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed on us: allowed
        try:
            raw = _read_response(s)
        except (ConnectionResetError, socket.timeout):
            raw = b""
    assert raw == b"" or _status(raw) == 431, raw[:200]
    assert live_server.rss_mb() - rss < 50
    assert live_server.alive()
    assert http.get("/health/ready").status_code == 200
    assert http.post("/v1/caption", files={"file": ("x.png", png)}, data={"max_new_tokens": "2"}).status_code == 200


# --- row 3: malformed multipart --------------------------------------------------------------------


MALFORMED_MULTIPART = {
    "boundary_mismatch": ("multipart/form-data; boundary=AAA", b"--BBB\r\nContent-Disposition: form-data; "
                          b'name="file"; filename="x"\r\n\r\nabc\r\n--BBB--\r\n'),
    "no_boundary": ("multipart/form-data", b"--X\r\n\r\n"),
    "empty_boundary": ("multipart/form-data; boundary=", b"----\r\n"),
    "quoted_garbage": ('multipart/form-data; boundary="a;b=c"; boundary=d; charset=evil', b"--d\r\n\r\n--d--"),
    "long_boundary": ("multipart/form-data; boundary=" + "b" * 5000, b"--" + b"b" * 5000 + b"\r\n"),
    "rfc2231_boundary": ("multipart/form-data; boundary*=utf-8''%E2%9C%93", b"--\xe2\x9c\x93\r\n"),
    "crlf_flood": ("multipart/form-data; boundary=XyZ", b"\r\n" * (3 * MiB // 2) + b"--XyZ\r\nContent-Disposition: "
                   b'form-data; name="question"\r\n\r\nhi\r\n--XyZ--\r\n'),
    "no_name": ("multipart/form-data; boundary=XyZ",
                b"--XyZ\r\nContent-Disposition: form-data\r\n\r\nv\r\n--XyZ--\r\n"),
    "truncated": ("multipart/form-data; boundary=XyZ", b'--XyZ\r\nContent-Disposition: form-data; name="file"; '
                  b'filename="a"\r\n\r\n\x89PNG'),
    "huge_part_header": ("multipart/form-data; boundary=XyZ", b"--XyZ\r\nX-Pad: " + b"p" * 100_000 + b"\r\n\r\nv\r\n"),
    "many_parts": ("multipart/form-data; boundary=XyZ", b"".join(
        b'--XyZ\r\nContent-Disposition: form-data; name="q%d"\r\n\r\nv\r\n' % i for i in range(500)) + b"--XyZ--\r\n"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED_MULTIPART))
def test_row03_malformed_multipart_in_process(client, good, name):
    ctype, body = MALFORMED_MULTIPART[name]
    t0 = time.perf_counter()
    resp = client.post("/v1/vqa", content=body, headers={"Content-Type": ctype})
    assert time.perf_counter() - t0 < 1.0
    assert resp.status_code == 400, (name, resp.text)
    assert_envelope(resp, 400)
    still_healthy(client, good)


def test_row03_real_server_stays_live_while_parsing(live_server):
    """Megabytes of CRLF and odd boundaries: 400 in under 1 s while /health/live keeps answering fast."""

    async def main():
        async with httpx.AsyncClient(base_url=live_server.url, headers=AUTH, timeout=10) as client:
            live_times: list[float] = []
            stop = asyncio.Event()

            async def poll_live():
                while not stop.is_set():
                    t = time.perf_counter()
                    assert (await client.get("/health/live")).status_code == 200
                    live_times.append(time.perf_counter() - t)
                    await asyncio.sleep(0.01)

            poller = asyncio.create_task(poll_live())
            for name in ("crlf_flood", "boundary_mismatch", "long_boundary", "quoted_garbage", "many_parts",
                         "truncated"):
                ctype, body = MALFORMED_MULTIPART[name]
                t = time.perf_counter()
                resp = await client.post("/v1/vqa", content=body, headers={"Content-Type": ctype})
                assert time.perf_counter() - t < 1.0, name
                assert_envelope(resp, 400)
            stop.set()
            await poller
            assert live_times and max(live_times) < 0.5, max(live_times)

    asyncio.run(main())
    assert httpx.get(live_server.url + "/health/ready").status_code == 200


# --- row 4: too many images or questions -----------------------------------------------------------


def test_row04_too_many_images_or_questions(client, good, png):
    files = [("file", (f"{i}.png", png)) for i in range(5)]
    err = assert_envelope(client.post("/v1/caption", files=files), 400, "too_many_images")
    assert "5" in err["message"] and "4" in err["message"]
    assert_envelope(client.post("/v1/caption", files=files[:2]), 400, "multiple_image_sources")
    err = assert_envelope(client.post("/v1/vqa", json={**good, "questions": ["q?"] * 17}), 400, "too_many_questions")
    assert "17" in err["message"] and "16" in err["message"]
    parts = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(png)}}] * 5
    err = assert_envelope(client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": parts}]}),
                          400, "too_many_images")
    still_healthy(client, good)


# --- row 5: question text ----------------------------------------------------------------------------


def test_row05_question_text(client, good, png):
    err = assert_envelope(client.post("/v1/vqa", json={**good, "question": "why " * 600}), 400, "question_too_long")
    assert "2000" in err["message"]
    assert_envelope(client.post("/v1/vqa", json={**good, "question": "a\x00b"}), 400, "invalid_question")
    assert_envelope(client.post("/v1/vqa", json={**good, "questions": ["ok?", " \t\n "]}), 400, "empty_question")
    assert_envelope(client.post("/v1/vqa", json={**good, "question": ""}), 400)
    body = b'--XyZ\r\nContent-Disposition: form-data; name="question"\r\n\r\nwhat \xff\xfe?\r\n--XyZ\r\n' \
           b'Content-Disposition: form-data; name="file"; filename="x.png"\r\n\r\n' + png + b"\r\n--XyZ--\r\n"
    assert_envelope(client.post("/v1/vqa", content=body, headers={"Content-Type": "multipart/form-data; boundary=XyZ"}),
                    400, "invalid_utf8")
    raw = json.dumps({**good, "question": "what?"}).encode().replace(b"what?", b"wh\xc3\x28t?")
    assert_envelope(client.post("/v1/vqa", content=raw, headers={"Content-Type": "application/json"}), 400,
                    "invalid_utf8")
    chat = {"messages": [{"role": "user", "content": [{"type": "text", "text": "colour\x00?"}, {
        "type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(png)}}]}]}
    assert_envelope(client.post("/v1/chat/completions", json=chat), 400, "invalid_question")
    still_healthy(client, good)


# --- row 6: missing / double image, unknown fields, wrong Content-Type --------------------------------


def test_row06_image_sources_fields_and_content_type(client, good, png):
    assert_envelope(client.post("/v1/caption", json={"max_new_tokens": 3}), 400, "missing_image")
    assert_envelope(client.post("/v1/caption", files={"file": ("x.png", png)}, data={"image": b64(png)}), 400,
                    "multiple_image_sources")
    assert_envelope(client.post("/v1/caption", json={**good, "image_id": "img_abcdefghijkl"}), 400,
                    "multiple_image_sources")
    secret = "zz_unknown_field_name_42"
    err = assert_envelope(client.post("/v1/caption", json={**good, secret: 1}), 422, "validation_error", sent=secret)
    assert secret not in err["message"]
    resp = client.post("/v1/caption", files={"file": ("x.png", png)}, data={secret: "v"})
    assert_envelope(resp, 422, sent=secret)
    assert_envelope(client.post("/v1/caption", content=b"hello", headers={"Content-Type": "text/plain"}), 415,
                    "unsupported_media_type")
    assert_envelope(client.post("/v1/caption", content=b"hello"), 415)
    assert_envelope(client.post("/v1/chat/completions", files={"file": ("x.png", png)}), 415)
    assert_envelope(client.post("/v1/caption", content=b"{not json", headers={"Content-Type": "application/json"}),
                    422, "validation_error")
    assert_envelope(client.post("/v1/caption", json=[1, 2]), 422)
    assert_envelope(client.post("/v1/caption", json={**good, "image_id": "../../etc/passwd"}), 422)
    assert_envelope(client.get("/v1/images/not-an-id"), 422)
    assert_envelope(client.put("/v1/caption", json=good), 405)
    assert_envelope(client.get("/v1/nothing-here"), 404)
    still_healthy(client, good)


# --- row 7: bad base64 -------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "!!!!not*base64###", "iVBORw0KGgo", "iVBORw0KGgo===", "aGVsbG8=!!!", "iVBO Rw0K", "-_-_",
    "data:text/plain;base64,aGVsbG8=", "data:image/png,rawtext", "data:image/svg+xml;base64,PHN2Zz4=",
])
def test_row07_bad_base64_is_400(client, good, text):
    assert_envelope(client.post("/v1/caption", json={"image": text}), 400, "invalid_base64", sent=text)
    still_healthy(client, good)


def test_row07_huge_base64(client, good):
    # decoded size over the image limit (3 MiB here) but the body under its limit: 413 without decoding
    assert_envelope(client.post("/v1/caption", json={"image": "A" * (3 * MiB * 4 // 3 + 400)}), 413,
                    "payload_too_large")
    # a 40 MB string: over the body limit, refused while streaming
    assert_envelope(client.post("/v1/caption", json={"image": "A" * 40_000_000}), 413, "payload_too_large")
    still_healthy(client, good)


# --- row 8: empty file, random bytes -----------------------------------------------------------------


def test_row08_empty_and_random_bytes(client, good):
    import os

    junk = os.urandom(2048)
    assert_envelope(client.post("/v1/caption", files={"file": ("x.png", b"")}), 400, "invalid_image")
    assert_envelope(client.post("/v1/caption", files={"file": ("x.png", junk)}), 400, "invalid_image")
    assert_envelope(client.post("/v1/caption", json={"image": b64(junk)}), 400, "invalid_image")
    still_healthy(client, good)


# --- row 9: refused formats, by magic bytes ------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_row09_refused_formats_are_415_whatever_the_name(client, good, monkeypatch, name):
    monkeypatch.setattr(Image, "open", lambda *a, **k: pytest.fail("a refused format reached Image.open"))
    data = REFUSED[name]
    assert_envelope(client.post("/v1/caption", files={"file": ("x.png", data, "image/png")}), 415,
                    "unsupported_image_format")
    assert_envelope(client.post("/v1/detect", json={"image": "data:image/png;base64," + b64(data)}), 415,
                    "unsupported_image_format")
    monkeypatch.undo()
    still_healthy(client, good)


# --- row 10: truncated files, bad CRC ----------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_row10_truncated_is_400(client, good, fmt, fraction):
    noise = Image.merge("RGB", [Image.effect_noise((64, 64), 80 + 10 * i) for i in range(3)])
    data = encode(noise, fmt)
    assert_envelope(client.post("/v1/caption", files={"file": ("x", data[: int(len(data) * fraction)])}), 400,
                    "invalid_image")
    still_healthy(client, good)


def test_row10_png_bad_crc_is_400(client, good, png):
    broken = bytearray(png)
    broken[-5] ^= 0xFF  # IEND's CRC
    idat = png.index(b"IDAT")
    bad_idat = bytearray(png)
    bad_idat[idat + 6] ^= 0xFF  # a byte of IDAT data: its CRC no longer matches
    for data in (bytes(broken), bytes(bad_idat)):
        assert_envelope(client.post("/v1/caption", files={"file": ("x.png", data)}), 400, "invalid_image")
    still_healthy(client, good)


# --- rows 11-13: bombs and a large legal photo ----------------------------------------------------------


def test_row11_row12_pixel_bombs_are_413_quickly(client, good):
    for side in (30000, 12000):
        data = png_1bit(side, side)
        t0 = time.perf_counter()
        err = assert_envelope(client.post("/v1/caption", files={"file": ("bomb.png", data)}), 413, "image_too_large")
        assert time.perf_counter() - t0 < 0.5
        assert "40" in err["message"]  # names the limit (megapixels)
    still_healthy(client, good)


@pytest.fixture(scope="module")
def large_jpeg() -> bytes:
    img = Image.new("RGB", (8000, 6000), (10, 200, 30))
    img.paste((200, 20, 20), (0, 0, 4000, 3000))
    return encode(img, "JPEG", quality=80)


def test_rows11_to_13_on_the_real_server_keep_memory_flat(live_server, http, large_jpeg):
    rss = live_server.rss_mb()
    for side in (30000, 12000):
        resp = http.post("/v1/caption", files={"file": ("bomb.png", png_1bit(side, side))})
        assert_envelope(resp, 413, "image_too_large")
    assert live_server.rss_mb() - rss < 50  # nothing was decoded
    # The first large photo sizes the decode threads' malloc arenas (a one-off high-water mark); after it,
    # further large photos must not grow the process.
    resp = http.post("/v1/detect", files={"file": ("big.jpg", large_jpeg)}, data={"max_new_tokens": "4"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["image"] == {"width": 8000, "height": 6000}  # boxes are scaled to the original
    rss = live_server.rss_mb()
    for _ in range(4):
        resp = http.post("/v1/detect", files={"file": ("big.jpg", large_jpeg)}, data={"max_new_tokens": "4"})
        assert resp.status_code == 200
    assert live_server.rss_mb() - rss < 50


def test_row13_large_legal_photo_is_200(client, good, large_jpeg):
    t0 = time.perf_counter()
    resp = client.post("/v1/caption", files={"file": ("big.jpg", large_jpeg)}, data={"max_new_tokens": "2"})
    assert resp.status_code == 200 and time.perf_counter() - t0 < 3


# --- row 14: degenerate geometry ---------------------------------------------------------------------


@pytest.mark.parametrize("size, code", [((1, 1), "image_too_small"), ((1, 300), "image_too_small"),
                                        ((2, 10000), "image_too_small"), ((8, 1000), "bad_aspect_ratio"),
                                        ((1000, 10), "bad_aspect_ratio")])
def test_row14_degenerate_geometry_is_400(client, good, size, code):
    data = encode(Image.new("L", size, 128), "PNG")
    err = assert_envelope(client.post("/v1/caption", files={"file": ("x.png", data)}), 400, code)
    assert f"{size[0]}x{size[1]}" in err["message"]
    still_healthy(client, good)


# --- row 15: animations --------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt, n", [("GIF", 2000), ("PNG", 300), ("WEBP", 300)])
def test_row15_animation_uses_frame_zero(bundle, fmt, n):
    frames = [Image.new("RGB", (16, 16), (i % 256, (i * 7) % 256, 255 - i % 256)) for i in range(n)]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=20, loop=0)
    seen = []
    with TestClient(make_app(bundle, StubBackend())) as client:
        engine = client.app.state.qbridge.engine
        original = engine._encode_sync
        engine._encode_sync = lambda images: (seen.extend(im.copy() for im in images), original(images))[1]
        t0 = time.perf_counter()
        resp = client.post("/v1/caption", files={"file": ("anim", data)})
        assert resp.status_code == 200 and time.perf_counter() - t0 < 2
        assert seen[0].getpixel((8, 8))[2] > 240  # frame 0 is blue (255 - 0)


# --- row 16: metadata bombs ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(METADATA_BOMBS))
def test_row16_metadata_bombs(client, good, name):
    data = METADATA_BOMBS[name]()
    if len(data) > 3 * MiB:  # this app's image limit is 3 MiB: 413 is the honest answer there
        assert_envelope(client.post("/v1/caption", files={"file": ("m", data)}), 413)
    else:
        resp = client.post("/v1/caption", files={"file": ("m", data)}, data={"max_new_tokens": "2"})
        assert resp.status_code in (200, 400), resp.text
    still_healthy(client, good)


def test_row16_metadata_bombs_real_server(live_server, http):
    rss = live_server.rss_mb()
    for name in ("icc_10mb_jpeg", "icc_10mb_png", "ztxt_8mib", "exif_looping_ifd"):
        resp = http.post("/v1/caption", files={"file": ("m", METADATA_BOMBS[name]())}, data={"max_new_tokens": "2"})
        assert resp.status_code == 200, (name, resp.text)
    assert live_server.rss_mb() - rss < 50


# --- row 17: the mode zoo, with the colours the model sees ---------------------------------------------


def _spy(client) -> list[Image.Image]:
    seen: list[Image.Image] = []
    engine = client.app.state.qbridge.engine
    original = engine._encode_sync

    def spy(images):
        seen.extend(im.copy() for im in images)
        return original(images)

    engine._encode_sync = spy
    return seen


def _modes() -> dict[str, tuple[bytes, tuple[int, int, int]]]:
    grey16 = struct.pack(">" + "H" * 16, *([32768] * 16))
    rgb16 = struct.pack(">" + "H" * 48, *([65535, 32768, 0] * 16))
    palette = Image.new("P", (16, 16), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.info["transparency"] = 1  # the red index is fully transparent
    return {
        "cmyk_jpeg": (encode(Image.new("CMYK", (16, 16), (0, 0, 0, 0)), "JPEG"), (255, 255, 255)),
        "grey16_png": (png_raw(16, 16, 16, 0, [grey16] * 16), (128, 128, 128)),
        "rgb16_png": (png_raw(16, 16, 16, 2, [rgb16] * 16), (255, 128, 0)),
        "palette_transparency": (encode(palette, "PNG", transparency=1), (255, 255, 255)),
        "la": (encode(Image.new("LA", (16, 16), (0, 0)), "PNG"), (255, 255, 255)),
        "rgba": (encode(Image.new("RGBA", (16, 16), (0, 0, 255, 255)), "PNG"), (0, 0, 255)),
        "one_bit": (encode(Image.new("1", (16, 16), 1), "PNG"), (255, 255, 255)),
        "grey_bmp": (encode(Image.new("L", (16, 16), 77), "BMP"), (77, 77, 77)),
    }


MODES = _modes()


@pytest.mark.parametrize("name", sorted(MODES))
def test_row17_mode_zoo_is_200_with_correct_colours(bundle, name):
    data, colour = MODES[name]
    with TestClient(make_app(bundle, StubBackend())) as client:
        seen = _spy(client)
        resp = client.post("/v1/caption", files={"file": ("x", data)})
        assert resp.status_code == 200, resp.text
        pixel = seen[0].getpixel((8, 8))
        assert seen[0].mode == "RGB" and all(abs(a - b) <= 3 for a, b in zip(pixel, colour)), (pixel, colour)


# --- row 18: EXIF orientation ------------------------------------------------------------------------


def _oriented(value) -> bytes:
    img = Image.new("RGB", (60, 40), (0, 0, 0))
    img.paste((255, 0, 0), (0, 0, 30, 20))  # red top-left quadrant as stored
    exif = Image.Exif()
    exif[0x0112] = value
    return encode(img, "JPEG", exif=exif, quality=95)


def test_row18_exif_orientation_gives_boxes_in_the_displayed_frame(bundle):
    seq = "thing<loc_0><loc_0><loc_16><loc_16>"
    with TestClient(make_app(bundle, StubBackend(lambda p: seq))) as client:
        for value in range(1, 9):
            out = client.post("/v1/detect", files={"file": ("x.jpg", _oriented(value))}).json()
            w, h = (40, 60) if value >= 5 else (60, 40)
            assert out["image"] == {"width": w, "height": h}, value
            box = out["detections"][0]["box"]
            assert box == pytest.approx([0.5 / 32 * w, 0.5 / 32 * h, 16.5 / 32 * w, 16.5 / 32 * h], abs=0.01)
        for bad in (99, 0):
            assert client.post("/v1/detect", files={"file": ("x.jpg", _oriented(bad))}).json()["image"] == {
                "width": 60, "height": 40}
        corrupt = METADATA_BOMBS["exif_corrupt"]()
        assert client.post("/v1/detect", files={"file": ("x.jpg", corrupt)}).status_code == 200


# --- row 19: numeric abuse -------------------------------------------------------------------------------

NUMERIC = {
    "max_new_tokens": [-1, 0, 257, 1e9, math.nan, "abc", "5", True, 2.5],
    "num_beams": [-1, 0, 9, 1e9, math.nan, "x"],
    "temperature": [-1, 0, 2.5, 1e9, math.nan, math.inf, "hot"],
    "top_p": [-1, 0, 1.5, 1e9, math.nan, "x"],
    "max_objects": [-1, 0, 101, 1e9, math.nan, "x"],
    "score_threshold": [-1, 1.5, 1e9, math.nan, "x"],
    "seed": [-1, 2**40, "x"],
    "strategy": ["fast", 1],
}


@pytest.mark.parametrize("field", sorted(NUMERIC))
def test_row19_numeric_abuse_is_422(client, good, field):
    path = "/v1/detect" if field in ("max_objects", "score_threshold") else "/v1/caption"
    for value in NUMERIC[field]:
        body = json.dumps({**good, field: value}, allow_nan=True)
        resp = client.post(path, content=body, headers={"Content-Type": "application/json"})
        err = assert_envelope(resp, 422, "validation_error")
        assert err["param"] == f"body.{field}" or err["param"] == field, err
        if not isinstance(value, bool) and value != "5":  # a form sends text: "5" is a fine number there
            form = client.post(path, files={"file": ("x.png", base64.b64decode(good["image"]))},
                               data={field: str(value)})
            assert_envelope(form, 422)
    assert_envelope(client.post("/v1/chat/completions", json={"messages": [], "max_tokens": 10}), 422)
    for bad in ({"max_tokens": 0}, {"max_tokens": 1e9}, {"temperature": 3}, {"n": 5}, {"top_p": 0}):
        msg = [{"role": "user", "content": "x"}]
        assert_envelope(client.post("/v1/chat/completions", json={"messages": msg, **bad}), 422)
    still_healthy(client, good)


# --- row 20: remote image URLs -------------------------------------------------------------------------


class _Listener:
    """A local HTTP server that records connections: refused URLs must never reach it."""

    def __init__(self, handler_body: bytes = b"", redirect_to: str | None = None):
        hits = self.hits = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                hits.append(self.path)
                if redirect_to:
                    self.send_response(302)
                    self.send_header("Location", redirect_to)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(handler_body)))
                self.end_headers()
                self.wfile.write(handler_body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _chat_with_url(url: str) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}],
            "max_tokens": 2}


def test_row20_remote_urls_refused_by_default(client, good):
    listener = _Listener()
    try:
        for url in (f"http://127.0.0.1:{listener.port}/x.png", "https://example.com/cat.png", "file:///etc/passwd",
                    "ftp://example.com/x.png"):
            assert_envelope(client.post("/v1/chat/completions", json=_chat_with_url(url)), 400, "url_not_allowed",
                            sent=url)
        assert listener.hits == []
    finally:
        listener.close()
    still_healthy(client, good)


def test_row20_allowlisted_urls_are_guarded(bundle, png, monkeypatch):
    import service.images
    import service.remote

    listener = _Listener(png)
    redirector = _Listener(redirect_to=f"http://127.0.0.1:{listener.port}/x.png")
    allow = ("localhost", "127.0.0.1", "169.254.169.254", "10.0.0.1", "192.168.1.1", "2130706433", "0177.0.0.1",
             "internal.example", "public.example", "redirect.example")
    try:
        with TestClient(make_app(bundle, StubBackend(), url_allowlist=allow)) as client:
            internal = {"internal.example": ["10.1.2.3"]}
            monkeypatch.setattr(service.images, "_system_resolve", lambda host: internal.get(host, ["127.0.0.1"]))
            for url in (f"http://127.0.0.1:{listener.port}/x.png", f"http://localhost:{listener.port}/x.png",
                        "http://169.254.169.254/latest/meta-data", "http://10.0.0.1/x", "http://192.168.1.1/x",
                        "http://2130706433/x", "http://0177.0.0.1/x", "http://internal.example/x",
                        f"http://[::1]:{listener.port}/x", "file:///etc/passwd", "gopher://localhost/x",
                        f"http://user@localhost:{listener.port}/x", "http://not-allowed.example/x"):
                assert_envelope(client.post("/v1/chat/completions", json=_chat_with_url(url)), 400, "url_not_allowed")
            assert listener.hits == []  # no outbound connection to private space
            # A public host (its DNS answer made to point at the test listener) is fetched, and only its
            # vetted address is contacted; a redirect is refused, not followed.
            real_check = service.images.check_url

            def vetted(url, allowlist, resolve=None):
                real_check(url, allowlist, resolve=lambda host: ["93.184.216.34"])  # public: passes the guard
                return ("127.0.0.1",)

            monkeypatch.setattr(service.remote, "check_url", vetted)
            public = f"http://public.example:{listener.port}/x.png"
            ok = client.post("/v1/chat/completions", json=_chat_with_url(public))
            assert ok.status_code == 200, ok.text
            assert listener.hits == ["/x.png"]
            redirected = client.post("/v1/chat/completions",
                                     json=_chat_with_url(f"http://redirect.example:{redirector.port}/go"))
            assert_envelope(redirected, 400, "url_not_allowed")
            assert listener.hits == ["/x.png"]  # the redirect target was not fetched
    finally:
        listener.close()
        redirector.close()


# --- row 21: auth ------------------------------------------------------------------------------------


def _all_routes(app) -> list[tuple[str, str]]:
    out = []
    for route in app.routes:
        for method in sorted(getattr(route, "methods", None) or ["GET"]):
            if method == "HEAD":
                continue
            out.append((method, route.path.replace("{image_id}", "img_abcdefghijkl")))
    return out


def test_row21_auth_default_deny(bundle, png, monkeypatch):
    import service.middleware

    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(service.middleware.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    app = make_app(bundle, StubBackend(), api_keys=("k-one", "k-two"))
    with TestClient(app) as client:
        routes = _all_routes(app)
        assert ("POST", "/v1/caption") in routes and ("GET", "/") in routes and ("GET", "/metrics") in routes
        bad_headers = [{}, {"Authorization": ""}, {"Authorization": "Bearer "}, {"Authorization": "Bearer wrong"},
                       {"Authorization": "Bearer K-ONE"}, {"Authorization": "Basic azpvbmU="},
                       {"Authorization": "k-one"}, {"Authorization": "Bearer k-one k-one"}]
        for method, path in routes:
            public = path in ("/health/live", "/health/ready")
            for headers in bad_headers:
                resp = client.request(method, path + "?api_key=k-one&key=k-one", headers=headers)
                if public:
                    assert resp.status_code == 200, (path, resp.status_code)
                else:
                    assert_envelope(resp, 401, "invalid_api_key")
                    assert resp.headers["WWW-Authenticate"] == "Bearer", path
        good = client.post("/v1/caption", json={"image": b64(png)}, headers={"Authorization": "Bearer k-two"})
        assert good.status_code == 200
        assert client.get("/v1/models", headers={"Authorization": "bearer k-one"}).status_code == 200
        assert calls and len(calls) % 2 == 0  # every check compares against both keys, in constant time


def test_row21_path_tricks_on_the_real_server(live_server):
    def raw(path: bytes, auth: bool = False) -> int:
        with socket.create_connection(("127.0.0.1", live_server.port)) as s:
            extra = b"Authorization: Bearer " + API_KEY.encode() + b"\r\n" if auth else b""
            s.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n" + extra + b"Connection: close\r\n\r\n")
            return _status(_read_response(s))

    for path in (b"//v1/models", b"/V1/models", b"/%2Fv1/models", b"/%2Fv1%2Fmodels", b"/v1/../v1/models",
                 b"/health/live/../../v1/models", b"/health/ready/..%2F..%2Fv1/models", b"/v1//models",
                 b"/v1/models/", b"/metrics", b"/", b"/docs", b"/openapi.json"):
        assert raw(path) == 401, path
    assert raw(b"/health/live") == 200 and raw(b"/health/ready") == 200
    assert raw(b"/v1/models", auth=True) == 200


# --- row 22: a flood of bad requests, then a client that disconnects mid-generation --------------------


def _metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_row22_flood_then_disconnect(live_server, png):
    bads = [
        ("/v1/caption", {"files": {"file": ("b.png", png_1bit(30000, 30000))}}),
        ("/v1/caption", {"files": {"file": ("t.png", png[: len(png) // 2])}}),
        ("/v1/caption", {"json": {"image": "!!notbase64!!"}}),
        ("/v1/caption", {"json": {"image": b64(png), "max_new_tokens": 0}}),
        ("/v1/detect", {"files": {"file": ("x.pdf", REFUSED["pdf"])}}),
        ("/v1/vqa", {"json": {"image": b64(png), "question": "\x00"}}),
        ("/v1/caption", {"content": b"--a\r\n\r\n", "headers": {"Content-Type": "multipart/form-data; boundary=b"}}),
        ("/v1/caption", {"files": {"file": ("m.png", METADATA_BOMBS["many_text_chunks"]())},
                         "data": {"quality": "no-such-level"}}),
        ("/v1/chat/completions", {"json": {"messages": [{"role": "user", "content": "no image"}]}}),
        ("/v1/caption", {"json": {"image": b64(encode(Image.new("L", (1, 1)), "PNG"))}}),
    ]

    async def flood():
        async with httpx.AsyncClient(base_url=live_server.url, headers=AUTH, timeout=60) as client:
            resps = await asyncio.gather(*(client.post(path, **kwargs) for path, kwargs in bads * 10))
        return [r.status_code for r in resps]

    statuses = asyncio.run(flood())
    assert len(statuses) == 100 and all(400 <= s < 500 for s in statuses), sorted(set(statuses))
    assert httpx.get(live_server.url + "/health/ready").status_code == 200

    metrics = lambda: httpx.get(live_server.url + "/metrics", headers=AUTH).text  # noqa: E731
    before = metrics()
    cancelled = _metric(before, 'qbridge_rejected_total{reason="cancelled"}')
    batches = _metric(before, 'qbridge_batch_size_count{stage="generate"}')
    body = json.dumps({"image": b64(png), "max_new_tokens": 256}).encode()  # ~3 s on 2 cores, never EOS
    with socket.create_connection(("127.0.0.1", live_server.port)) as s:
        s.sendall(b"POST /v1/caption HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + API_KEY.encode()
                  + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        for _ in range(250):  # until its generation batch has started
            text = metrics()
            if _metric(text, 'qbridge_batch_size_count{stage="generate"}') > batches:
                break
            time.sleep(0.02)
        else:
            pytest.fail("the generation never started")
        assert _metric(text, "qbridge_queue_depth") == 1
    t0 = time.perf_counter()  # the socket is closed: the client is gone mid-generation
    for _ in range(250):
        text = metrics()
        if _metric(text, "qbridge_queue_depth") == 0:
            break
        time.sleep(0.02)
    freed_after = time.perf_counter() - t0
    assert _metric(text, "qbridge_queue_depth") == 0
    assert freed_after < 1.0  # the slot is free while the abandoned batch still runs
    assert _metric(text, 'qbridge_rejected_total{reason="cancelled"}') == cancelled + 1
    assert httpx.get(live_server.url + "/health/ready").status_code == 200
    ok = httpx.post(live_server.url + "/v1/caption", headers=AUTH, json={"image": b64(png), "max_new_tokens": 2},
                    timeout=120)
    assert ok.status_code == 200
    assert live_server.alive()
    assert "Traceback" not in live_server.log_text()


def test_a_file_in_another_part_says_where_files_go(client):
    png = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
    r = client.post("/v1/caption", files={"photo": ("x.png", png, "image/png")})
    assert_envelope(r, 400, "invalid_multipart")
    err = r.json()["error"]
    assert "'file'" in err["message"] and "'image'" in err["message"] and err["param"] == "photo"


def test_an_upload_in_the_part_image_is_the_image(client, good, png):
    """`curl -F image=@photo.jpg`: the part `image` with a filename is the upload; as a text field it stays base64."""
    form = {"max_new_tokens": "2"}
    as_image = client.post("/v1/caption", files={"image": ("x.png", png, "image/png")}, data=form)
    as_file = client.post("/v1/caption", files={"file": ("x.png", png, "image/png")}, data=form)
    assert as_image.status_code == 200, as_image.text
    assert as_image.json()["caption"] == as_file.json()["caption"]
    as_text = client.post("/v1/caption", files={"image": (None, b64(png))}, data=form)  # no filename: a text field
    assert as_text.status_code == 200 and as_text.json()["caption"] == as_file.json()["caption"]
    both = client.post("/v1/caption", files=[("file", ("a.png", png, "image/png")),
                                             ("image", ("b.png", png, "image/png"))], data=form)
    err = assert_envelope(both, 400, "multiple_image_sources")
    assert "'file'" in err["message"] and "'image'" in err["message"] and err["param"] == "image"
    text_too = client.post("/v1/caption", files=[("image", ("b.png", png, "image/png")), ("image", (None, b64(png)))])
    assert_envelope(text_too, 400, "multiple_image_sources")
    schema = client.get("/openapi.json").json()["components"]["schemas"]
    for name in ("CaptionRequestForm", "VQARequestForm", "DetectRequestForm", "ImageUploadRequestForm"):
        for part in ("file", "image"):
            assert schema[name]["properties"][part]["format"] == "binary", (name, part)
    still_healthy(client, good)
