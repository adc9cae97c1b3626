"""The SSRF guard: every non-public form refused, public addresses allowed, no network needed."""

from __future__ import annotations

import asyncio
import socket
import threading
from ipaddress import ip_address
from typing import Any

import pytest

from webhooks.addresses import (
    BlockedDestination,
    ResolutionError,
    check_url,
    is_public,
    parse_destination,
    resolve,
)

NOT_PUBLIC = [
    "127.0.0.1",
    "127.255.0.9",
    "10.0.0.5",
    "172.16.0.1",
    "172.31.255.255",
    "192.168.1.1",
    "169.254.169.254",  # the cloud metadata service
    "100.64.0.1",
    "0.0.0.0",
    "0.1.2.3",
    "255.255.255.255",
    "240.0.0.1",
    "224.0.0.1",
    "192.0.2.1",
    "198.18.0.1",
    "::1",
    "::",
    "fc00::1",
    "fd12:3456::1",
    "fe80::1",
    "fec0::1",
    "ff02::1",
    "ff0e::1",  # global-scope multicast: Python calls it global
    "2001:db8::1",
    "100::1",
    "::ffff:127.0.0.1",
    "::ffff:10.0.0.1",
    "::7f00:1",  # IPv4-compatible 127.0.0.1
    "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1: Python calls it global
    "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
    "64:ff9b:1::1",
    "2002:7f00:1::",  # 6to4 of 127.0.0.1: Python calls it global
    "2002:a00:1::1",  # 6to4 of 10.0.0.1
    "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo hiding client 127.0.0.1
]

PUBLIC = ["8.8.8.8", "1.1.1.1", "2606:4700::1111", "2a00:1450:4001::1", "::ffff:8.8.8.8", "64:ff9b::808:808"]


@pytest.mark.parametrize("address", NOT_PUBLIC)
def test_non_public_addresses_are_refused(address: str) -> None:
    assert not is_public(ip_address(address))


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_are_allowed(address: str) -> None:
    assert is_public(ip_address(address))


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://10.0.0.5/hooks", "blocked: 10.0.0.5 is a private address"),
        ("http://169.254.169.254/latest/meta-data/", "blocked: 169.254.169.254 is a link-local address"),
        ("http://[::1]:8080/", "blocked: ::1 is a loopback address"),
        ("http://[64:ff9b::7f00:1]/", "blocked: 64:ff9b::7f00:1 is hiding 127.0.0.1, a loopback address"),
        ("http://[2002:7f00:1::]/", "blocked: 2002:7f00:1:: is hiding 127.0.0.1, a loopback address"),
        ("http://[::ffff:127.0.0.1]/", "blocked: ::ffff:7f00:1 is hiding 127.0.0.1, a loopback address"),
        ("http://localhost:8000/", "blocked: localhost is a local name"),
        ("https://api.LOCALHOST/", "blocked: api.localhost is a local name"),
        ("http://localhost./", "blocked: localhost. is a local name"),
    ],
)
def test_registration_names_the_blocked_address(url: str, message: str) -> None:
    assert check_url(url, allow_private=False) == message


@pytest.mark.parametrize(
    "url", ["http://2130706433/", "http://0x7f.1/", "http://127.1/", "http://0177.0.0.1/"]
)
def test_odd_ipv4_spellings_are_refused_with_their_meaning(url: str) -> None:
    """The system resolver reads all of these as 127.0.0.1; other parsers disagree: never accept them."""
    problem = check_url(url, allow_private=True)
    assert problem is not None
    assert "meaning 127.0.0.1" in problem


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://user:pass@example.com/hooks", "user name or password"),
        ("https://token@example.com/hooks", "user name or password"),
        ("ftp://example.com/hooks", "http:// or https://"),
        ("file:///etc/passwd", "http:// or https://"),
        ("example.com/hooks", "http:// or https://"),
        ("http:///hooks", "no host"),
        ("http://example.com:99999/", "Port out of range"),
        ("http://example.com:0/", "port 0"),
        ("http://exa%6Dple.com/", "characters a host name cannot have"),
        ("http://[fe80::1%25eth0]/", "characters a host name cannot have"),
        ("http://999.1.1.1/", "not a valid IPv4 address"),
    ],
)
def test_malformed_urls_are_refused_even_when_private_addresses_are_allowed(url: str, expected: str) -> None:
    problem = check_url(url, allow_private=True)
    assert problem is not None
    assert expected in problem


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com/hooks",
        "http://8.8.8.8:8080/x",
        "https://[2606:4700::1111]/",
        "https://bücher.example/",
    ],
)
def test_public_urls_are_accepted(url: str) -> None:
    assert check_url(url, allow_private=False) is None


def test_private_addresses_and_local_names_pass_in_development() -> None:
    assert check_url("http://127.0.0.1:9000/hooks", allow_private=True) is None
    assert check_url("http://localhost:9000/hooks", allow_private=True) is None


def test_a_destination_is_split_the_way_it_is_sent() -> None:
    destination = parse_destination("https://Bücher.Example:8443/in box/?q=ä&x=1#frag", allow_private=False)
    assert destination.host == "xn--bcher-kva.example"
    assert destination.port == 8443
    assert destination.host_header == "xn--bcher-kva.example:8443"
    assert destination.target == "/in%20box/?q=%C3%A4&x=1"
    literal = parse_destination("http://[2606:4700::1111]/", allow_private=False)
    assert literal.host_header == "[2606:4700::1111]"
    assert literal.port == 80
    assert literal.target == "/"


def fake_resolver(monkeypatch: pytest.MonkeyPatch, answers: dict[str, list[str]]) -> list[str]:
    """Make the system resolver answer from `answers`; returns the names asked for."""
    asked: list[str] = []

    def getaddrinfo(host: str, port: int, *_: Any, **__: Any) -> list[tuple[Any, ...]]:
        asked.append(host)
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [
            (
                socket.AF_INET6 if ":" in address else socket.AF_INET,
                socket.SOCK_STREAM,
                socket.IPPROTO_TCP,
                "",
                (address, port, 0, 0) if ":" in address else (address, port),
            )
            for address in answers[host]
        ]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return asked


async def test_a_name_resolving_to_public_and_private_addresses_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake_resolver(monkeypatch, {"rebind.example": ["93.184.216.34", "10.0.0.7"]})
    with pytest.raises(BlockedDestination, match=r"^blocked: 10\.0\.0\.7 is a private address$"):
        await resolve("rebind.example", 443, allow_private=False)


async def test_a_name_resolving_to_public_addresses_gives_them_all_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake_resolver(monkeypatch, {"hooks.example": ["93.184.216.34", "2606:2800:220:1::1", "93.184.216.34"]})
    addresses = await resolve("hooks.example", 443, allow_private=False)
    assert addresses == [ip_address("93.184.216.34"), ip_address("2606:2800:220:1::1")]


async def test_a_name_resolving_to_a_nat64_loopback_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_resolver(monkeypatch, {"sneaky.example": ["64:ff9b::7f00:1"]})
    with pytest.raises(BlockedDestination, match=r"hiding 127\.0\.0\.1, a loopback address$"):
        await resolve("sneaky.example", 443, allow_private=False)


async def test_localhost_is_refused_without_asking_the_resolver(monkeypatch: pytest.MonkeyPatch) -> None:
    asked = fake_resolver(monkeypatch, {"localhost": ["8.8.8.8"]})
    with pytest.raises(BlockedDestination, match=r"^blocked: localhost is a local name$"):
        await resolve("localhost", 80, allow_private=False)
    with pytest.raises(BlockedDestination):
        await resolve("admin.localhost", 80, allow_private=False)
    assert asked == []


async def test_odd_ipv4_spellings_are_caught_after_resolution() -> None:
    """The real resolver turns 0x7f.1 into 127.0.0.1, which is then refused (no network involved)."""
    with pytest.raises(BlockedDestination, match=r"^blocked: 127\.0\.0\.1 is a loopback address$"):
        await resolve("0x7f.1", 80, allow_private=False)
    with pytest.raises(BlockedDestination, match=r"^blocked: 127\.0\.0\.1 is a loopback address$"):
        await resolve("2130706433", 80, allow_private=False)


async def test_literal_addresses_are_checked_without_the_resolver(monkeypatch: pytest.MonkeyPatch) -> None:
    asked = fake_resolver(monkeypatch, {})
    assert await resolve("8.8.8.8", 443, allow_private=False) == [ip_address("8.8.8.8")]
    with pytest.raises(BlockedDestination, match=r"^blocked: 169\.254\.169\.254 is a link-local address$"):
        await resolve("169.254.169.254", 80, allow_private=False)
    assert asked == []


async def test_an_unknown_name_is_a_resolution_error(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_resolver(monkeypatch, {})
    with pytest.raises(ResolutionError, match=r"^cannot resolve nowhere\.example$"):
        await resolve("nowhere.example", 443, allow_private=False)


async def test_everything_resolves_in_development(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_resolver(monkeypatch, {"box.internal": ["10.1.2.3"]})
    assert await resolve("box.internal", 80, allow_private=True) == [ip_address("10.1.2.3")]
    assert await resolve("127.0.0.1", 80, allow_private=True) == [ip_address("127.0.0.1")]


async def test_resolution_does_not_queue_behind_busy_worker_threads() -> None:
    """Image renders fill the loop's default executor (asyncio.to_thread); webhook lookups must not wait."""
    renders_may_end = threading.Event()
    renders = [asyncio.create_task(asyncio.to_thread(renders_may_end.wait)) for _ in range(40)]
    try:
        addresses = await asyncio.wait_for(resolve("localhost", 80, allow_private=True), 2)
    finally:
        renders_may_end.set()
        await asyncio.gather(*renders)
    assert {str(address) for address in addresses} <= {"127.0.0.1", "::1"}
