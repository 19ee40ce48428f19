"""DNS queries for gevent programs, through `pycares <https://github.com/saghul/pycares>`_.

Every lookup slimta makes (MX records for relaying, PTR names for the
edge) goes through :class:`DNSResolver`::

    from slimta.util.dns import DNSError, DNSResolver

    try:
        records = DNSResolver.query("example.com", "MX").get(timeout=10.0)
    except DNSError as exc:
        if exc.errno == pycares.errno.ARES_ENOTFOUND:  # NXDOMAIN
            ...
    hosts = [rec.host for rec in sorted(records, key=lambda r: r.priority)]

:meth:`DNSResolver.query` returns a :class:`gevent.event.AsyncResult` whose
value is a list of records carrying the attribute names of python-slimta 4.0
(pycares 1-3): see :class:`MxRecord`, :class:`ARecord`, :class:`TxtRecord`,
:class:`PtrRecord` and the others. Failures raise :class:`DNSError` from
``get()``; its :attr:`~DNSError.errno` compares equal to the
``pycares.errno.ARES_*`` numbers (``ARES_ENOTFOUND`` for NXDOMAIN,
``ARES_ENODATA`` for a name without records of that type, ``ARES_ESERVFAIL``,
``ARES_ETIMEOUT``, ``ARES_ECONNREFUSED`` ...).

Configuration
-------------

By default the channel reads ``/etc/resolv.conf``. Point it elsewhere with
:meth:`DNSResolver.configure`, which replaces the channel and empties the
cache::

    previous = DNSResolver.configure(servers=["127.0.0.1:5353"], timeout=1.0, tries=1)
    ...
    DNSResolver.configure(**previous)  # back to the previous settings

A ``pycares.Channel`` of your own may also be assigned to
:attr:`DNSResolver.channel` before the first query, as in 4.0.

Caching
-------

:meth:`DNSResolver.query` asks the channel every time, as in 4.0 (c-ares
keeps a small answer cache of its own). Callers that want answers kept by TTL
use :meth:`DNSResolver.query_cached` (same arguments, same result), backed by
the :class:`DNSCache` in :attr:`DNSResolver.cache`:

* answers are kept until the smallest TTL among their records runs out
  (at most :attr:`DNSCache.max_ttl`; a TTL of 0 is not kept);
* NXDOMAIN and NODATA are kept for :attr:`DNSCache.negative_ttl` seconds;
  other failures (SERVFAIL, timeouts, refused) are never kept;
* concurrent identical queries share one lookup;
* :attr:`DNSCache.lookups` counts the queries actually sent, and
  :attr:`DNSCache.hits` those answered from the cache.

How it runs
-----------

The channel is driven from the gevent hub without any thread: c-ares tells
us which sockets it uses (``sock_state_cb``), one ``hub.loop.io`` watcher per
socket calls ``Channel.process_fd`` when it is ready, and one timer calls it
for c-ares' own timeouts and retries. Answers are therefore handled in the
hub, and nothing ever blocks it (``Channel.wait()`` would). A channel
assigned by hand that runs c-ares' event thread instead (any
``pycares.Channel`` made without ``sock_state_cb``) also works: its answers
are passed to the hub through an async watcher. The resolver belongs to the
hub of the thread that first uses it.

.. versionchanged:: 4.0
   Built on pycares 5: records are converted back to the 4.0 attribute
   names, the channel is driven without a thread, and :meth:`DNSResolver.query`
   accepts record type names (``'MX'``) as well as ``pycares.QUERY_TYPE_*``.
   :meth:`~DNSResolver.query_cached`, :class:`DNSCache`,
   :meth:`~DNSResolver.configure` and :func:`reverse_name` are new.

DNSSEC
------

c-ares does not report whether an answer was validated. For DANE,
:class:`TrustedResolver` asks a validating resolver directly (dnspython
messages over gevent sockets) and returns each answer with its AD bit as a
:class:`SecureAnswer`::

    resolver = TrustedResolver(["127.0.0.1"])   # a local validating resolver
    answer = resolver.query("_25._tcp.mx.example.com", "TLSA")
    if answer.authenticated and answer.records:
        ...

The AD bit is only as trustworthy as the resolver and the path to it: use
one on this host or on a trusted network.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import gevent
import pycares
from gevent import socket as gsocket
from gevent.event import AsyncResult
from gevent.monkey import get_original

__all__ = [
    "ARecord",
    "AaaaRecord",
    "CaaRecord",
    "CnameRecord",
    "DNSCache",
    "DNSError",
    "DNSResolver",
    "MxRecord",
    "NaptrRecord",
    "NsRecord",
    "PtrRecord",
    "SecureAnswer",
    "SoaRecord",
    "SrvRecord",
    "TlsaRecord",
    "TrustedResolver",
    "TxtRecord",
    "reverse_name",
]

_log = logging.getLogger(__name__)

# Answers from an event-thread channel arrive on a c-ares thread; these are
# the real (never monkey-patched) primitives used to pass them to the hub.
_thread_ident: Callable[[], int] = get_original("_thread", "get_ident")
_SimpleQueue: Any = get_original("queue", "SimpleQueue")

#: Longest wait of the timer that lets c-ares handle its timeouts; c-ares
#: gives an earlier time whenever a query needs one.
_MAX_TIMER = 1.0
#: Shortest wait of that timer, so a due timeout cannot spin the hub.
_MIN_TIMER = 0.001

_BAD_FD: int = pycares.ARES_SOCKET_BAD
_EV_READ = 1
_EV_WRITE = 2


class DNSError(Exception):
    """A DNS query failed.

    :param errno: the pycares error number, e.g.
        ``pycares.errno.ARES_ENOTFOUND``.

    The message is ``"<description> [<ARES_NAME>]"``.
    """

    def __init__(self, errno: int) -> None:
        name = pycares.errno.errorcode.get(errno, "ARES_EUNKNOWN")
        text = pycares.errno.strerror(errno)
        if isinstance(text, bytes):
            text = text.decode("ascii", "replace")
        super().__init__(f"{text} [{name}]")
        #: The pycares error number: ``ARES_ENOTFOUND`` for NXDOMAIN,
        #: ``ARES_ENODATA`` when the name has no record of the type,
        #: ``ARES_ESERVFAIL``, ``ARES_ETIMEOUT``, ``ARES_ECONNREFUSED`` ...
        self.errno = errno


# Records -------------------------------------------------------------------
#
# pycares 5 returns ``DNSRecord(name, type, record_class, ttl, data)`` with
# a dataclass per type; python-slimta 4.0 code (and its users) read the flat
# objects of pycares 1-3. These keep those names, with the pycares 5 ones as
# aliases where they differ.


@dataclass(frozen=True, slots=True)
class MxRecord:
    """An MX record. A null MX (RFC 7505, ``0 .``) has ``host == ''``."""

    #: Mail exchanger name, without the trailing dot.
    host: str
    #: Preference: lower is tried first.
    priority: int
    ttl: int
    type: ClassVar[str] = "MX"

    @property
    def exchange(self) -> str:
        """pycares 5's name for :attr:`host`."""
        return self.host


@dataclass(frozen=True, slots=True)
class ARecord:
    """An A record."""

    #: The IPv4 address, as text.
    host: str
    ttl: int
    type: ClassVar[str] = "A"

    @property
    def addr(self) -> str:
        """pycares 5's name for :attr:`host`."""
        return self.host


@dataclass(frozen=True, slots=True)
class AaaaRecord:
    """An AAAA record."""

    #: The IPv6 address, as text.
    host: str
    ttl: int
    type: ClassVar[str] = "AAAA"

    @property
    def addr(self) -> str:
        """pycares 5's name for :attr:`host`."""
        return self.host


@dataclass(frozen=True, slots=True)
class TxtRecord:
    """A TXT record; its character-strings are joined into one."""

    #: The text, decoded as UTF-8 (invalid bytes replaced).
    text: str
    #: The raw bytes.
    data: bytes
    ttl: int
    type: ClassVar[str] = "TXT"


@dataclass(frozen=True, slots=True)
class PtrRecord:
    """A PTR record."""

    #: The name pointed to, without the trailing dot.
    name: str
    ttl: int
    #: Kept for 4.0 code; always empty (each name is a record of its own).
    aliases: tuple[str, ...] = ()
    type: ClassVar[str] = "PTR"

    @property
    def dname(self) -> str:
        """pycares 5's name for :attr:`name`."""
        return self.name


@dataclass(frozen=True, slots=True)
class CnameRecord:
    """A CNAME record."""

    #: The canonical name, without the trailing dot.
    cname: str
    ttl: int
    type: ClassVar[str] = "CNAME"


@dataclass(frozen=True, slots=True)
class NsRecord:
    """An NS record."""

    #: The name server's name, without the trailing dot.
    host: str
    ttl: int
    type: ClassVar[str] = "NS"


@dataclass(frozen=True, slots=True)
class SrvRecord:
    """An SRV record."""

    host: str
    port: int
    priority: int
    weight: int
    ttl: int
    type: ClassVar[str] = "SRV"


@dataclass(frozen=True, slots=True)
class SoaRecord:
    """An SOA record (pycares 1-3 attribute names)."""

    nsname: str
    hostmaster: str
    serial: int
    refresh: int
    retry: int
    expires: int
    minttl: int
    ttl: int
    type: ClassVar[str] = "SOA"


@dataclass(frozen=True, slots=True)
class CaaRecord:
    """A CAA record (pycares 1-3 attribute names)."""

    critical: int
    property: str
    value: str
    ttl: int
    type: ClassVar[str] = "CAA"


@dataclass(frozen=True, slots=True)
class NaptrRecord:
    """A NAPTR record (pycares 1-3 attribute names)."""

    order: int
    preference: int
    flags: str
    service: str
    regex: str
    replacement: str
    ttl: int
    type: ClassVar[str] = "NAPTR"


@dataclass(frozen=True, slots=True)
class TlsaRecord:
    """A TLSA record (RFC 6698), for DANE.

    The fields have pycares 5's names; :attr:`usage`, :attr:`mtype` and
    :attr:`cert` give dnspython's.
    """

    cert_usage: int
    selector: int
    matching_type: int
    cert_association_data: bytes
    ttl: int
    type: ClassVar[str] = "TLSA"

    @property
    def usage(self) -> int:
        return self.cert_usage

    @property
    def mtype(self) -> int:
        return self.matching_type

    @property
    def cert(self) -> bytes:
        return self.cert_association_data


def _text(value: str | bytes) -> str:
    # pycares gives str when the value is ASCII and bytes otherwise.
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def _name(value: str | bytes) -> str:
    return _text(value).rstrip(".")


def _mx(ttl: int, d: Any) -> MxRecord:
    return MxRecord(_name(d.exchange), d.priority, ttl)


def _a(ttl: int, d: Any) -> ARecord:
    return ARecord(_text(d.addr), ttl)


def _aaaa(ttl: int, d: Any) -> AaaaRecord:
    return AaaaRecord(_text(d.addr), ttl)


def _txt(ttl: int, d: Any) -> TxtRecord:
    data = bytes(d.data)
    return TxtRecord(data.decode("utf-8", "replace"), data, ttl)


def _ptr(ttl: int, d: Any) -> PtrRecord:
    return PtrRecord(_name(d.dname), ttl)


def _cname(ttl: int, d: Any) -> CnameRecord:
    return CnameRecord(_name(d.cname), ttl)


def _ns(ttl: int, d: Any) -> NsRecord:
    return NsRecord(_name(d.nsdname), ttl)


def _srv(ttl: int, d: Any) -> SrvRecord:
    return SrvRecord(_name(d.target), d.port, d.priority, d.weight, ttl)


def _soa(ttl: int, d: Any) -> SoaRecord:
    return SoaRecord(
        _name(d.mname), _name(d.rname), d.serial, d.refresh, d.retry, d.expire, d.minimum, ttl
    )


def _caa(ttl: int, d: Any) -> CaaRecord:
    return CaaRecord(d.critical, _text(d.tag), _text(d.value), ttl)


def _naptr(ttl: int, d: Any) -> NaptrRecord:
    return NaptrRecord(
        d.order,
        d.preference,
        _text(d.flags),
        _text(d.service),
        _text(d.regexp),
        _name(d.replacement),
        ttl,
    )


def _tlsa(ttl: int, d: Any) -> TlsaRecord:
    return TlsaRecord(
        d.cert_usage, d.selector, d.matching_type, bytes(d.cert_association_data), ttl
    )


#: Record type -> converter from pycares 5 record data. Other types (HTTPS,
#: URI) are returned as pycares' own ``DNSRecord`` objects.
_CONVERTERS: dict[int, Callable[[int, Any], Any]] = {
    pycares.QUERY_TYPE_MX: _mx,
    pycares.QUERY_TYPE_A: _a,
    pycares.QUERY_TYPE_AAAA: _aaaa,
    pycares.QUERY_TYPE_TXT: _txt,
    pycares.QUERY_TYPE_PTR: _ptr,
    pycares.QUERY_TYPE_CNAME: _cname,
    pycares.QUERY_TYPE_NS: _ns,
    pycares.QUERY_TYPE_SRV: _srv,
    pycares.QUERY_TYPE_SOA: _soa,
    pycares.QUERY_TYPE_CAA: _caa,
    pycares.QUERY_TYPE_NAPTR: _naptr,
    pycares.QUERY_TYPE_TLSA: _tlsa,
}

#: Record type names accepted by :meth:`DNSResolver.query`.
_QUERY_TYPES: dict[str, int] = {
    name[len("QUERY_TYPE_") :]: getattr(pycares, name)
    for name in dir(pycares)
    if name.startswith("QUERY_TYPE_")
}


def _query_type(query_type: int | str) -> int:
    if isinstance(query_type, str):
        try:
            return _QUERY_TYPES[query_type.upper()]
        except KeyError:
            raise ValueError(f"unknown DNS query type: {query_type!r}") from None
    if query_type not in _QUERY_TYPES.values():
        raise ValueError(f"unknown DNS query type: {query_type!r}")
    return query_type


def _records(result: Any, query_type: int) -> list[Any]:
    """The answers of type *query_type* in a pycares 5 ``DNSResult``.

    The answer section also holds the CNAME records that led to the name
    (pycares 1-3 left them out), so only records of the type asked for stay,
    unless ANY was asked for.
    """
    records = []
    for rec in result.answer:
        if rec.type != query_type and query_type != pycares.QUERY_TYPE_ANY:
            continue
        convert = _CONVERTERS.get(rec.type)
        records.append(convert(rec.ttl, rec.data) if convert is not None else rec)
    return records


@functools.lru_cache(maxsize=4096)
def reverse_name(ip: str) -> str:
    """The PTR query name of an IP address, without a trailing dot.

    ``'192.0.2.1'`` gives ``'1.2.0.192.in-addr.arpa'``; IPv6 addresses give
    their ``ip6.arpa`` name, and IPv4-mapped ones (``::ffff:192.0.2.1``) the
    IPv4 name. A zone index (``fe80::1%eth0``) is ignored.

    Answers are remembered (4096 addresses): the edge asks for every
    connection, mostly from the same clients.

    :raises ValueError: *ip* is not an IP address.
    """
    addr = ipaddress.ip_address(ip.partition("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.reverse_pointer


class _HubDriver:
    """Runs one pycares channel from a gevent hub, without threads.

    c-ares reports each socket it opens or closes through the channel's
    ``sock_state_cb``; each gets an io watcher that calls ``process_fd``.
    A timer calls ``process_fd`` with no socket for c-ares' timeouts and
    retries while queries are pending, and only then: an idle channel
    keeps nothing scheduled, and its watchers do not keep the loop alive.
    """

    def __init__(self, options: dict[str, Any]) -> None:
        self.loop = gevent.get_hub().loop
        self.watchers: dict[int, Any] = {}
        self.timer: Any = None
        self.deadline = 0.0
        self.pending = 0
        self.closed = False
        self.channel: Any = pycares.Channel(sock_state_cb=self._sock_state, **options)

    def _sock_state(self, fd: int, readable: bool, writable: bool) -> None:
        # When the channel is destroyed (on pycares' shutdown thread), c-ares
        # reports its sockets closed: the watchers are already gone.
        if self.closed:
            return
        old = self.watchers.pop(fd, None)
        if old is not None:
            old.stop()
        events = (_EV_READ if readable else 0) | (_EV_WRITE if writable else 0)
        if events:
            watcher = self.loop.io(fd, events)
            watcher.ref = False
            watcher.start(self._io_ready, fd, pass_events=True)
            self.watchers[fd] = watcher

    def _io_ready(self, events: int, fd: int) -> None:
        read_fd = fd if events & _EV_READ else _BAD_FD
        write_fd = fd if events & _EV_WRITE else _BAD_FD
        self.channel.process_fd(read_fd, write_fd)
        if self.pending <= 0:
            self._stop_timer()
        elif self.timer is None:
            self._arm_timer()

    def _timer_fired(self) -> None:
        self.timer = None
        if self.closed:
            return
        self.channel.process_fd(_BAD_FD, _BAD_FD)
        if self.pending > 0:
            self._arm_timer()

    def _arm_timer(self) -> None:
        """Wake at c-ares' next timeout, unless already waking earlier."""
        delay = max(self.channel.timeout(_MAX_TIMER), _MIN_TIMER)
        deadline = self.loop.now() + delay
        if self.timer is not None:
            if self.deadline <= deadline:
                return
            self.timer.stop()
        # A referenced timer: it keeps the loop alive while queries wait.
        self.timer = self.loop.timer(delay)
        self.timer.start(self._timer_fired)
        self.deadline = deadline

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.stop()
            self.timer = None

    def query(self, name: str | bytes, query_type: int, callback: Callable[..., None]) -> None:
        self.pending += 1

        def done(result: Any, error: int | None) -> None:
            self.pending -= 1
            callback(result, error)

        try:
            self.channel.query(name, query_type, callback=done)
        except BaseException:
            self.pending -= 1
            raise
        if self.pending > 0:
            self._arm_timer()

    def detach(self) -> None:
        """Stop watching the channel's sockets; ignore its later reports."""
        self.closed = True
        for watcher in self.watchers.values():
            watcher.stop()
        self.watchers.clear()
        self._stop_timer()

    def close(self) -> None:
        """Fail the pending queries (``ARES_ECANCELLED``) and release the channel."""
        if self.closed:
            return
        # Cancel here, in the hub thread, so the callbacks run here too;
        # pycares destroys the channel on a thread of its own afterwards.
        self.channel.cancel()
        self.detach()
        self.channel.close()


class _ThreadInbox:
    """Hands answers from a c-ares event thread to the hub (async watcher)."""

    def __init__(self) -> None:
        hub = gevent.get_hub()
        self.hub_thread: int = hub.thread_ident
        self.items: Any = _SimpleQueue()
        self.pending = 0
        self.watcher = hub.loop.async_()
        self.watcher.ref = False
        self.watcher.start(self._drain)

    def query(
        self,
        channel: Any,
        name: str | bytes,
        query_type: int,
        callback: Callable[[Any, int | None], None],
    ) -> None:
        def deliver(result: Any, error: int | None) -> None:
            if _thread_ident() == self.hub_thread:
                self._run(callback, result, error)
            else:
                self.items.put((callback, result, error))
                self.watcher.send()

        self.pending += 1
        # Keep the loop alive while answers are due from the other thread.
        self.watcher.ref = True
        try:
            channel.query(name, query_type, callback=deliver)
        except BaseException:
            self._settled()
            raise

    def _settled(self) -> None:
        self.pending -= 1
        if self.pending <= 0:
            self.watcher.ref = False

    def _run(self, callback: Callable[[Any, int | None], None], result: Any, error: Any) -> None:
        self._settled()
        callback(result, error)

    def _drain(self) -> None:
        items = self.items
        while not items.empty():
            self._run(*items.get_nowait())


def _complete(ar: AsyncResult, query_type: int) -> Callable[[Any, int | None], None]:
    def callback(result: Any, error: int | None) -> None:
        if error is not None:
            ar.set_exception(DNSError(error))
            return
        try:
            records = _records(result, query_type)
        except Exception as exc:  # a record pycares could not give us
            ar.set_exception(exc)
            return
        if records:
            ar.set(records)
        else:
            # Only CNAMEs came back: the name at the end has no such record.
            ar.set_exception(DNSError(pycares.errno.ARES_ENODATA))

    return callback


class DNSResolver:
    """The process-wide DNS resolver; used through its class methods.

    :attr:`channel` is made on first use from the settings given to
    :meth:`configure` (by default, the system's resolver configuration).
    """

    #: The ``pycares.Channel`` queries go to; ``None`` until first used. A
    #: channel of your own may be assigned before use, as in 4.0.
    channel: ClassVar[Any] = None
    #: The cache behind :meth:`query_cached`.
    cache: ClassVar[DNSCache]

    _options: ClassVar[dict[str, Any]] = {}
    _driver: ClassVar[_HubDriver | None] = None
    _inbox: ClassVar[_ThreadInbox | None] = None

    @classmethod
    def query(cls, name: str | bytes, query_type: int | str) -> AsyncResult:
        """Start a DNS query; no caching beyond c-ares' own.

        :param name: the domain name, e.g. ``'example.com'``.
        :param query_type: ``pycares.QUERY_TYPE_MX`` or a type name such as
            ``'MX'``, ``'A'``, ``'AAAA'``, ``'TXT'``, ``'PTR'``, ``'CNAME'``,
            ``'TLSA'``.
        :returns: an :class:`~gevent.event.AsyncResult` whose value is the
            list of records of that type (see the record classes of this
            module); ``get()`` raises :class:`DNSError` when the query fails.
        :raises ValueError: unknown *query_type*.
        """
        qtype = _query_type(query_type)
        ar = AsyncResult()
        callback = _complete(ar, qtype)
        try:
            channel = cls.channel
            driver = cls._driver
            if channel is None:
                driver = cls._driver = _HubDriver(cls._options)
                channel = cls.channel = driver.channel
            if driver is not None and driver.channel is channel:
                driver.query(name, qtype, callback)
            else:
                inbox = cls._inbox
                if inbox is None:
                    inbox = cls._inbox = _ThreadInbox()
                inbox.query(channel, name, qtype, callback)
        except pycares.AresError as exc:
            errno = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
            ar.set_exception(DNSError(errno if errno is not None else pycares.errno.ARES_EBADQUERY))
        except UnicodeError:
            # A name IDNA cannot encode.
            ar.set_exception(DNSError(pycares.errno.ARES_EBADNAME))
        return ar

    @classmethod
    def query_cached(cls, name: str, query_type: int | str) -> AsyncResult:
        """Like :meth:`query`, answered from :attr:`cache` when possible.

        See :meth:`DNSCache.query`.
        """
        return cls.cache.query(name, query_type)

    @classmethod
    def configure(
        cls,
        *,
        servers: list[str] | None = None,
        timeout: float | None = None,
        tries: int | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        """Replace the channel with one made from these settings.

        The current channel, if this class made it, is closed: its pending
        queries fail with ``ARES_ECANCELLED``. The new channel is made on
        the next query; the :attr:`cache` is emptied. With no arguments the
        system's configuration (``/etc/resolv.conf``) applies again.

        :param servers: name servers, ``'ip'`` or ``'ip:port'`` strings.
        :param timeout: seconds c-ares waits for the first answer of a try
            (later tries wait longer; c-ares also adapts it to the server's
            observed latency, so it is an upper bound for the first try).
        :param tries: tries per server.
        :param options: other ``pycares.Channel`` keyword arguments
            (``rotate``, ``udp_port``, ``resolvconf_path`` ...), except
            ``sock_state_cb``.
        :returns: the previous settings, to restore them with
            ``DNSResolver.configure(**previous)``.
        """
        if "sock_state_cb" in options:
            raise TypeError("sock_state_cb is set by DNSResolver")
        new = dict(options)
        if servers is not None:
            new["servers"] = list(servers)
        if timeout is not None:
            new["timeout"] = timeout
        if tries is not None:
            new["tries"] = tries
        previous = dict(cls._options)
        cls._close()
        cls._options = new
        cls.cache.clear()
        return previous

    @classmethod
    def _close(cls) -> None:
        # A channel assigned by hand is not ours to close: it is only dropped.
        driver = cls._driver
        cls._driver = None
        cls.channel = None
        if driver is not None:
            driver.close()

    @classmethod
    def _forget_after_fork(cls) -> None:
        # The child shares the parent's c-ares sockets: start afresh, leaving
        # the parent's channel alone.
        driver = cls._driver
        if driver is not None:
            driver.detach()
            if cls.channel is driver.channel:
                cls.channel = None
        cls._driver = None
        cls._inbox = None
        cls.cache._after_fork()


class DNSCache:
    """Keeps DNS answers by TTL and merges identical concurrent queries.

    :param query: the function that sends a query, with the signature and
        result of :meth:`DNSResolver.query` (the default).
    :param clock: seconds, monotonic; inject one in tests.
    :param negative_ttl: seconds to keep NXDOMAIN (``ARES_ENOTFOUND``) and
        NODATA (``ARES_ENODATA``) answers.
    :param max_ttl: the longest time any answer is kept, in seconds.
    :param max_entries: how many answers are kept at most; expired ones,
        then the oldest, make room.
    """

    def __init__(
        self,
        query: Callable[[str, int], AsyncResult] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        negative_ttl: float = 60.0,
        max_ttl: float = 86400.0,
        max_entries: int = 10000,
    ) -> None:
        self._query = query
        self.clock = clock
        #: Seconds NXDOMAIN and NODATA answers are kept.
        self.negative_ttl = negative_ttl
        #: Longest time, in seconds, any answer is kept.
        self.max_ttl = max_ttl
        #: Most answers kept at once.
        self.max_entries = max_entries
        #: Queries sent to the resolver (cache misses not joined to one in flight).
        self.lookups = 0
        #: Queries answered from the cache, records or NXDOMAIN/NODATA.
        self.hits = 0
        #: Queries that waited for an identical one already in flight.
        self.joined = 0
        # key -> (expiry, records or the errno of a negative answer)
        self._entries: dict[tuple[str, int], tuple[float, list[Any] | int]] = {}
        # key -> the callers' AsyncResults waiting for the lookup in flight
        self._waiting: dict[tuple[str, int], list[AsyncResult]] = {}
        self._generation = 0

    def peek(self, name: str, query_type: int | str) -> list[Any] | int | None:
        """The answer kept for *name*, without a lookup and without waiting.

        :returns: a new list of records; the errno (``ARES_ENOTFOUND`` or
            ``ARES_ENODATA``) of a negative answer kept; or ``None`` when
            nothing fresh is kept (then :meth:`query` looks it up).
        """
        entry = self._entries.get((name.rstrip(".").lower(), _query_type(query_type)))
        if entry is None or self.clock() >= entry[0]:
            return None
        self.hits += 1
        value = entry[1]
        return list(value) if isinstance(value, list) else value

    def query(self, name: str, query_type: int | str) -> AsyncResult:
        """Answer from the cache, or look *name* up once for every caller.

        :param name: the domain name; case and a trailing dot do not matter.
        :param query_type: as for :meth:`DNSResolver.query`.
        :returns: a new :class:`~gevent.event.AsyncResult` per call, with the
            same value or exception as :meth:`DNSResolver.query` (a fresh
            list each time, so callers may sort it in place).
        """
        qtype = _query_type(query_type)
        key = (name.rstrip(".").lower(), qtype)
        ar = AsyncResult()
        entry = self._entries.get(key)
        if entry is not None:
            expiry, value = entry
            if self.clock() < expiry:
                self.hits += 1
                if isinstance(value, list):
                    ar.set(list(value))
                else:
                    ar.set_exception(DNSError(value))
                return ar
            del self._entries[key]
        waiting = self._waiting.get(key)
        if waiting is not None:
            self.joined += 1
            waiting.append(ar)
            return ar
        waiting = self._waiting[key] = [ar]
        generation = self._generation
        self.lookups += 1
        send = self._query if self._query is not None else DNSResolver.query
        lookup = send(key[0], qtype)
        lookup.rawlink(lambda done: self._answered(key, waiting, generation, done))
        return ar

    def _answered(
        self, key: tuple[str, int], waiters: list[AsyncResult], generation: int, done: AsyncResult
    ) -> None:
        if self._waiting.get(key) is waiters:
            del self._waiting[key]
        # After clear(), answers to the queries sent before it are not kept.
        keep = generation == self._generation
        if done.successful():
            records: list[Any] = done.value
            if keep:
                ttl = min((getattr(rec, "ttl", 0) for rec in records), default=0)
                self._keep(key, min(float(ttl), self.max_ttl), records)
            for ar in waiters:
                ar.set(list(records))
            return
        exc = done.exception
        if (
            keep
            and isinstance(exc, DNSError)
            and exc.errno in (pycares.errno.ARES_ENOTFOUND, pycares.errno.ARES_ENODATA)
        ):
            self._keep(key, min(self.negative_ttl, self.max_ttl), exc.errno)
        for ar in waiters:
            # A fresh exception per caller: each get() adds its own traceback.
            ar.set_exception(DNSError(exc.errno) if isinstance(exc, DNSError) else exc)

    def _keep(self, key: tuple[str, int], ttl: float, value: list[Any] | int) -> None:
        if ttl <= 0 or self.max_entries <= 0:
            return
        now = self.clock()
        entries = self._entries
        if len(entries) >= self.max_entries:
            for old in [k for k, (expiry, _) in entries.items() if expiry <= now]:
                del entries[old]
            while len(entries) >= self.max_entries:
                del entries[next(iter(entries))]
        entries[key] = (now + ttl, value)

    def clear(self) -> None:
        """Forget every answer kept.

        Queries in flight still answer their callers, but are not kept, and
        later identical queries send a new lookup.
        """
        self._entries.clear()
        self._waiting.clear()
        self._generation += 1

    def __len__(self) -> int:
        return len(self._entries)

    def _after_fork(self) -> None:
        self._waiting.clear()
        self._generation += 1


DNSResolver.cache = DNSCache()

if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=DNSResolver._forget_after_fork)


# DNSSEC-validated answers ----------------------------------------------------
#
# c-ares (and so pycares) does not give the header flags of a response, and
# DANE (RFC 7672) needs the AD bit of the TLSA answer. TrustedResolver asks
# the resolver itself, with dnspython building and parsing the messages and
# gevent sockets carrying them, so that a lookup blocks only its greenlet,
# with or without monkey-patching. dnspython is imported on first use: it
# adds tens of milliseconds to the start of every program importing this.

#: EDNS payload size of TrustedResolver's queries (the DNS flag day value).
_EDNS_PAYLOAD = 1232

_ARES_REFUSED: int = getattr(pycares.errno, "ARES_EREFUSED", pycares.errno.ARES_ESERVFAIL)


@dataclass(frozen=True, slots=True)
class SecureAnswer:
    """What :meth:`TrustedResolver.query` found, and whether it is validated."""

    #: The records of the type asked for (the record classes of this
    #: module; TLSA records as :class:`TlsaRecord`); empty for NXDOMAIN or
    #: NODATA.
    records: tuple[Any, ...]
    #: The AD bit of the response: the resolver validated it with DNSSEC
    #: (for NXDOMAIN and NODATA: the denial is validated).
    authenticated: bool
    #: ``None`` for records, ``ARES_ENOTFOUND`` for NXDOMAIN, ``ARES_ENODATA``
    #: for NODATA.
    errno: int | None = None
    #: Seconds the answer is kept by the resolver's cache.
    ttl: float = 0.0


#: Record type names and numbers already seen -> numbers.
_RDTYPE_CODES: dict[int | str, int] = {}


def _rdtype_code(query_type: int | str) -> int:
    """The number of record type *query_type* (``'TLSA'`` or 52).

    :raises ValueError: an unknown type.
    """
    import dns.exception
    import dns.rdatatype

    try:
        if isinstance(query_type, str):
            code = int(dns.rdatatype.from_text(query_type))
        else:
            code = int(dns.rdatatype.RdataType.make(query_type))
    except (dns.exception.DNSException, ValueError):
        raise ValueError(f"unknown DNS query type: {query_type!r}") from None
    if len(_RDTYPE_CODES) < 1024:
        _RDTYPE_CODES[query_type] = code
    return code


def _server_address(server: str) -> tuple[str, int]:
    """``'192.0.2.1'``, ``'192.0.2.1:5353'``, ``'::1'`` or ``'[::1]:5353'``."""
    if server.startswith("["):
        host, _, port = server[1:].partition("]")
        return host, int(port[1:]) if port.startswith(":") else 53
    if server.count(":") == 1:
        host, _, port = server.partition(":")
        return host, int(port)
    return server, 53


def _system_nameservers() -> list[str]:
    """The name servers of ``/etc/resolv.conf`` (loopback when there are none)."""
    import dns.resolver

    try:
        servers = [str(ns) for ns in dns.resolver.Resolver(configure=True).nameservers]
    except Exception:  # no or unreadable resolv.conf: the local resolver
        servers = []
    return servers or ["127.0.0.1"]


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.partition("%")[0]).is_loopback
    except ValueError:
        return False


class TrustedResolver:
    """Asks a DNSSEC-validating resolver and reports its AD bit.

    The AD ("authentic data") bit only means something when the resolver
    validates DNSSEC itself *and* the path to it cannot be tampered with: use
    a validating resolver on this host (Unbound, BIND, Knot Resolver on
    ``127.0.0.1``) or on a trusted network. An attacker between this host and
    the resolver can set the bit at will. A warning is logged when a server
    given is not a loopback address.

    Queries ask for AD (RFC 6840 5.7) with EDNS; answers are kept by TTL;
    identical concurrent queries share one lookup. UDP first, TCP when the
    answer is truncated; each server is tried in turn, *tries* times.

    :param servers: ``'ip'`` or ``'ip:port'`` (``'[v6]:port'``) strings; by
        default the name servers of ``/etc/resolv.conf``.
    :param timeout: seconds to wait for each server's answer.
    :param tries: rounds over the servers.
    :param clock: seconds, monotonic; inject one in tests.
    :param negative_ttl: seconds NXDOMAIN and NODATA are kept when the
        response gives no SOA.
    :param max_ttl: the longest time any answer is kept.
    :param max_entries: how many answers are kept at most.

    .. versionadded:: 4.0
    """

    def __init__(
        self,
        servers: Sequence[str] | None = None,
        *,
        timeout: float = 3.0,
        tries: int = 2,
        clock: Callable[[], float] = time.monotonic,
        negative_ttl: float = 60.0,
        max_ttl: float = 3600.0,
        max_entries: int = 10000,
    ) -> None:
        names = list(servers) if servers is not None else _system_nameservers()
        #: ``(host, port)`` of each server, in the order they are tried.
        self.servers: list[tuple[str, int]] = [_server_address(s) for s in names]
        if not self.servers:
            raise ValueError("TrustedResolver needs at least one server")
        for host, port in self.servers:
            if not _is_loopback(host):
                _log.warning(
                    "DNSSEC answers from %s:%s are trusted: the path to it must be secure",
                    host,
                    port,
                )
        self.timeout = timeout
        self.tries = max(1, tries)
        self.clock = clock
        self.negative_ttl = negative_ttl
        self.max_ttl = max_ttl
        self.max_entries = max_entries
        #: Queries sent (cache misses).
        self.lookups = 0
        #: Queries answered from the cache.
        self.hits = 0
        self._entries: dict[tuple[str, int], tuple[float, SecureAnswer]] = {}
        self._waiting: dict[tuple[str, int], AsyncResult] = {}

    def query(self, name: str, query_type: int | str) -> SecureAnswer:
        """The answer for *name* and *query_type*, from the cache or the servers.

        Blocks the calling greenlet only.

        :param name: the domain name; case and a trailing dot do not matter.
        :param query_type: a type name (``'TLSA'``, ``'A'``) or number.
        :returns: a :class:`SecureAnswer`; NXDOMAIN and NODATA are answers
            too (with :attr:`~SecureAnswer.errno` set).
        :raises DNSError: no server answered (``ARES_ETIMEOUT``,
            ``ARES_ECONNREFUSED``) or each failed (``ARES_ESERVFAIL``: a
            validating resolver's answer to bogus data, ``ARES_EREFUSED``,
            ``ARES_EBADRESP``).
        :raises ValueError: unknown *query_type*.
        """
        code = _RDTYPE_CODES.get(query_type)
        if code is None:
            code = _rdtype_code(query_type)
        key = (name.rstrip(".").lower(), code)
        entry = self._entries.get(key)
        if entry is not None:
            if self.clock() < entry[0]:
                self.hits += 1
                return entry[1]
            del self._entries[key]
        waiting = self._waiting.get(key)
        if waiting is not None:
            answer: SecureAnswer = waiting.get()
            return answer
        ar = self._waiting[key] = AsyncResult()
        self.lookups += 1
        try:
            answer = self._resolve(key[0], code)
        except BaseException as exc:
            # A killed lookup fails the others with ARES_ECANCELLED, not with
            # this greenlet's exception.
            errno = exc.errno if isinstance(exc, DNSError) else pycares.errno.ARES_ECANCELLED
            ar.set_exception(DNSError(errno))
            raise
        else:
            ar.set(answer)
            self._keep(key, answer)
            return answer
        finally:
            if self._waiting.get(key) is ar:
                del self._waiting[key]

    def clear(self) -> None:
        """Forget every answer kept."""
        self._entries.clear()

    def _keep(self, key: tuple[str, int], answer: SecureAnswer) -> None:
        ttl = min(answer.ttl, self.max_ttl)
        if ttl <= 0 or self.max_entries <= 0:
            return
        now = self.clock()
        entries = self._entries
        if len(entries) >= self.max_entries:
            for old in [k for k, (expiry, _) in entries.items() if expiry <= now]:
                del entries[old]
            while len(entries) >= self.max_entries:
                del entries[next(iter(entries))]
        entries[key] = (now + ttl, answer)

    def _resolve(self, name: str, code: int) -> SecureAnswer:
        import dns.exception
        import dns.flags
        import dns.message
        import dns.rcode
        import dns.rdatatype

        rdtype = dns.rdatatype.RdataType.make(code)
        try:
            query = dns.message.make_query(name, rdtype, use_edns=0, payload=_EDNS_PAYLOAD)
        except (dns.exception.DNSException, UnicodeError):
            raise DNSError(pycares.errno.ARES_EBADNAME) from None
        query.flags |= dns.flags.AD
        wire = query.to_wire()
        errno = pycares.errno.ARES_ETIMEOUT
        for _ in range(self.tries):
            for server in self.servers:
                try:
                    response = self._exchange(query, wire, server)
                except TimeoutError:
                    continue
                except OSError:
                    errno = pycares.errno.ARES_ECONNREFUSED
                    continue
                if response is None:
                    errno = pycares.errno.ARES_EBADRESP
                    continue
                rcode = response.rcode()
                if rcode in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
                    return self._answer(response, rdtype)
                refused = rcode == dns.rcode.REFUSED
                errno = _ARES_REFUSED if refused else pycares.errno.ARES_ESERVFAIL
        raise DNSError(errno)

    def _exchange(self, query: Any, wire: bytes, server: tuple[str, int]) -> Any:
        """One query to one server: the response, or ``None`` when unusable."""
        import dns.exception
        import dns.flags
        import dns.message

        host, port = server
        family = gsocket.AF_INET6 if ":" in host else gsocket.AF_INET
        sock = gsocket.socket(family, gsocket.SOCK_DGRAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect((host, port))
            sock.send(wire)
            deadline = time.monotonic() + self.timeout
            while True:
                data = sock.recv(65535)
                try:
                    response = dns.message.from_wire(data)
                except dns.exception.DNSException:
                    response = None
                if response is not None and query.is_response(response):
                    break
                # Not ours (late answer to an earlier query, garbage): wait on.
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                sock.settimeout(left)
        finally:
            sock.close()
        if response.flags & dns.flags.TC:
            return self._exchange_tcp(query, wire, server)
        return response

    def _exchange_tcp(self, query: Any, wire: bytes, server: tuple[str, int]) -> Any:
        import dns.exception
        import dns.message

        sock = gsocket.create_connection(server, self.timeout)
        try:
            sock.sendall(len(wire).to_bytes(2, "big") + wire)
            size = int.from_bytes(_recv_exactly(sock, 2), "big")
            data = _recv_exactly(sock, size)
        finally:
            sock.close()
        try:
            response = dns.message.from_wire(data)
        except dns.exception.DNSException:
            return None
        return response if query.is_response(response) else None

    def _answer(self, response: Any, rdtype: int) -> SecureAnswer:
        import dns.flags
        import dns.rcode
        import dns.rdatatype

        authenticated = bool(response.flags & dns.flags.AD)
        records: list[Any] = []
        ttl: float | None = None
        # The resolver followed any CNAME chain: keep the records of the type.
        for rrset in response.answer:
            if rrset.rdtype != rdtype:
                continue
            ttl = rrset.ttl if ttl is None else min(ttl, rrset.ttl)
            records.extend(_from_rdata(rrset.ttl, rdata) for rdata in rrset)
        if records:
            return SecureAnswer(tuple(records), authenticated, None, float(ttl or 0))
        negative = self.negative_ttl
        for rrset in response.authority:
            if rrset.rdtype == dns.rdatatype.SOA:
                negative = float(min(rrset.ttl, rrset[0].minimum))
                break
        errno = (
            pycares.errno.ARES_ENOTFOUND
            if response.rcode() == dns.rcode.NXDOMAIN
            else pycares.errno.ARES_ENODATA
        )
        return SecureAnswer((), authenticated, errno, negative)


def _recv_exactly(sock: Any, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionResetError("DNS server closed the connection")
        data += chunk
    return data


def _from_rdata(ttl: int, rdata: Any) -> Any:
    """A record of this module from a dnspython rdata (as is for other types)."""
    import dns.rdatatype

    rdtype = rdata.rdtype
    if rdtype == dns.rdatatype.TLSA:
        return TlsaRecord(rdata.usage, rdata.selector, rdata.mtype, bytes(rdata.cert), ttl)
    if rdtype == dns.rdatatype.A:
        return ARecord(rdata.address, ttl)
    if rdtype == dns.rdatatype.AAAA:
        return AaaaRecord(rdata.address, ttl)
    if rdtype == dns.rdatatype.MX:
        return MxRecord(rdata.exchange.to_text().rstrip("."), rdata.preference, ttl)
    if rdtype == dns.rdatatype.TXT:
        data = b"".join(rdata.strings)
        return TxtRecord(data.decode("utf-8", "replace"), data, ttl)
    if rdtype == dns.rdatatype.CNAME:
        return CnameRecord(rdata.target.to_text().rstrip("."), ttl)
    return rdata
