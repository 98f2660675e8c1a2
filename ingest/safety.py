"""Which addresses a crawl may connect to, decided before any connection is made, and for how long.

A crawler fed URLs from search results or user lists must not become a way to reach a machine's
own services or its private network (server-side request forgery). Every request, redirect hops
included, goes through `SafeAdapter`, whose connections resolve the host once, refuse private,
loopback, link-local and other non-public addresses unless the crawl allows them, and connect to
exactly the addresses they checked: a name that answers a public address to the check and a
private one a moment later (DNS rebinding) cannot reach the private one. The Host header, TLS SNI
and certificate check still use the name. Each request also runs under a wall-clock deadline
(deadline.py).
"""
from __future__ import annotations

import ipaddress
import socket
import threading
from typing import Callable, Iterable
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from requests.utils import select_proxy
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError
from urllib3.util.connection import create_connection

from maskless.ingest import deadline
from maskless.ingest.deadline import Deadlines


class RefusedAddress(Exception):
    """A URL that the crawl must not fetch; the message says why."""


def address_block(ip: str) -> str | None:
    """Why a resolved address is not public (e.g. 'loopback'), or None when it may be fetched."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])  # drop an IPv6 zone id
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    for kind in ("unspecified", "loopback", "link_local", "multicast", "private", "reserved"):
        if getattr(addr, f"is_{kind}"):
            return kind.replace("_", "-")
    if not addr.is_global:  # shared address space (100.64/10) and other special blocks
        return "not-global"
    return None


Resolver = Callable[[str, int], Iterable[str]]


def resolve_host(host: str, port: int) -> list[str]:
    """Every address the system resolver gives for host, in its order (a literal address resolves to
    itself); socket.gaierror when the name does not resolve."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


def check_host(host: str, port: int, allow_private: bool = False, allowed_origins: Iterable[str] = (),
               resolver: Resolver = resolve_host) -> list[str]:
    """The addresses to connect to for host:port: all it resolves to, each one public.

    RefusedAddress when one is not; socket.gaierror (an OSError) when the name does not resolve.
    `allowed_origins` ("host:port": the local engine's own loopback server) and `allow_private` skip
    the address check, not the resolution."""
    try:
        addresses = list(resolver(host, port))
    except UnicodeError as e:
        raise RefusedAddress(f"host {host!r} is not a valid name: {e}") from None
    if not addresses:
        raise socket.gaierror(socket.EAI_NONAME, f"{host} has no address")
    check_addresses(host, port, addresses, allow_private, allowed_origins)
    return addresses


def check_addresses(host: str, port: int, addresses: Iterable[str], allow_private: bool = False,
                    allowed_origins: Iterable[str] = ()) -> None:
    """RefusedAddress unless every address of host is public, or the crawl allows it (see check_host)."""
    if allow_private or f"{host}:{port}" in set(allowed_origins):
        return
    for ip in addresses:
        block = address_block(ip)
        if block:
            raise RefusedAddress(f"{host} resolves to {block} address {ip} "
                                 f"(pass --allow-private to crawl such addresses)")


def url_target(url: str) -> tuple[str, int]:
    """(host, port) of an http(s) URL; RefusedAddress for any other scheme or no host."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise RefusedAddress(f"scheme {parts.scheme!r} is not http or https: {url}")
    if not parts.hostname:
        raise RefusedAddress(f"no host in URL: {url}")
    return parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)


def check_url(url: str, allow_private: bool = False, allowed_origins: Iterable[str] = (),
              resolver: Resolver = resolve_host) -> list[str]:
    """check_host for the host of an http(s) URL."""
    return check_host(*url_target(url), allow_private, allowed_origins, resolver)


_sending = threading.local()  # the SafeAdapter sending on this thread: its connections ask it


def _current_adapter(host: str) -> "SafeAdapter":
    adapter = getattr(_sending, "adapter", None)
    if adapter is None:  # only SafeAdapter.send uses these connections: never connect unchecked
        raise RefusedAddress(f"connection to {host} outside SafeAdapter")
    return adapter


class _PinnedConnection:
    """A urllib3 connection that connects only to the addresses its adapter checked for its host."""

    deadline_socket: tuple | None = None  # (descriptor, local address, peer address), for deadline.py
    checked_by: "SafeAdapter | None" = None  # the adapter whose rules admitted the connected address

    def _new_conn(self) -> socket.socket:
        adapter = _current_adapter(self.host)
        try:
            addresses = adapter.addresses(self.host, self.port)
        except OSError as e:
            raise NameResolutionError(self.host, self, e) from e
        for ip in addresses:  # in the resolver's order, the next one when one fails, as urllib3 does
            try:
                sock = create_connection((ip, self.port), self.timeout, source_address=self.source_address,
                                         socket_options=self.socket_options)
                break
            except socket.timeout:
                error = ConnectTimeoutError(self, f"connection to {self.host} ({ip}) timed out "
                                                  f"(connect timeout={self.timeout})")
            except OSError as e:
                error = NewConnectionError(self, f"failed to connect to {self.host} ({ip}): {e}")
        else:
            raise error
        self.deadline_socket, self.checked_by = (sock.fileno(), sock.getsockname(), sock.getpeername()), adapter
        deadline.attach_current(self)  # from here on (the TLS handshake too) the deadline can shut it
        return sock

    def request(self, *args, **kwargs):
        adapter = _current_adapter(self.host)
        if self.deadline_socket is not None and self.checked_by is not adapter:
            # a kept-alive connection opened for another unit (a crawl worker's shared pools): its address
            # must pass this unit's rules too
            adapter.check_address(self.host, self.port, self.deadline_socket[2][0])
            self.checked_by = adapter
        deadline.attach_current(self)  # a kept-alive connection serves this request now
        return super().request(*args, **kwargs)


class _PinnedHTTPConnection(_PinnedConnection, HTTPConnection):
    pass


class _PinnedHTTPSConnection(_PinnedConnection, HTTPSConnection):
    pass


class _PinnedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _PinnedHTTPConnection


class _PinnedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _PinnedHTTPSConnection


PINNED_POOL_CLASSES = {"http": _PinnedHTTPPool, "https": _PinnedHTTPSPool}  # a PoolManager's, by scheme


class SafeAdapter(HTTPAdapter):
    """A requests transport whose connections check their host (every redirect hop's too) and connect
    only to the addresses checked, each request under a deadline from `deadlines`.

    A request made outside a deadline (icrawler's result-page requests) gets one here, and its body is
    read here, under it; a streamed request made inside `deadlines.request()` (the downloader's) keeps
    that one for its body."""

    def __init__(self, allow_private: bool = False, allowed_origins: Iterable[str] = (),
                 on_refused: Callable[[str, str], None] | None = None, deadlines: Deadlines | None = None,
                 resolver: Resolver = resolve_host, **kwargs):
        self.allow_private = allow_private
        self.allowed_origins = tuple(allowed_origins)
        self.on_refused = on_refused
        self.deadlines = deadlines or Deadlines(60.0)
        self.resolver = resolver
        super().__init__(**kwargs)

    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = PINNED_POOL_CLASSES

    def addresses(self, host: str, port: int) -> list[str]:
        """check_host under this adapter's rules, counting refusals."""
        return self._counted(host, port, check_host, host, port, self.allow_private, self.allowed_origins,
                             self.resolver)

    def check_address(self, host: str, port: int, ip: str) -> None:
        """RefusedAddress (counted) when this adapter's rules do not admit a connection to ip for host."""
        self._counted(host, port, check_addresses, host, port, [ip], self.allow_private, self.allowed_origins)

    def _counted(self, host: str, port: int, check: Callable, *args):
        try:
            return check(*args)
        except RefusedAddress as e:
            if self.on_refused:
                self.on_refused(f"{host}:{port}", str(e))
            raise

    def send(self, request, stream=False, proxies=None, **kwargs):
        host, port = url_target(request.url)
        if select_proxy(request.url, proxies):
            # the proxy resolves and connects: checked here, but not pinned (docs/CRAWL.md)
            try:
                self.addresses(host, port)
            except OSError as e:
                raise requests.ConnectionError(NameResolutionError(host, None, e), request=request) from None
        previous, _sending.adapter = getattr(_sending, "adapter", None), self
        try:
            with self.deadlines.request() as d:
                try:
                    resp = super().send(request, stream=stream, proxies=proxies, **kwargs)
                    if not stream:
                        resp.content  # the body under the same deadline
                except requests.RequestException:
                    if not d.expired:
                        raise
                if d.expired:  # a body cut by the deadline can look complete
                    raise requests.Timeout(f"{request.url}: not complete after {d.seconds:.1f} s")
                return resp
        finally:
            _sending.adapter = previous
