"""The SSRF guard: a `notify_url` must name http(s) and resolve only to public addresses.

Checked twice: at submit (a 422 naming `notify_url`) and again at each delivery, on the
addresses the sender then connects to, so a name that resolves elsewhere later (DNS rebinding)
gains nothing.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

SCHEMES = {"http": 80, "https": 443}
RESOLVE_TIMEOUT = 3.0


class UnsafeUrl(ValueError):
    """The URL may not be called: its form, or where it leads."""


@dataclass(frozen=True)
class Target:
    """A checked destination: where to connect, and the name it was asked by."""

    scheme: str
    host: str
    port: int
    address: IPAddress


def url_problem(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of a URL of the right form; UnsafeUrl names what is wrong."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UnsafeUrl(f"not a URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise UnsafeUrl("the scheme must be http or https")
    if not parts.hostname:
        raise UnsafeUrl("the URL names no host")
    if parts.username is not None or parts.password is not None:
        raise UnsafeUrl("credentials in the URL are not sent; put a token in its path or query")
    return scheme, parts.hostname, port or SCHEMES[scheme]


def networks(allowed: Sequence[str]) -> list[Network]:
    return [ipaddress.ip_network(network, strict=False) for network in allowed]


def unmapped(address: IPAddress) -> IPAddress:
    """An IPv4 address written as IPv6 (::ffff:a.b.c.d) is that IPv4 address."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def address_problem(address: IPAddress, allowed: Sequence[Network]) -> str | None:
    """Why `address` may not be called, or None."""
    address = unmapped(address)
    if any(address in network for network in allowed):
        return None
    # Not global: loopback, private, link-local (169.254.169.254, the cloud metadata service,
    # is one), shared, reserved, unspecified; multicast is global yet never a web server.
    if not address.is_global or address.is_multicast:
        return "not a public address"
    return None


def check_addresses(
    host: str, addresses: Sequence[IPAddress], allowed: Sequence[Network]
) -> IPAddress:
    """The first address, if every one the host resolves to may be called."""
    if not addresses:
        raise UnsafeUrl(f"{host} does not resolve")
    for address in addresses:
        problem = address_problem(address, allowed)
        if problem is not None and _literal(host) is not None:
            raise UnsafeUrl(f"{unmapped(address)} is {problem}")
        if problem is not None:
            raise UnsafeUrl(f"{host} resolves to {unmapped(address)}, {problem}")
    return addresses[0]


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def _addresses(infos: Sequence[tuple[object, ...]]) -> list[IPAddress]:
    found: list[IPAddress] = []
    for info in infos:
        sockaddr = info[4]
        assert isinstance(sockaddr, tuple)
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if address not in found:
            found.append(address)
    return found


def resolve(url: str, allowed: Sequence[Network]) -> Target:
    """The checked destination of `url` (blocking: a DNS lookup)."""
    scheme, host, port = url_problem(url)
    literal = _literal(host)
    if literal is not None:
        return Target(scheme, host, port, check_addresses(host, [literal], allowed))
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise UnsafeUrl(f"{host} does not resolve: {exc.strerror or exc}") from None
    return Target(scheme, host, port, check_addresses(host, _addresses(infos), allowed))


async def resolve_async(url: str, allowed: Sequence[Network]) -> Target:
    """`resolve` without blocking the event loop, within RESOLVE_TIMEOUT."""
    scheme, host, port = url_problem(url)
    literal = _literal(host)
    if literal is not None:
        return Target(scheme, host, port, check_addresses(host, [literal], allowed))
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), RESOLVE_TIMEOUT
        )
    except TimeoutError:
        raise UnsafeUrl(f"{host} did not resolve within {RESOLVE_TIMEOUT:g} s") from None
    except OSError as exc:
        raise UnsafeUrl(f"{host} does not resolve: {exc.strerror or exc}") from None
    return Target(scheme, host, port, check_addresses(host, _addresses(infos), allowed))
