"""Tests for slimta.util's IPv4-only connection helpers, against real sockets."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import gevent.socket
import pytest

import slimta.util
from slimta.util import build_ipv4_socket_creator, create_connection_ipv4


def _listener(family: socket.AddressFamily, host: str) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((host, 0))
    sock.listen(8)
    return sock


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = _listener(socket.AF_INET, "127.0.0.1")
    yield sock
    sock.close()


@pytest.fixture
def closed_port() -> int:
    """A local port with nothing listening on it."""
    sock = _listener(socket.AF_INET, "127.0.0.1")
    port: int = sock.getsockname()[1]
    sock.close()
    return port


@pytest.fixture
def listener6() -> Iterator[socket.socket]:
    try:
        sock = _listener(socket.AF_INET6, "::1")
    except OSError:
        pytest.skip("no IPv6 loopback")
    yield sock
    sock.close()


@pytest.fixture
def lookups(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """Records the arguments of every gevent getaddrinfo call."""
    calls: list[tuple[Any, ...]] = []
    real = gevent.socket.getaddrinfo

    def recording(*args: Any) -> Any:
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(gevent.socket, "getaddrinfo", recording)
    return calls


def _accept_peer(listener: socket.socket, client: socket.socket) -> None:
    """Check the listener sees the client's connection."""
    listener.settimeout(5)
    conn, peer = listener.accept()
    try:
        assert peer == client.getsockname()
    finally:
        conn.close()


def test_public_names() -> None:
    assert slimta.util.__all__ == ["build_ipv4_socket_creator", "create_connection_ipv4"]


def test_connects_to_localhost_over_ipv4(
    listener: socket.socket, lookups: list[tuple[Any, ...]]
) -> None:
    port = listener.getsockname()[1]
    sock = create_connection_ipv4(("localhost", port))
    try:
        assert sock.family == socket.AF_INET
        assert sock.getpeername() == ("127.0.0.1", port)
        assert isinstance(sock, gevent.socket.socket)
        _accept_peer(listener, sock)
    finally:
        sock.close()
    assert lookups == [("localhost", port, socket.AF_INET, socket.SOCK_STREAM)]


def test_timeout_and_source_address(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    sock = create_connection_ipv4(("127.0.0.1", port), 5.0, ("127.0.0.1", 0))
    try:
        assert sock.gettimeout() == 5.0
        assert sock.getsockname()[0] == "127.0.0.1"
        _accept_peer(listener, sock)
    finally:
        sock.close()


def test_port_in_only_ports_stays_ipv4(
    listener: socket.socket, lookups: list[tuple[Any, ...]]
) -> None:
    port = listener.getsockname()[1]
    sock = create_connection_ipv4(("localhost", port), only_ports=[port])
    try:
        assert sock.family == socket.AF_INET
    finally:
        sock.close()
    assert lookups[0][2] == socket.AF_INET


def test_port_not_in_only_ports_is_dual_stack(
    listener: socket.socket, lookups: list[tuple[Any, ...]]
) -> None:
    port = listener.getsockname()[1]
    sock = create_connection_ipv4(("localhost", port), only_ports=[port + 1])
    try:
        assert sock.getpeername() == ("127.0.0.1", port)
    finally:
        sock.close()
    assert lookups[0][2] == socket.AF_UNSPEC


def test_ipv6_only_host_needs_port_outside_only_ports(listener6: socket.socket) -> None:
    port = listener6.getsockname()[1]
    with pytest.raises(OSError):
        create_connection_ipv4(("::1", port))
    with pytest.raises(OSError):
        create_connection_ipv4(("::1", port), only_ports={port})
    sock = create_connection_ipv4(("::1", port), only_ports={25})
    try:
        assert sock.family == socket.AF_INET6
    finally:
        sock.close()


def _fake_lookup(monkeypatch: pytest.MonkeyPatch, ports: list[int]) -> None:
    """Make every host resolve to these 127.0.0.1 ports, in this order."""

    def getaddrinfo(host: str, port: int, family: int = 0, type: int = 0) -> list[tuple[Any, ...]]:
        assert family == socket.AF_INET
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", each)) for each in ports]

    monkeypatch.setattr(gevent.socket, "getaddrinfo", getaddrinfo)


def test_tries_addresses_in_resolver_order(
    monkeypatch: pytest.MonkeyPatch, listener: socket.socket, closed_port: int
) -> None:
    port = listener.getsockname()[1]
    _fake_lookup(monkeypatch, [closed_port, port])
    sock = create_connection_ipv4(("mx.example.com", 25))
    try:
        assert sock.getpeername() == ("127.0.0.1", port)
    finally:
        sock.close()


def test_raises_last_error(monkeypatch: pytest.MonkeyPatch, closed_port: int) -> None:
    _fake_lookup(monkeypatch, [closed_port, closed_port])
    with pytest.raises(ConnectionRefusedError):
        create_connection_ipv4(("mx.example.com", 25))


def test_empty_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_lookup(monkeypatch, [])
    with pytest.raises(OSError, match="getaddrinfo returns an empty list"):
        create_connection_ipv4(("mx.example.com", 25))


def test_socket_creator(listener: socket.socket, lookups: list[tuple[Any, ...]]) -> None:
    port = listener.getsockname()[1]
    creator = build_ipv4_socket_creator()
    sock = creator(("localhost", port), 5.0)
    try:
        assert sock.family == socket.AF_INET
        assert sock.gettimeout() == 5.0
    finally:
        sock.close()
    assert lookups[-1][2] == socket.AF_INET


def test_socket_creator_only_ports(listener: socket.socket, lookups: list[tuple[Any, ...]]) -> None:
    port = listener.getsockname()[1]
    sock = build_ipv4_socket_creator(only_ports=[25])(("localhost", port), source_address=None)
    sock.close()
    sock = build_ipv4_socket_creator(only_ports=[port])(("localhost", port))
    sock.close()
    assert [call[2] for call in lookups] == [socket.AF_UNSPEC, socket.AF_INET]
