"""Screen download targets: malformed URLs before any download, private addresses at connect time.

`screen_url` runs on every input row before ingest and says why a row cannot be downloaded.
`guarded_opener` is the urllib opener ingest installs in its workers: it resolves each host,
refuses private/loopback/link-local/multicast/reserved addresses (also after a redirect, and
against DNS rebinding, because the vetted address is the one connected to) and caps the bytes
read from a response.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import time
import urllib.request
from dataclasses import dataclass
from urllib.parse import urlsplit

ALLOWED_SCHEMES = ("http", "https")
MAX_URL_LENGTH = 4096


@dataclass(frozen=True)
class ScreenResult:
    reason: str
    detail: str


class BlockedAddressError(OSError):
    """The target host resolves to an address that downloads may not reach."""


class ResponseTooLargeError(OSError):
    """The response body exceeds the configured byte limit."""


_EMBEDDING_PREFIXES = [
    ipaddress.ip_network(n)
    for n in (
        "::/96",  # IPv4-compatible (deprecated): ::a.b.c.d
        "::ffff:0:0/96",  # IPv4-mapped: ::ffff:a.b.c.d
        "::ffff:0:0:0/96",  # IPv4-translated (RFC 2765): ::ffff:0:a.b.c.d
        "64:ff9b::/96",  # NAT64 well-known prefix
        "64:ff9b:1::/48",  # NAT64 local-use prefix (RFC 8215), the IPv4 address in the last 32 bits
    )
]


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, compatible, translated, NAT64, 6to4,
    Teredo), which is where a connection to it really goes."""
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if any(ip in net for net in _EMBEDDING_PREFIXES) and int(ip) > 1:  # not :: or ::1
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_public_address(address: str) -> bool:
    """True for a globally routable unicast address; an IPv6 address that embeds an IPv4 one is
    judged by the IPv4 address it embeds."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        inner = embedded_ipv4(ip)
        if inner is not None:
            return inner.is_global and not inner.is_multicast
    return ip.is_global and not ip.is_multicast


def screen_url(url: object, allow_private: bool = False, allowed_schemes=ALLOWED_SCHEMES) -> ScreenResult | None:
    """Why this URL must not be downloaded, or None when it may be."""
    if url is None or (isinstance(url, float) and url != url):
        return ScreenResult("missing_url", "the URL cell is empty")
    if not isinstance(url, str):
        return ScreenResult("invalid_url", f"URL is a {type(url).__name__}, not text")
    url = url.strip()
    if not url:
        return ScreenResult("missing_url", "the URL cell is empty")
    if len(url) > MAX_URL_LENGTH:
        return ScreenResult("invalid_url", f"URL longer than {MAX_URL_LENGTH} characters")
    if any(ch.isspace() or ord(ch) < 32 for ch in url):
        return ScreenResult("invalid_url", "URL contains whitespace or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return ScreenResult("invalid_url", f"cannot parse URL: {exc}")
    if parts.scheme.lower() not in allowed_schemes:
        shown = parts.scheme or "(none)"
        return ScreenResult("unsupported_scheme", f"scheme {shown!r}; allowed: {', '.join(allowed_schemes)}")
    if parts.scheme.lower() == "file":
        return None
    host = parts.hostname
    if not host:
        return ScreenResult("invalid_url", "URL has no host")
    if port == 0:
        return ScreenResult("invalid_url", "URL has port 0")
    if not allow_private:
        if host.lower() == "localhost" or host.lower().endswith(".localhost"):
            return ScreenResult("private_address", f"host {host} is loopback")
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None and not is_public_address(str(literal)):
            return ScreenResult("private_address", f"host {host} is not a public address")
    return None


def _vetted_connection(host: str, port: int, timeout, allow_private: bool) -> socket.socket:
    """Connect to the first resolved address of host, refusing non-public ones."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    if not infos:
        raise OSError(f"cannot resolve {host}")
    last_error: OSError | None = None
    for family, socktype, proto, _, sockaddr in infos:
        if not allow_private and not is_public_address(str(sockaddr[0])):
            raise BlockedAddressError(
                f"[private_address] {host} resolves to {sockaddr[0]}, which is not public "
                "(set ingest.allow_private_addresses to allow it)"
            )
        sock = socket.socket(family, socktype, proto)
        if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:  # type: ignore[attr-defined]
            sock.settimeout(timeout)
        try:
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            sock.close()
            last_error = exc
    assert last_error is not None
    raise last_error


def _guarded_connection_class(base: type[http.client.HTTPConnection], allow_private: bool):
    def vetted(address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None):  # type: ignore[attr-defined]
        return _vetted_connection(address[0], address[1], timeout, allow_private)

    class GuardedConnection(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._create_connection = vetted

    return GuardedConnection


class DownloadDeadlineError(TimeoutError):
    """The whole download took longer than its wall-clock deadline."""


class _CappedResponses(urllib.request.BaseHandler):
    """Caps each body at `max_bytes` and each download (request to last byte) at `deadline_s`:
    the body is read in pieces of at most one socket read, so a server that drips bytes slower
    than the socket timeout is cut off at the deadline, not at bytes x timeout."""

    handler_order = 1000  # after everything else has looked at the response

    def __init__(self, max_bytes: int, deadline_s: float | None):
        self.max_bytes, self.deadline_s = max_bytes, deadline_s

    def http_request(self, request):
        request.df_started = time.monotonic()
        return request

    def http_response(self, request, response):
        length = response.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > self.max_bytes:
            response.close()
            raise ResponseTooLargeError(
                f"[too_large] Content-Length {length} exceeds ingest.max_download_bytes={self.max_bytes}"
            )
        unbounded_read = response.read
        piece = getattr(response, "read1", None)
        max_bytes, deadline_s = self.max_bytes, self.deadline_s
        started = getattr(request, "df_started", time.monotonic())

        def bounded_read(amt=None):
            if amt is not None or piece is None:
                return unbounded_read(amt)
            parts, size = [], 0
            while True:
                if deadline_s is not None and time.monotonic() - started > deadline_s:
                    response.close()
                    raise DownloadDeadlineError(
                        f"[timeout] the download took longer than its deadline of {deadline_s:g} s "
                        f"(ingest.download_deadline_s), {size} bytes read"
                    )
                chunk = piece(65536)
                if not chunk:
                    return b"".join(parts)
                size += len(chunk)
                if size > max_bytes:
                    response.close()
                    raise ResponseTooLargeError(f"[too_large] body exceeds ingest.max_download_bytes={max_bytes}")
                parts.append(chunk)

        response.read = bounded_read
        return response

    https_request = http_request
    https_response = http_response
    file_response = http_response


def guarded_opener(
    allow_private: bool, max_bytes: int, allow_files: bool = False, deadline_s: float | None = None
) -> urllib.request.OpenerDirector:
    """A urllib opener that refuses non-public targets (redirects included), caps body size and
    the wall-clock time of each download."""
    plain = _guarded_connection_class(http.client.HTTPConnection, allow_private)
    tls = _guarded_connection_class(http.client.HTTPSConnection, allow_private)

    class GuardedHTTPHandler(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(plain, req)

    class GuardedHTTPSHandler(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(tls, req, context=self._context)

    handlers: list[urllib.request.BaseHandler] = [
        urllib.request.ProxyHandler({}),
        urllib.request.UnknownHandler(),
        GuardedHTTPHandler(),
        GuardedHTTPSHandler(),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPRedirectHandler(),
        urllib.request.HTTPErrorProcessor(),
        _CappedResponses(max_bytes, deadline_s),
    ]
    if allow_files:
        handlers.append(urllib.request.FileHandler())
    opener = urllib.request.OpenerDirector()
    for handler in handlers:
        opener.add_handler(handler)
    return opener
