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


def is_public_address(address: str) -> bool:
    """True for a globally routable unicast address."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
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
        if not allow_private and not is_public_address(sockaddr[0]):
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


class _CappedResponses(urllib.request.BaseHandler):
    handler_order = 1000  # after everything else has looked at the response

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes

    def http_response(self, request, response):
        length = response.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > self.max_bytes:
            response.close()
            raise ResponseTooLargeError(
                f"[too_large] Content-Length {length} exceeds ingest.max_download_bytes={self.max_bytes}"
            )
        unbounded_read = response.read
        max_bytes = self.max_bytes

        def bounded_read(amt=None):
            if amt is not None:
                return unbounded_read(amt)
            data = unbounded_read(max_bytes + 1)
            if len(data) > max_bytes:
                raise ResponseTooLargeError(
                    f"[too_large] body exceeds ingest.max_download_bytes={max_bytes}"
                )
            return data

        response.read = bounded_read
        return response

    https_response = http_response
    file_response = http_response


def guarded_opener(allow_private: bool, max_bytes: int, allow_files: bool = False) -> urllib.request.OpenerDirector:
    """A urllib opener that refuses non-public targets (redirects included) and caps body size."""
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
        _CappedResponses(max_bytes),
    ]
    if allow_files:
        handlers.append(urllib.request.FileHandler())
    opener = urllib.request.OpenerDirector()
    for handler in handlers:
        opener.add_handler(handler)
    return opener
