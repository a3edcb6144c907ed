"""A safe, bounded, concurrent image fetcher: local files under the given inputs, and http(s).

Every download has a total deadline (connecting, waiting, reading and retrying together), a byte limit, at
most `retries` further tries with exponential backoff on 429/5xx and connection errors (`Retry-After`
honoured within the deadline), a bound on downloads in flight and a request rate per host. Responses whose
`X-Robots-Tag` says `noai` or `noimageai` are refused, and content is sniffed from its first bytes, never
taken from the URL or the `Content-Type`. Loopback, private, link-local, metadata and other non-global
addresses are refused after DNS resolution, on every connection (so after every redirect too), unless
`allow_private` or an explicit `allow_networks` entry lets them through: the check is the network backend
of the `httpcore` connection pool the downloads go through (httpx parses and normalises the URLs).
Results never raise: each URL gets bytes or a reason.
"""

from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import os
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpcore
import httpx

from magiclens_core.images.sources import UriNotAllowed, UriPolicy

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5
NOAI_DIRECTIVES = ("noai", "noimageai")
# what a download can fail with on the way (connection, protocol, timeouts): retried, then `unreachable`
TRANSPORT_ERRORS = (httpcore.NetworkError, httpcore.ProtocolError, httpcore.TimeoutException,
                    httpcore.UnsupportedProtocol, OSError)
DEFAULT_USER_AGENT = "magiclens-miner/0.1 (image-text research crawler; honours X-Robots-Tag noai)"


@dataclass(frozen=True)
class FetchOptions:
    """Limits of the fetcher (see the module docstring)."""

    deadline_s: float = 20.0
    max_bytes: int = 16 * 1024 * 1024
    retries: int = 2
    backoff_s: float = 0.5
    concurrency: int = 64
    per_host_rate: float = 8.0  # requests per second to one host (0: no limit)
    allow_private: bool = False
    allow_networks: tuple[str, ...] = ()  # CIDRs fetched even though they are not global (a local test server)
    local_roots: tuple[str, ...] = ()  # folders whose files may be read (the job's inputs)
    user_agent: str = DEFAULT_USER_AGENT


@dataclass
class FetchResult:
    """The bytes behind one URL, or why there are none (`reason`, `detail`)."""

    url: str
    data: bytes | None = None
    reason: str | None = None
    detail: str = ""
    mime: str | None = None  # the sniffed image type
    attempts: int = 0


class FetchRefused(Exception):
    """A download stopped on purpose, with the reject reason to report."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


_SIGNATURES = ((b"\xff\xd8\xff", "image/jpeg"), (b"\x89PNG\r\n\x1a\n", "image/png"), (b"GIF87a", "image/gif"),
               (b"GIF89a", "image/gif"), (b"BM", "image/bmp"), (b"II*\x00", "image/tiff"),
               (b"MM\x00*", "image/tiff"), (b"\x00\x00\x01\x00", "image/x-icon"))


def sniff_image_type(data: bytes) -> str | None:
    """The image type the bytes themselves announce (JPEG, PNG, GIF, WebP, BMP, TIFF, ICO, AVIF/HEIF)."""
    for signature, mime in _SIGNATURES:
        if data.startswith(signature):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[4:8] == b"ftyp" and data[8:12] in (b"avif", b"avis", b"heic", b"heix", b"mif1", b"msf1"):
        return "image/avif" if data[8:11] == b"avi" else "image/heif"
    return None


def says_noai(values: Iterable[str]) -> bool:
    """Whether `X-Robots-Tag` header values forbid AI use (`noai`/`noimageai`, for any or every agent)."""
    for value in values:
        for directive in value.lower().replace(":", ",").split(","):
            if directive.strip() in NOAI_DIRECTIVES:
                return True
    return False


@dataclass(frozen=True)
class AddressPolicy:
    """Which resolved addresses may be connected to."""

    allow_private: bool = False
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @classmethod
    def of(cls, options: FetchOptions) -> AddressPolicy:
        return cls(options.allow_private, tuple(ipaddress.ip_network(n, strict=False) for n in options.allow_networks))

    def allows(self, address: str) -> bool:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        return self.allow_private or ip.is_global or any(ip in network for network in self.networks)


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """A connection backend that resolves the host itself and connects only to addresses `policy` allows."""

    def __init__(self, policy: AddressPolicy, inner: httpcore.AsyncNetworkBackend | None = None) -> None:
        self.policy, self.inner = policy, inner or httpcore.AnyIOBackend()

    async def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        addresses = await _resolve(host, port)
        refused = [address for address in addresses if not self.policy.allows(address)]
        if refused or not addresses:
            raise FetchRefused("private_address", f"{host} resolves to {', '.join(refused) or 'nothing'}")
        return await self.inner.connect_tcp(addresses[0], port, timeout, local_address, socket_options)

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


class HostRate:
    """At most `rate` request starts per second to each host (slots handed out in order)."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.next_slot: dict[str, float] = {}

    async def wait(self, host: str) -> None:
        now = time.monotonic()
        slot = max(now, self.next_slot.get(host, now))
        self.next_slot[host] = slot + self.interval
        if slot > now:
            await asyncio.sleep(slot - now)


def _headers(response: httpcore.Response, name: str) -> list[str]:
    """The values of one response header (any case)."""
    key = name.lower().encode()
    return [value.decode("latin-1") for header, value in response.headers if header.lower() == key]


def _header(response: httpcore.Response, name: str) -> str:
    return ", ".join(_headers(response, name))


def _retry_after(response: httpcore.Response) -> float | None:
    value = _header(response, "retry-after")
    if not value:
        return None
    if value.strip().isdigit():
        return float(value)
    when = email.utils.parsedate_to_datetime(value) if value else None
    return max(0.0, when.timestamp() - time.time()) if when else None


class Fetcher:
    """Fetch many images concurrently under `FetchOptions`; use `fetch_all` inside an event loop or
    `fetch` from synchronous code."""

    def __init__(self, options: FetchOptions) -> None:
        self.options = options
        self.local = UriPolicy.allowing(options.local_roots) if options.local_roots else UriPolicy()
        self.address_policy = AddressPolicy.of(options)
        self.headers = [(b"User-Agent", options.user_agent.encode()), (b"Accept", b"image/*"),
                        (b"Accept-Encoding", b"identity")]  # bodies are read as sent: no decompression

    def _pool(self) -> httpcore.AsyncConnectionPool:
        return httpcore.AsyncConnectionPool(max_connections=self.options.concurrency,
                                            max_keepalive_connections=self.options.concurrency,
                                            network_backend=GuardedBackend(self.address_policy))

    def fetch(self, urls: Sequence[str]) -> list[FetchResult]:
        """`fetch_all` from synchronous code (its own event loop)."""
        return asyncio.run(self.fetch_all(urls))

    async def fetch_all(self, urls: Sequence[str]) -> list[FetchResult]:
        """One result per URL, in order; a URL listed twice is fetched once."""
        unique = list(dict.fromkeys(urls))
        semaphore = asyncio.Semaphore(self.options.concurrency)
        rate = HostRate(self.options.per_host_rate)
        async with self._pool() as pool:
            results = await asyncio.gather(*(self._bounded(pool, semaphore, rate, url) for url in unique))
        by_url = dict(zip(unique, results, strict=True))
        return [by_url[url] for url in urls]

    async def _bounded(self, pool: httpcore.AsyncConnectionPool, semaphore: asyncio.Semaphore, rate: HostRate,
                       url: str) -> FetchResult:
        result = FetchResult(url)
        host = urlsplit(url).hostname if not _is_local(url) else None
        if host:
            await rate.wait(host)  # politeness waits are not part of the download's deadline
        async with semaphore:
            try:
                work = self._read_local(url) if _is_local(url) else self._download(pool, rate, url, result)
                result.data = await asyncio.wait_for(work, self.options.deadline_s)
                result.mime = sniff_image_type(result.data)
                if result.mime is None:
                    raise FetchRefused("not_an_image", f"content starts with {result.data[:8]!r}")
            except FetchRefused as err:
                result.data, result.reason, result.detail = None, err.reason, err.detail
            except TimeoutError:
                result.reason, result.detail = "deadline", f"not done within {self.options.deadline_s:g}s"
            except (*TRANSPORT_ERRORS, ValueError) as err:
                result.reason, result.detail = "unreachable", f"{type(err).__name__}: {err}"[:300]
            return result

    async def _read_local(self, url: str) -> bytes:
        try:
            path = self.local.check(url)
        except UriNotAllowed as err:
            raise FetchRefused("path_not_allowed", str(err)) from err
        return await asyncio.to_thread(self._read_file, path)

    def _read_file(self, path: str) -> bytes:
        size = os.stat(path).st_size
        if size > self.options.max_bytes:
            raise FetchRefused("too_large", f"{size} bytes, over the limit of {self.options.max_bytes}")
        with open(path, "rb") as file:
            return file.read(self.options.max_bytes + 1)

    async def _download(self, pool: httpcore.AsyncConnectionPool, rate: HostRate, url: str,
                        result: FetchResult) -> bytes:
        delay = self.options.backoff_s
        while True:
            result.attempts += 1
            try:
                outcome = await self._follow(pool, rate, url, wait_first=result.attempts > 1)
            except TRANSPORT_ERRORS:
                if result.attempts > self.options.retries:
                    raise
                wait = delay
            else:
                if isinstance(outcome, bytes):
                    return outcome
                status, retry_after = outcome
                if status not in RETRY_STATUSES or result.attempts > self.options.retries:
                    raise FetchRefused("http_status", f"HTTP {status}")
                wait = delay if retry_after is None else retry_after
            await asyncio.sleep(wait)  # past the deadline, the download's timeout ends it
            delay *= 2

    async def _follow(self, pool: httpcore.AsyncConnectionPool, rate: HostRate, url: str,
                      wait_first: bool) -> bytes | tuple[int, float | None]:
        """The body at `url` after redirects, or (status, Retry-After) of a response without one."""
        for hop in range(MAX_REDIRECTS + 1):
            try:
                parsed = httpx.URL(url)
            except httpx.InvalidURL as err:
                raise FetchRefused("bad_url", f"{url}: {err}") from err
            if parsed.scheme not in ("http", "https") or not parsed.host:
                raise FetchRefused("bad_url", f"{url}: only http(s) URLs with a host are fetched")
            _check_literal_host(parsed.host, self.address_policy)
            if hop or wait_first:  # a first try's slot was taken before its deadline started
                await rate.wait(parsed.host)
            target = httpcore.URL(scheme=parsed.raw_scheme, host=parsed.raw_host, port=parsed.port,
                                  target=parsed.raw_path)
            async with pool.stream("GET", target, headers=self.headers) as response:
                if says_noai(_headers(response, "x-robots-tag")):
                    raise FetchRefused("robots_noai", f"X-Robots-Tag: {_header(response, 'x-robots-tag')}")
                if response.status in REDIRECT_STATUSES and (location := _header(response, "location")):
                    url = urljoin(str(parsed), location)
                    continue
                if response.status != 200:
                    return response.status, _retry_after(response)
                return await self._body(response)
        raise FetchRefused("too_many_redirects", f"more than {MAX_REDIRECTS}")

    async def _body(self, response: httpcore.Response) -> bytes:
        limit = self.options.max_bytes
        declared = _header(response, "content-length")
        if declared.isdigit() and int(declared) > limit:
            raise FetchRefused("too_large", f"Content-Length {declared} over the limit of {limit}")
        chunks, size = [], 0
        async for chunk in response.aiter_stream():
            size += len(chunk)
            if size > limit:
                raise FetchRefused("too_large", f"over the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)


async def _resolve(host: str, port: int) -> list[str]:
    """The addresses of a host (an IP literal is its own, without a lookup in the resolver's threads)."""
    try:
        return [str(ipaddress.ip_address(host.strip("[]")))]
    except ValueError:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return list(dict.fromkeys(info[4][0] for info in infos))


def _is_local(url: str) -> bool:
    return "://" not in url or url.lower().startswith("file://")


def _check_literal_host(host: str, policy: AddressPolicy) -> None:
    """Refuse an IP-literal host before any connection (names are checked when they are resolved)."""
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return
    if not policy.allows(host.strip("[]")):
        raise FetchRefused("private_address", f"{host} is not a global address")

