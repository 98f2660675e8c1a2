"""Which addresses a crawl may connect to, decided before any connection is made.

A crawler fed URLs from search results or user lists must not become a way to reach a
machine's own services or its private network (server-side request forgery). Every request,
redirect hops included, goes through `SafeAdapter`, which resolves the host and refuses
private, loopback, link-local and other non-public addresses unless the crawl allows them.
"""
from __future__ import annotations

import ipaddress
import socket
from typing import Callable, Iterable
from urllib.parse import urlsplit

from requests.adapters import HTTPAdapter


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
    """Every address the system resolver gives for host (a literal address resolves to itself)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({info[4][0] for info in infos})


def check_url(url: str, allow_private: bool = False, allowed_origins: Iterable[str] = (),
              resolver: Resolver = resolve_host) -> None:
    """Raise RefusedAddress unless url is http(s) and every address of its host is public.

    `allowed_origins` ("host:port") are exempt: the local engine's own loopback server."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise RefusedAddress(f"scheme {parts.scheme!r} is not http or https: {url}")
    if not parts.hostname:
        raise RefusedAddress(f"no host in URL: {url}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    if allow_private or f"{parts.hostname}:{port}" in set(allowed_origins):
        return
    try:
        addresses = list(resolver(parts.hostname, port))
    except (OSError, UnicodeError) as e:
        raise RefusedAddress(f"cannot resolve {parts.hostname}: {e}") from None
    for ip in addresses:
        block = address_block(ip)
        if block:
            raise RefusedAddress(f"{parts.hostname} resolves to {block} address {ip} "
                                 f"(pass --allow-private to crawl such addresses)")


class SafeAdapter(HTTPAdapter):
    """A requests transport that checks each outgoing request (every redirect hop too) first."""

    def __init__(self, allow_private: bool = False, allowed_origins: Iterable[str] = (),
                 on_refused: Callable[[str, str], None] | None = None, **kwargs):
        self.allow_private = allow_private
        self.allowed_origins = tuple(allowed_origins)
        self.on_refused = on_refused
        super().__init__(**kwargs)

    def send(self, request, **kwargs):
        try:
            check_url(request.url, self.allow_private, self.allowed_origins)
        except RefusedAddress as e:
            if self.on_refused:
                self.on_refused(request.url, str(e))
            raise
        return super().send(request, **kwargs)
