"""The SSRF guard: which URLs a partner may register, and which addresses we may connect to.

A webhook URL is chosen by a partner, so a careless check lets anyone make our workers call the cloud
metadata service, Redis on loopback or an office network. Two checks, both needed: `check_url` at
registration (a clear answer while the partner is there) and `resolve` before every new connection (DNS
answers change; the transport connects to the very address this module approved, never resolving again).

`ipaddress.is_global` is not enough on its own: Python 3.11 calls `64:ff9b::7f00:1` (NAT64 for 127.0.0.1),
`2002:7f00:1::` (6to4), `fec0::1` and every multicast address global. Addresses that embed an IPv4 address
are judged by the address they hide.
"""

from __future__ import annotations

import asyncio
import functools
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from urllib.parse import quote, urlsplit

IPAddress = IPv4Address | IPv6Address

_IPV4_SPECIAL: tuple[tuple[IPv4Network, str], ...] = tuple(
    (IPv4Network(network), what)
    for network, what in (
        ("0.0.0.0/8", "an unspecified ('this network') address"),
        ("10.0.0.0/8", "a private address"),
        ("100.64.0.0/10", "a shared (carrier-grade NAT) address"),
        ("127.0.0.0/8", "a loopback address"),
        ("169.254.0.0/16", "a link-local address"),
        ("172.16.0.0/12", "a private address"),
        ("192.0.0.0/24", "an IETF protocol assignment"),
        ("192.0.2.0/24", "a documentation address"),
        ("192.88.99.0/24", "a deprecated 6to4 relay address"),
        ("192.168.0.0/16", "a private address"),
        ("198.18.0.0/15", "a benchmarking address"),
        ("198.51.100.0/24", "a documentation address"),
        ("203.0.113.0/24", "a documentation address"),
        ("224.0.0.0/4", "a multicast address"),
        ("255.255.255.255/32", "the broadcast address"),
        ("240.0.0.0/4", "a reserved address"),
    )
)

_IPV6_SPECIAL: tuple[tuple[IPv6Network, str], ...] = tuple(
    (IPv6Network(network), what)
    for network, what in (
        ("fc00::/7", "a private (unique local) address"),
        ("fe80::/10", "a link-local address"),
        ("fec0::/10", "a site-local address"),
        ("ff00::/8", "a multicast address"),
        ("2001:db8::/32", "a documentation address"),
        ("3fff::/20", "a documentation address"),
        ("2001::/23", "an IETF protocol assignment"),
    )
)
# Every other IPv6 address outside this block is reserved, unassigned or special-purpose.
_IPV6_GLOBAL_UNICAST = IPv6Network("2000::/3")
_IPV4_COMPATIBLE = IPv6Network("::/96")
_NAT64 = IPv6Network("64:ff9b::/96")
_LOCAL_NAT64 = IPv6Network("64:ff9b:1::/48")
_TEREDO = IPv6Network("2001::/32")


class TransportError(Exception):
    """Base of every delivery failure; the message is safe to show to the partner."""

    # Why the request was sent a second time before this failure (see DeliveryClient.post), or None.
    resent: str | None = None


class InvalidURL(TransportError):
    """The URL cannot be a webhook destination, whatever it resolves to."""


class BlockedDestination(TransportError):
    """The destination is, or resolves to, an address that is not publicly routable."""


class ResolutionError(TransportError):
    """The host name does not resolve."""


def is_public(ip: IPAddress) -> bool:
    """True only for globally routable unicast addresses, however they are written."""
    return _refusal(ip) is None


def _refusal(ip: IPAddress) -> str | None:
    """Why `ip` may not be contacted (the end of "blocked: <ip> is …"), or None when it may."""
    if isinstance(ip, IPv4Address):
        return _ipv4_refusal(ip)
    if ip.ipv4_mapped is not None:
        return _hidden_refusal(ip.ipv4_mapped)
    if ip in _NAT64:
        return _hidden_refusal(IPv4Address(int(ip) & 0xFFFFFFFF))
    if ip.sixtofour is not None:
        return _hidden_refusal(ip.sixtofour)
    if ip.is_unspecified:
        return "an unspecified address"
    if ip.is_loopback:
        return "a loopback address"
    if ip in _IPV4_COMPATIBLE:
        hidden = IPv4Address(int(ip) & 0xFFFFFFFF)
        return _hidden_refusal(hidden) or "a deprecated IPv4-compatible address"
    if ip in _LOCAL_NAT64:
        return "a local-use NAT64 address"
    if ip.teredo is not None:
        server, client = ip.teredo
        return _hidden_refusal(client) or _hidden_refusal(server) or "a Teredo tunnel address"
    for network, what in _IPV6_SPECIAL:
        if ip in network:
            return what
    if ip not in _IPV6_GLOBAL_UNICAST:
        return "a reserved address"
    return None if ip.is_global else "not a globally routable address"


def _ipv4_refusal(ip: IPv4Address) -> str | None:
    for network, what in _IPV4_SPECIAL:
        if ip in network:
            return what
    return None if ip.is_global else "not a globally routable address"


def _hidden_refusal(hidden: IPv4Address) -> str | None:
    refusal = _ipv4_refusal(hidden)
    return None if refusal is None else f"hiding {hidden}, {refusal}"


def _blocked(ip: IPAddress) -> BlockedDestination | None:
    refusal = _refusal(ip)
    return None if refusal is None else BlockedDestination(f"blocked: {ip} is {refusal}")


@dataclass(frozen=True)
class Destination:
    """A checked webhook URL, split the way the transport sends it."""

    scheme: str
    host: str  # lower case, ASCII (IDNA), IPv6 without brackets
    port: int
    target: str  # the request target: path and query, percent-encoded
    literal: IPAddress | None  # the host, when the URL names an address rather than a name

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if isinstance(self.literal, IPv6Address) else self.host
        default_port = 443 if self.scheme == "https" else 80
        return host if self.port == default_port else f"{host}:{self.port}"


def check_url(url: str, *, allow_private: bool) -> str | None:
    """A problem to tell the partner registering `url`, or None when it is acceptable (not resolved here)."""
    try:
        parse_destination(url, allow_private=allow_private)
    except TransportError as problem:
        return str(problem)
    return None


def parse_destination(url: str, *, allow_private: bool) -> Destination:
    """Split a webhook URL; raise InvalidURL, or BlockedDestination for a literal address or local name."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InvalidURL(f"invalid URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise InvalidURL("the URL must start with http:// or https://")
    if "@" in parts.netloc:
        raise InvalidURL("the URL must not contain a user name or password (they would leak into logs)")
    host = _ascii_host(parts.hostname or "")
    if port == 0:
        raise InvalidURL("port 0 is not a valid port")
    literal = _literal_address(host)
    if not allow_private:
        if _is_localhost(host):
            raise BlockedDestination(f"blocked: {host} is a local name")
        if literal is not None and (blocked := _blocked(literal)) is not None:
            raise blocked
    target = quote(parts.path or "/", safe=_PATH_SAFE)
    if parts.query:
        target += "?" + quote(parts.query, safe=_PATH_SAFE + "?")
    return Destination(scheme, host, port or (443 if scheme == "https" else 80), target, literal)


# Characters a request target may carry unencoded (RFC 3986 pchar, '/' and existing %-escapes).
_PATH_SAFE = "/%!$&'()*+,;=:@-._~"
_HOST_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-._:")


def _ascii_host(host: str) -> str:
    if not host:
        raise InvalidURL("the URL has no host")
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise InvalidURL("the URL's host is not a valid domain name") from None
    if not _HOST_CHARACTERS.issuperset(host):
        raise InvalidURL("the URL's host contains characters a host name cannot have")
    return host


def _literal_address(host: str) -> IPAddress | None:
    """The address a host names literally, refusing IPv4 spellings other than a.b.c.d.

    The system resolver reads `2130706433`, `0x7f.1`, `127.1` and `0177.0.0.1` all as 127.0.0.1 (inet_aton
    rules), other parsers read them differently or not at all: a URL whose meaning depends on the parser
    is refused, naming the address it would reach.
    """
    try:
        return ip_address(host)
    except ValueError:
        pass
    last_label = host.removesuffix(".").rpartition(".")[2]
    if not (last_label.isdigit() or last_label.startswith("0x")):
        return None  # a name (a top-level domain is never numeric)
    try:
        meaning = socket.inet_ntoa(socket.inet_aton(host))
    except OSError:
        raise InvalidURL(f"{host} is not a valid IPv4 address") from None
    raise InvalidURL(f"write the IPv4 address {host} (meaning {meaning}) as four decimal numbers a.b.c.d")


def _is_localhost(host: str) -> bool:
    name = host.removesuffix(".")
    return name == "localhost" or name.endswith(".localhost")


# The system resolver blocks, so it runs in threads; not the loop's default executor, where a worker's image
# renders (asyncio.to_thread) would make webhook deliveries queue behind image processing.
_RESOLVER_THREADS = ThreadPoolExecutor(max_workers=16, thread_name_prefix="darkroom-resolver")


async def resolve(host: str, port: int, *, allow_private: bool) -> list[IPAddress]:
    """The addresses to connect to, in the resolver's order; all must be public unless allowed.

    One private address among public ones refuses the whole answer: a name resolving to both is the
    classic DNS-rebinding trick, and the transport may fall back from one address to the next.
    """
    name = host.lower()
    if not allow_private and _is_localhost(name):
        raise BlockedDestination(f"blocked: {name} is a local name")
    try:
        literal = ip_address(name)
    except ValueError:
        pass
    else:
        # Already an address: skip the resolver's thread hop (odd spellings like 127.1 still go through it).
        if not allow_private and (blocked := _blocked(literal)) is not None:
            raise blocked
        return [literal]
    loop = asyncio.get_running_loop()
    try:
        answers = await loop.run_in_executor(
            _RESOLVER_THREADS,
            functools.partial(
                socket.getaddrinfo, name, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
            ),
        )
    except (socket.gaierror, UnicodeError):
        raise ResolutionError(f"cannot resolve {name}") from None
    addresses = list(dict.fromkeys(ip_address(sockaddr[0]) for _, _, _, _, sockaddr in answers))
    if not addresses:
        raise ResolutionError(f"cannot resolve {name}")
    if not allow_private:
        for address in addresses:
            if (blocked := _blocked(address)) is not None:
                raise blocked
    return addresses
