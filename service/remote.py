"""Fetching an `image_url` from a remote host: only hosts on the configured allowlist, only public addresses.

    data = await fetch_image(url, settings.url_allowlist, limits, timeout_s=5)

With an empty allowlist (the default) every remote URL is refused (400 `url_not_allowed`) before any
connection. Otherwise `service.images.check_url` vets the URL and resolves the host once; the request goes
to that vetted address (Host header and TLS SNI carry the name), so a DNS answer that changes between check
and connect cannot redirect it. Redirects are refused, not followed; the body is capped at the image limit
while it streams.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit, urlunsplit

import httpx

from service.errors import BadRequest, PayloadTooLarge, UrlNotAllowed
from service.images import ImageLimits, check_url


async def fetch_image(url: str, allowlist: Iterable[str], limits: ImageLimits, *, timeout_s: float = 5.0,
                      resolve=None) -> bytes:
    addresses = check_url(url, allowlist, resolve=resolve)
    parts = urlsplit(url)
    addr = addresses[0]
    host_for_url = f"[{addr}]" if ":" in addr else addr
    netloc = host_for_url + (f":{parts.port}" if parts.port else "")
    target = urlunsplit((parts.scheme.lower(), netloc, parts.path or "/", parts.query, ""))
    host_header = parts.hostname + (f":{parts.port}" if parts.port else "")
    extensions = {"sni_hostname": parts.hostname} if parts.scheme.lower() == "https" else {}
    try:
        async with httpx.AsyncClient(follow_redirects=False, timeout=timeout_s, trust_env=False) as client:
            async with client.stream("GET", target, headers={"Host": host_header, "Accept": "image/*"},
                                     extensions=extensions) as resp:
                if resp.is_redirect:
                    raise UrlNotAllowed("the image URL redirects; redirects are not followed", param="url")
                if resp.status_code != 200:
                    raise BadRequest(f"fetching the image URL gave HTTP {resp.status_code}", param="url",
                                     code="url_fetch_failed")
                data = bytearray()
                async for chunk in resp.aiter_bytes():
                    data.extend(chunk)
                    if len(data) > limits.max_image_bytes:
                        raise PayloadTooLarge(
                            f"the image at the URL is over {limits.max_image_bytes / 2**20:.1f} MiB, the limit",
                            param="url",
                        )
                return bytes(data)
    except httpx.TimeoutException:
        raise BadRequest(f"fetching the image URL took longer than {timeout_s:g} s", param="url",
                         code="url_fetch_timeout") from None
    except httpx.HTTPError:
        raise BadRequest("the image URL could not be fetched", param="url", code="url_fetch_failed") from None
