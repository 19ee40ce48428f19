"""Look up the PTR name of an IP address in the background.

The SMTP edge starts a :class:`PtrLookup` of the client's address when a
session begins, and collects the result (with a bound on the wait) when it
builds the first envelope::

    lookup = PtrLookup("192.0.2.1")
    lookup.start()
    ...                                   # the session goes on meanwhile
    hostname = lookup.finish(runtime=5.0)  # at most 5 s after start()

Lookups go through :meth:`DNSResolver.query_cached
<slimta.util.dns.DNSResolver.query_cached>`, so many connections from one
address cost one query per TTL.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import gevent
import pycares

from slimta import logging as slogging
from slimta.util.dns import DNSError, DNSResolver, reverse_name

__all__ = ["PtrLookup"]

log = logging.getLogger(__name__)

#: DNS errors that mean "this address has no PTR name": not worth a log line.
_NO_NAME = frozenset(
    {
        pycares.errno.ARES_ENOTFOUND,
        pycares.errno.ARES_ENODATA,
        pycares.errno.ARES_EBADNAME,
    }
)


def _first_name(records: list[Any]) -> str | None:
    for record in records:
        if record.name:
            hostname: str = record.name
            return hostname
    return None


class PtrLookup(gevent.Greenlet):  # type: ignore[misc]
    """A greenlet whose value is the PTR hostname of *ip*, or ``None``.

    The hostname has no trailing dot. NXDOMAIN, NODATA and invalid
    addresses give ``None`` quietly; other DNS failures (timeouts, SERVFAIL)
    and unexpected errors give ``None`` too, and are logged.

    :param ip: an IPv4 or IPv6 address, as text.
    """

    def __init__(self, ip: str) -> None:
        super().__init__()
        #: The address looked up.
        self.ip = ip
        #: :func:`time.monotonic` when :meth:`start` was called, else ``None``.
        self.start_time: float | None = None

    @classmethod
    def from_getpeername(cls, sock: Any) -> tuple[PtrLookup, int | None]:
        """A lookup of the remote address of a connected socket.

        :returns: ``(lookup, port)``; not started.
        """
        return cls._from_address(sock.getpeername())

    @classmethod
    def from_getsockname(cls, sock: Any) -> tuple[PtrLookup, int | None]:
        """A lookup of the local address of a socket.

        :returns: ``(lookup, port)``; not started.
        """
        return cls._from_address(sock.getsockname())

    @classmethod
    def _from_address(cls, address: Any) -> tuple[PtrLookup, int | None]:
        if isinstance(address, tuple) and len(address) >= 2:
            return cls(str(address[0])), int(address[1])
        # An AF_UNIX path: the lookup will find nothing.
        return cls(str(address)), None

    @staticmethod
    def cached(ip: str) -> tuple[bool, str | None]:
        """The PTR hostname of *ip* if the DNS cache already knows it.

        :returns: ``(True, hostname or None)`` when the cache has a fresh
            answer, positive or negative, or *ip* is not an address;
            ``(False, None)`` when a lookup is needed.

        .. versionadded:: 4.0
           Lets the edge skip the greenlet for repeated clients.
        """
        try:
            value = DNSResolver.cache.peek(reverse_name(ip), pycares.QUERY_TYPE_PTR)
        except ValueError:
            return True, None
        if value is None:
            return False, None
        if isinstance(value, int):
            return True, None
        return True, _first_name(value)

    def start(self) -> None:
        """Record the start time and schedule the lookup."""
        self.start_time = time.monotonic()
        super().start()

    def _run(self) -> str | None:
        try:
            name = reverse_name(self.ip)
            records = DNSResolver.query_cached(name, pycares.QUERY_TYPE_PTR).get()
        except ValueError:
            return None
        except DNSError as exc:
            if exc.errno not in _NO_NAME:
                slogging.logline(log.info, "ptr", self.ip, "lookup_failed", error=str(exc))
            return None
        except Exception:
            slogging.log_exception(__name__)
            return None
        return _first_name(records)

    def finish(self, runtime: float | None = None) -> str | None:
        """The hostname found, ending the lookup.

        :param runtime: with ``None``, return at once, with the hostname only
            if the lookup already ended. Otherwise wait until the lookup ends
            or until *runtime* seconds have passed since :meth:`start`,
            whichever is first.
        :returns: the hostname, or ``None``.

        The greenlet is killed afterwards if it is still running.

        .. versionchanged:: 4.0
           *runtime* bounds the total time since :meth:`start`; 4.0 waited
           for as long again as had already passed.
        """
        try:
            if runtime is not None and not self.ready() and self.start_time is not None:
                remaining = self.start_time + runtime - time.monotonic()
                if remaining > 0:
                    self.join(remaining)
            value = self.value if self.ready() else None
            # A killed greenlet's value is the GreenletExit.
            return value if isinstance(value, str) else None
        finally:
            if not self.ready():
                self.kill(block=False)
