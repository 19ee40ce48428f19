"""This host's name, as servers and bounces state it by default."""

from __future__ import annotations

import functools
import socket

__all__ = ["local_fqdn"]


@functools.cache
def local_fqdn() -> str:
    """This host's fully qualified domain name, looked up once per process
    (:func:`socket.getfqdn` can cost a DNS query)."""
    return socket.getfqdn()
