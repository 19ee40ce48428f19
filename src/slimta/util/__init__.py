"""Small helpers shared by slimta's modules: IPv4-only connections.

Relays connect with ``gevent.socket.create_connection`` by default, which
tries every address the resolver returns, IPv6 included. Hosts without
working IPv6 routes (or whose IPv6 addresses are on blocklists) can pass
``socket_creator=build_ipv4_socket_creator()`` instead.

.. versionadded:: 4.0
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Container

from gevent import socket as gsocket

__all__ = ["build_ipv4_socket_creator", "create_connection_ipv4"]


def create_connection_ipv4(
    address: tuple[str, int],
    timeout: float | None = None,
    source_address: tuple[str, int] | None = None,
    only_ports: Container[int] | None = None,
) -> socket.socket:
    """Connect to *address* over IPv4 only, like :func:`socket.create_connection`.

    The host is resolved for ``AF_INET`` addresses alone, which are tried in
    the resolver's order until one accepts the connection.

    :param address: ``(host, port)`` to connect to.
    :param timeout: Timeout for the connection attempts and the returned
        socket; ``None`` keeps the socket's default.
    :param source_address: ``(host, port)`` to bind to before connecting.
    :param only_ports: If given, only connections to these ports are limited
        to IPv4; others are made as usual, over IPv4 or IPv6.
    :returns: The connected (gevent) socket.
    :raises OSError: The last connection error, or resolution found no
        IPv4 address (``getaddrinfo returns an empty list``).
    """
    host, port = address
    if only_ports is not None and port not in only_ports:
        if timeout is None:
            sock: socket.socket = gsocket.create_connection(address, source_address=source_address)
        else:
            sock = gsocket.create_connection(address, timeout, source_address)
        return sock
    last_error: OSError | None = None
    for family, socktype, proto, _canonname, sockaddr in gsocket.getaddrinfo(
        host, port, socket.AF_INET, socket.SOCK_STREAM
    ):
        sock = gsocket.socket(family, socktype, proto)
        try:
            if timeout is not None:
                sock.settimeout(timeout)
            if source_address is not None:
                sock.bind(source_address)
            sock.connect(sockaddr)
        except OSError as exc:
            sock.close()
            last_error = exc
            continue
        return sock
    if last_error is None:
        raise OSError("getaddrinfo returns an empty list")
    try:
        raise last_error
    finally:
        last_error = None  # break the frame <-> traceback reference cycle


def build_ipv4_socket_creator(
    only_ports: Container[int] | None = None,
) -> Callable[..., socket.socket]:
    """Return a ``create_connection``-like function that connects over IPv4.

    Pass the result as ``socket_creator=`` to the SMTP relays.

    :param only_ports: As for :func:`create_connection_ipv4`, e.g. ``[25]`` to
        keep submission ports dual-stack.
    :returns: A function ``(address, timeout=None, source_address=None)``
        calling :func:`create_connection_ipv4`.
    """

    def create_connection(
        address: tuple[str, int],
        timeout: float | None = None,
        source_address: tuple[str, int] | None = None,
    ) -> socket.socket:
        return create_connection_ipv4(address, timeout, source_address, only_ports)

    return create_connection
