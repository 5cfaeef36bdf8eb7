"""HTTP downloads: bounded concurrency (overall and per host), timeouts, retries with backoff."""

from __future__ import annotations

import asyncio
import random
import time
from collections import defaultdict
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

import aiohttp

USER_AGENT = "productvlm-data-import/0.1"


@dataclass(frozen=True)
class FetchOptions:
    concurrency: int = 32  # requests in flight overall
    per_host: int = 8  # requests in flight per host
    timeout: float = 30.0  # seconds per attempt (connect + headers + body)
    retries: int = 3  # extra attempts after the first, on 5xx / 429 / timeouts / connection errors
    backoff: float = 0.5  # first retry waits about this long; doubles each time (with jitter)
    max_wait: float = 60.0  # cap on one wait, Retry-After included
    max_bytes: int = 50 * 2**20  # a larger body is refused ("too large")


class FetchError(Exception):
    """The download failed for good; `str(e)` is the short reason for failures.csv."""


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.retry_after = retry_after


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: either a number of seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # str.isdigit() alone also accepts "²", which float() refuses
        return float(value)
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


def backoff_delay(attempt: int, opts: FetchOptions, retry_after: float | None, rng: random.Random) -> float:
    """Exponential backoff with equal jitter; a server's Retry-After is a lower bound."""
    step = min(opts.max_wait, opts.backoff * 2**attempt)
    delay = step / 2 + rng.uniform(0, step / 2)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return min(delay, opts.max_wait)


class Fetcher:
    """Use as `async with Fetcher(opts) as f: data = await f.get(url)`."""

    def __init__(self, opts: FetchOptions):
        self.opts = opts
        self._hosts: dict[str, asyncio.Semaphore] = defaultdict(lambda: asyncio.Semaphore(opts.per_host))
        self._rng = random.Random()
        self._session: aiohttp.ClientSession | None = None
        self.requests = 0

    async def __aenter__(self) -> Fetcher:
        connector = aiohttp.TCPConnector(limit=self.opts.concurrency, limit_per_host=self.opts.per_host)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self.opts.timeout),
            headers={"User-Agent": USER_AGENT},
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._session is not None
        await self._session.close()

    async def get(self, url: str) -> bytes:
        """The body of `url`, retrying transient failures; raises FetchError with the final reason."""
        host = urlsplit(url).hostname or ""
        for attempt in range(self.opts.retries + 1):
            try:
                async with self._hosts[host]:
                    return await self._attempt(url)
            except _Retryable as e:
                if attempt == self.opts.retries:
                    raise FetchError(str(e)) from None
                await asyncio.sleep(backoff_delay(attempt, self.opts, e.retry_after, self._rng))
        raise AssertionError("unreachable")

    async def _attempt(self, url: str) -> bytes:
        assert self._session is not None
        self.requests += 1
        try:
            async with self._session.get(url, max_redirects=5) as resp:
                if resp.status >= 500 or resp.status == 429:
                    raise _Retryable(
                        f"http {resp.status}", parse_retry_after(resp.headers.get("Retry-After"))
                    )
                if resp.status >= 400:
                    raise FetchError(f"http {resp.status}")
                if resp.status >= 300:
                    raise FetchError(f"http {resp.status} (redirect not followed)")
                if (resp.content_length or 0) > self.opts.max_bytes:
                    raise FetchError(f"too large ({resp.content_length} bytes)")
                return await self._read(resp)
        except asyncio.TimeoutError:
            raise _Retryable("timeout") from None
        except aiohttp.TooManyRedirects:
            raise FetchError("too many redirects") from None
        except aiohttp.NonHttpUrlRedirectClientError as e:  # e.g. a redirect to file:// or ftp://
            raise FetchError(f"redirect to a non-http url ({str(e)[:80]})") from None
        except (aiohttp.InvalidURL, ValueError) as e:
            raise FetchError(f"malformed url ({e})") from None
        except aiohttp.ClientResponseError as e:
            raise _Retryable(f"bad response ({e.message})") from None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
            raise _Retryable(f"connection error ({type(e).__name__})") from None
        except aiohttp.ClientError as e:  # any other client-side failure is this row's, not the run's
            raise FetchError(f"request failed ({type(e).__name__})") from None

    async def _read(self, resp: aiohttp.ClientResponse) -> bytes:
        chunks, size = [], 0
        async for chunk in resp.content.iter_chunked(1 << 16):
            size += len(chunk)
            if size > self.opts.max_bytes:
                raise FetchError(f"too large (over {self.opts.max_bytes} bytes)")
            chunks.append(chunk)
        return b"".join(chunks)
