"""``create_connection`` with a fast path for IP address literals.

:func:`gevent.socket.create_connection` resolves every host, an address
literal included, on gevent's resolver, which by default runs
``getaddrinfo`` on a thread of the hub's pool: a thread hand-off per
connection. A relay to ``127.0.0.1`` or any configured address pays it for
nothing; this module connects to literals directly.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

from gevent import socket as gsocket

__all__ = ["create_connection"]

_DEFAULT: Any = socket._GLOBAL_DEFAULT_TIMEOUT  # type: ignore[attr-defined]


def create_connection(
    address: tuple[str, int],
    timeout: Any = _DEFAULT,
    source_address: tuple[str, int] | None = None,
    **kwargs: Any,
) -> socket.socket:
    """Connect to *address* as :func:`gevent.socket.create_connection` does.

    A host that is an IPv4 or IPv6 address literal is connected to without
    asking the resolver; any other host is passed on unchanged.
    """
    host, port = address[0], address[1]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        sock: socket.socket = gsocket.create_connection(address, timeout, source_address, **kwargs)
        return sock
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    sock = gsocket.socket(family, socket.SOCK_STREAM)
    try:
        if timeout is not _DEFAULT:
            sock.settimeout(timeout)
        if source_address is not None:
            sock.bind(source_address)
        sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return sock
