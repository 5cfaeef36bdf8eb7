"""Images sent to the server: `data:` URLs, uploads and (only when allowed) remote http(s) URLs.

Every image goes through the one photo decoder (`data.images.decode_photo`: allowed formats only,
size checked from the header before a pixel is decoded, polyglots refused) and its `ImageLimits`.
Remote fetches never reach private, loopback, link-local or otherwise non-public addresses: the
check runs in aiohttp's resolver, i.e. on the very addresses the connection then uses (no DNS
rebinding window), literal IPs are checked before connecting, and redirects are followed by hand
so that every hop goes through the same checks.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import socket
from collections.abc import Callable
from urllib.parse import urljoin, urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver
from PIL import Image

from productvlm.data.images import BadImage, ImageLimits, ImageTooLarge, decode_photo
from productvlm.serving.errors import APIError

MAX_REDIRECTS = 3
FETCH_TIMEOUT_S = 10.0


def decode_image(data: bytes, limits: ImageLimits, where: str = "image") -> Image.Image:
    """Bytes -> the normalised photo, or a 400 naming `where` and the reason: `image_too_large` (bytes
    or pixels over `limits`), else `invalid_image` (not a supported image, truncated, corrupt...)."""
    try:
        return decode_photo(data, limits)
    except ImageTooLarge as e:
        raise APIError(400, f"{where}: {e}", code="image_too_large") from e
    except BadImage as e:
        raise APIError(400, f"{where}: {e}", code="invalid_image") from e


def decode_data_url(url: str, limits: ImageLimits, where: str) -> Image.Image:
    """`data:image/...;base64,...` -> image. Only base64 data URLs are accepted."""
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:") or not header.endswith(";base64"):
        raise APIError(400, f"{where}: expected a data:image/...;base64,... URL", code="invalid_image_url")
    if len(payload) * 3 // 4 > limits.max_bytes:
        raise APIError(400, f"{where}: image over {limits.max_bytes:,} bytes", code="image_too_large")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise APIError(400, f"{where}: invalid base64 ({e})", code="invalid_base64") from e
    return decode_image(data, limits, where)


def is_public(ip: str) -> bool:
    """Only globally routable unicast addresses; IPv4-mapped IPv6 is judged as the IPv4 it carries."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return addr.is_global and not addr.is_multicast


class BlockedAddress(aiohttp.ClientError):
    """A remote image URL resolved to an address we refuse to connect to."""


class PublicOnlyResolver(AbstractResolver):
    """aiohttp resolver that fails when any address of a host is not public (`allowed(ip)` false)."""

    def __init__(self, allowed: Callable[[str], bool] = is_public):
        self._inner = aiohttp.ThreadedResolver()
        self._allowed = allowed

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET):
        infos = await self._inner.resolve(host, port, family)
        blocked = [i["host"] for i in infos if not self._allowed(i["host"])]
        if blocked:
            raise BlockedAddress(f"{host} resolves to a non-public address ({blocked[0]})")
        return infos

    async def close(self) -> None:
        await self._inner.close()


class RemoteFetcher:
    """Downloads remote images with the address policy, a timeout, a byte cap and checked redirects."""

    def __init__(
        self,
        limits: ImageLimits,
        allowed: Callable[[str], bool] = is_public,
        timeout_s: float = FETCH_TIMEOUT_S,
    ):
        self.limits, self.allowed, self.timeout_s = limits, allowed, timeout_s
        self._session: aiohttp.ClientSession | None = None

    async def fetch(self, url: str, where: str) -> Image.Image:
        if self._session is None:
            connector = aiohttp.TCPConnector(resolver=PublicOnlyResolver(self.allowed), limit=32)
            timeout = aiohttp.ClientTimeout(total=self.timeout_s)
            self._session = aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False)
        for _ in range(MAX_REDIRECTS + 1):
            self._check_url(url, where)
            try:
                async with self._session.get(url, allow_redirects=False) as r:
                    if r.status in (301, 302, 303, 307, 308) and "Location" in r.headers:
                        url = urljoin(url, r.headers["Location"])
                        continue
                    if r.status != 200:
                        raise APIError(
                            400, f"{where}: fetching it gave HTTP {r.status}", code="image_fetch_failed"
                        )
                    data = bytearray()
                    async for chunk in r.content.iter_chunked(1 << 16):  # read() returns one buffer only
                        data += chunk
                        if len(data) > self.limits.max_bytes:
                            break
            except BlockedAddress as e:
                raise APIError(400, f"{where}: {e}", code="image_url_not_allowed") from e
            except (aiohttp.ClientError, TimeoutError) as e:
                raise APIError(
                    400, f"{where}: could not fetch it ({type(e).__name__})", code="image_fetch_failed"
                ) from e
            if len(data) > self.limits.max_bytes:
                raise APIError(
                    400, f"{where}: image over {self.limits.max_bytes:,} bytes", code="image_too_large"
                )
            return decode_image(data, self.limits, where)
        raise APIError(400, f"{where}: more than {MAX_REDIRECTS} redirects", code="image_fetch_failed")

    def _check_url(self, url: str, where: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise APIError(400, f"{where}: only http(s) image URLs can be fetched", code="invalid_image_url")
        try:
            literal = ipaddress.ip_address(parts.hostname)
        except ValueError:
            return  # a host name: the resolver checks its addresses
        if not self.allowed(str(literal)):
            raise APIError(400, f"{where}: {literal} is not a public address", code="image_url_not_allowed")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
