"""A small authoritative DNS server for tests and benchmarks (dnspython).

It is a real server on ``127.0.0.1`` (UDP, and TCP on the same port for
answers too big for UDP), running in an OS thread of its own made with the
*original* ``_thread`` and ``socket`` modules, so it keeps answering under
gevent monkey-patching even while the hub waits, and never runs in the hub.

Zone data is plain Python, ``name -> type -> [(ttl, rdata text), ...]``::

    ZONE = {
        "example.test": {
            "MX": [(300, "10 mx1.example.test."), (300, "20 mx2.example.test.")],
            "TXT": [(60, '"v=spf1 -all"')],
        },
        "mx1.example.test": {"A": [(300, "192.0.2.1")], "AAAA": [(300, "2001:db8::1")]},
        "nullmx.test": {"MX": [(300, "0 .")]},
        "1.0.0.127.in-addr.arpa": {"PTR": [(300, "localhost.test.")]},
    }

Answers: the records of the name and type (following a CNAME of the name
inside the zone); NXDOMAIN for names not in the zone; NODATA (NOERROR, no
records) for names without the type. Per name, :meth:`DnsServer.fail` makes
it SERVFAIL and :meth:`DnsServer.drop` makes it never answer (a timeout);
:meth:`DnsServer.heal` undoes both.

DNSSEC, as a validating resolver would report it: answers for the names given
to :meth:`DnsServer.authenticate` (records, NXDOMAIN or NODATA) carry the AD
bit when the query asks for it (AD or DO set); :meth:`DnsServer.unauthenticate`
takes it away. Nothing is signed: the bit is the claim a client trusts.

Counters: ``server.queries[("example.test.", "MX")]`` (names lower-case,
with the trailing dot) and ``server.total_queries`` count every query
received, answered or not.

c-ares keeps a cache of its own; by default every answer carries a TTL-0
record in its additional section, which c-ares' cache honours, so each
query slimta sends reaches this server and the counters are exact
(``DnsServer(client_cache=True)`` turns that off). slimta's own
:class:`~slimta.util.dns.DNSCache` only looks at the answer records.

In pytest (the ``dns_server`` fixture points slimta's ``DNSResolver`` at
the server, 1 s timeout, 1 try, empty cache, and restores it afterwards)::

    from dnsserver import dns_server  # noqa: F401  (in a conftest.py), or in a
    dns_server = dnsserver.dns_server  # test module, after ``import dnsserver``

    def test_mx(dns_server):
        dns_server.set("example.test", "MX", [(300, "10 mx1.example.test.")])
        records = DNSResolver.query("example.test", "MX").get(timeout=5)
        assert dns_server.queries[("example.test.", "MX")] == 1

Without the fixture::

    with DnsServer(ZONE) as server, server.slimta_resolver(timeout=0.5):
        ...

Standalone, for benchmarks (prints ``READY 127.0.0.1 <port>``; on SIGTERM or
SIGINT prints, or writes to ``--stats``, the counters as JSON and exits;
SIGUSR1 prints them and goes on)::

    python tests/dnsserver.py --port 5353 --zone zone.json [--stats stats.json]

``zone.json`` holds the zone as ``{"name": {"MX": [[300, "10 mx.test."]]}}``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import errno
import json
import os
import signal
import socket
import struct
import sys
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
from gevent.monkey import get_original

__all__ = ["DnsServer", "Zone", "dns_server"]

#: ``name -> type -> [(ttl, rdata text), ...]``
Zone = Mapping[str, Mapping[str, Iterable[tuple[int, str]]]]

_Socket: Any = get_original("socket", "socket")
_select: Any = get_original("select", "select")
_start_thread: Any = get_original("_thread", "start_new_thread")
_allocate_lock: Any = get_original("_thread", "allocate_lock")

#: Where the cache-defeating TTL-0 record lives (never asked for).
_NO_CACHE_NAME = dns.name.from_text("no-cache.dnsserver.invalid.")


def _abs_name(name: str) -> str:
    """``'Example.Test'`` -> ``'example.test.'``."""
    name = name.lower()
    return name if name.endswith(".") else name + "."


class DnsServer:
    """A threaded authoritative DNS server on ``127.0.0.1``.

    :param zone: initial data, ``name -> type -> [(ttl, rdata text)]``.
    :param host: address to listen on.
    :param port: UDP and TCP port; 0 picks a free one (see :attr:`port`).
    :param client_cache: let c-ares cache answers (see the module docstring).
    """

    def __init__(
        self,
        zone: Zone | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        client_cache: bool = False,
    ) -> None:
        #: ``'name.' -> 'TYPE' -> [(ttl, rdata text)]``; edit through
        #: :meth:`set` / :meth:`remove`, or directly with keys in that form.
        self.zone: dict[str, dict[str, list[tuple[int, str]]]] = {}
        #: Names answered with SERVFAIL.
        self.servfail: set[str] = set()
        #: Names never answered.
        self.dropped: set[str] = set()
        #: Names whose answers carry the AD bit (see :meth:`authenticate`).
        self.authenticated: set[str] = set()
        #: ``('name.', 'TYPE') -> queries received``.
        self.queries: collections.Counter[tuple[str, str]] = collections.Counter()
        #: All queries received.
        self.total_queries = 0
        #: Errors met while answering (bad zone data ...); each got SERVFAIL.
        self.errors: list[BaseException] = []
        self.client_cache = client_cache
        for name, types in (zone or {}).items():
            for rtype, records in types.items():
                self.set(name, rtype, records)
        self.host = host
        # An ephemeral UDP port may be taken for TCP: then try another one.
        for attempt in range(1 if port else 20):
            self._udp = _Socket(socket.AF_INET, socket.SOCK_DGRAM)
            self._tcp = _Socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                self._udp.bind((host, port))
                #: The port, UDP and TCP.
                self.port: int = self._udp.getsockname()[1]
                self._tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                self._tcp.bind((host, self.port))
                self._tcp.listen(16)
                break
            except BaseException as exc:
                self._udp.close()
                self._tcp.close()
                retry = isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE
                if not retry or port or attempt == 19:
                    raise
        self._wake_r, self._wake_w = os.pipe()
        self._done = _allocate_lock()
        self._running = False
        self._closed = False

    # Zone edits -------------------------------------------------------------

    def set(self, name: str, rtype: str, records: Iterable[tuple[int, str]]) -> None:
        """Make *name*'s *rtype* records exactly *records* (``[(ttl, rdata)]``)."""
        self.zone.setdefault(_abs_name(name), {})[rtype.upper()] = [
            (int(ttl), str(rdata)) for ttl, rdata in records
        ]

    def remove(self, name: str, rtype: str | None = None) -> None:
        """Remove one type of *name* (leaving NODATA), or the whole name (NXDOMAIN)."""
        key = _abs_name(name)
        if rtype is None:
            self.zone.pop(key, None)
        else:
            self.zone.get(key, {}).pop(rtype.upper(), None)

    def fail(self, name: str) -> None:
        """Answer every query for *name* with SERVFAIL."""
        self.servfail.add(_abs_name(name))

    def drop(self, name: str) -> None:
        """Never answer queries for *name* (the client times out)."""
        self.dropped.add(_abs_name(name))

    def heal(self, name: str) -> None:
        """Undo :meth:`fail` and :meth:`drop` for *name*."""
        self.servfail.discard(_abs_name(name))
        self.dropped.discard(_abs_name(name))

    def authenticate(self, *names: str) -> None:
        """Set the AD bit on answers for *names* (to queries asking for it)."""
        self.authenticated.update(_abs_name(name) for name in names)

    def unauthenticate(self, *names: str) -> None:
        """Undo :meth:`authenticate` for *names*."""
        self.authenticated.difference_update(_abs_name(name) for name in names)

    def count(self, name: str, rtype: str) -> int:
        """Queries received for *name* and *rtype*."""
        return self.queries[(_abs_name(name), rtype.upper())]

    def stats(self) -> dict[str, Any]:
        """The counters as JSON-friendly data."""
        return {
            "total_queries": self.total_queries,
            "queries": {f"{n} {t}": c for (n, t), c in sorted(self.queries.items())},
        }

    # Answers ----------------------------------------------------------------

    def answer(self, wire: bytes, *, tcp: bool = False) -> bytes | None:
        """The response to one query message, or ``None`` for no answer.

        Over UDP an answer bigger than the client's payload size (512 bytes
        without EDNS) is sent truncated (TC), so the client asks over TCP.
        """
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        if not query.question:
            return None
        question = query.question[0]
        qname = question.name.to_text().lower()
        qtype = dns.rdatatype.to_text(question.rdtype)
        self.queries[(qname, qtype)] += 1
        self.total_queries += 1
        if qname in self.dropped:
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if qname in self.servfail:
            response.set_rcode(dns.rcode.SERVFAIL)
        elif qname not in self.zone:
            response.set_rcode(dns.rcode.NXDOMAIN)
        else:
            try:
                response.answer.extend(self._rrsets(qname, qtype))
            except Exception as exc:  # bad zone data: say so, keep serving
                self.errors.append(exc)
                response.answer.clear()
                response.set_rcode(dns.rcode.SERVFAIL)
            if not self.client_cache:
                response.additional.append(
                    dns.rrset.from_text(_NO_CACHE_NAME, 0, "IN", "TXT", '"no-cache"')
                )
        wants_ad = query.flags & dns.flags.AD or query.ednsflags & dns.flags.DO
        if qname in self.authenticated and wants_ad and response.rcode() != dns.rcode.SERVFAIL:
            response.flags |= dns.flags.AD
        if tcp:
            return response.to_wire(max_size=65535)
        limit = max(512, query.payload if query.edns >= 0 else 512)
        try:
            return response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            response.answer.clear()
            response.additional.clear()
            response.flags |= dns.flags.TC
            return response.to_wire(max_size=limit)

    def _rrsets(self, qname: str, qtype: str) -> list[dns.rrset.RRset]:
        rrsets = []
        seen = set()
        name = qname
        while name not in seen:
            seen.add(name)
            types = self.zone.get(name) or {}
            records = types.get(qtype)
            if not records and qtype != "CNAME" and types.get("CNAME"):
                # Follow the alias, as an authoritative server does in-zone.
                cname = types["CNAME"]
                rrsets.append(self._rrset(name, "CNAME", cname[:1]))
                name = _abs_name(cname[0][1])
                continue
            # One RRset per record, so each keeps its own TTL.
            rrsets.extend(self._rrset(name, qtype, [rec]) for rec in records or ())
            break
        return rrsets

    @staticmethod
    def _rrset(name: str, rtype: str, records: list[tuple[int, str]]) -> dns.rrset.RRset:
        ttl = records[0][0]
        texts = [rdata for _, rdata in records]
        if rtype == "TXT":
            texts = [t if t.startswith('"') else json.dumps(t) for t in texts]
        return dns.rrset.from_text_list(
            name, ttl, "IN", rtype, texts, origin=dns.name.root, relativize=False
        )

    # Running ----------------------------------------------------------------

    def start(self) -> DnsServer:
        """Serve in a new OS thread (the sockets are bound already)."""
        self._done.acquire()
        self._running = True
        _start_thread(self._serve, ())
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving and close the sockets."""
        if self._running:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")
            # The serving thread releases the lock as it returns.
            if self._done.acquire(True, timeout):
                self._done.release()
            self._running = False
        else:
            self._close()

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for sock in (self._udp, self._tcp):
            sock.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _serve(self) -> None:
        clients: dict[int, Any] = {}
        try:
            while True:
                readable, _, _ = _select(
                    [self._wake_r, self._udp, self._tcp, *clients.values()], [], []
                )
                if self._wake_r in readable:
                    return
                for sock in readable:
                    if sock is self._udp:
                        self._serve_udp()
                    elif sock is self._tcp:
                        conn, _ = self._tcp.accept()
                        conn.settimeout(2.0)
                        clients[conn.fileno()] = conn
                    elif not self._serve_tcp(sock):
                        del clients[sock.fileno()]
                        sock.close()
        finally:
            for conn in clients.values():
                conn.close()
            self._close()
            self._done.release()

    def _answer_safely(self, wire: bytes, *, tcp: bool) -> bytes | None:
        try:
            return self.answer(wire, tcp=tcp)
        except Exception as exc:  # the server thread must go on
            self.errors.append(exc)
            return None

    def _serve_udp(self) -> None:
        try:
            wire, peer = self._udp.recvfrom(65535)
        except OSError:
            return
        reply = self._answer_safely(wire, tcp=False)
        if reply is not None:
            with contextlib.suppress(OSError):
                self._udp.sendto(reply, peer)

    def _serve_tcp(self, conn: Any) -> bool:
        """Answer one length-prefixed query; False when the client is gone."""
        try:
            head = self._recv_exactly(conn, 2)
            if head is None:
                return False
            wire = self._recv_exactly(conn, struct.unpack("!H", head)[0])
            if wire is None:
                return False
            reply = self._answer_safely(wire, tcp=True)
            if reply is not None:
                conn.sendall(struct.pack("!H", len(reply)) + reply)
        except OSError:
            return False
        return True

    @staticmethod
    def _recv_exactly(conn: Any, size: int) -> bytes | None:
        data = b""
        while len(data) < size:
            chunk = conn.recv(size - len(data))
            if not chunk:
                return None
            data += chunk
        return data

    # slimta ------------------------------------------------------------------

    @contextlib.contextmanager
    def slimta_resolver(self, timeout: float = 1.0, tries: int = 1) -> Iterator[DnsServer]:
        """Point :class:`slimta.util.dns.DNSResolver` here (fresh channel,
        empty cache) for the ``with`` block, then restore its settings."""
        from slimta.util.dns import DNSResolver

        previous = DNSResolver.configure(
            servers=[f"{self.host}:{self.port}"], timeout=timeout, tries=tries
        )
        try:
            yield self
        finally:
            DNSResolver.configure(**previous)


try:
    import pytest
except ImportError:  # standalone use needs no pytest
    pass
else:

    @pytest.fixture
    def dns_server() -> Iterator[DnsServer]:
        """A started :class:`DnsServer` with an empty zone that slimta's
        ``DNSResolver`` uses (1 s timeout, 1 try); restored afterwards.
        Fails the test if the server could not answer (bad zone data)."""
        with DnsServer() as server, server.slimta_resolver():
            yield server
        assert not server.errors, f"the DNS server failed to answer: {server.errors!r}"


def _load_zone(path: str | None) -> Zone:
    if path is None:
        return {}
    with open(path, encoding="utf-8") as zone_file:
        data = json.load(zone_file)
    return {
        name: {rtype: [(ttl, rdata) for ttl, rdata in records] for rtype, records in types.items()}
        for name, types in data.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Authoritative DNS server for tests.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="UDP and TCP port (0: any free one)")
    parser.add_argument("--zone", help="JSON file: {name: {type: [[ttl, rdata], ...]}}")
    parser.add_argument("--stats", help="write the counters here (JSON) instead of stdout")
    parser.add_argument("--servfail", action="append", default=[], help="name to SERVFAIL")
    parser.add_argument("--drop", action="append", default=[], help="name never to answer")
    parser.add_argument("--client-cache", action="store_true", help="let c-ares cache answers")
    args = parser.parse_args(argv)

    server = DnsServer(
        _load_zone(args.zone), host=args.host, port=args.port, client_cache=args.client_cache
    )
    for name in args.servfail:
        server.fail(name)
    for name in args.drop:
        server.drop(name)
    # Block the signals before the serving thread exists, so that only
    # sigwait() below ever sees them.
    wanted = {signal.SIGTERM, signal.SIGINT, signal.SIGUSR1}
    signal.pthread_sigmask(signal.SIG_BLOCK, wanted)
    server.start()
    print(f"READY {server.host} {server.port}", flush=True)
    while True:
        signum = signal.sigwait(wanted)
        stats = json.dumps(server.stats(), indent=2, sort_keys=True)
        if signum == signal.SIGUSR1:
            print(stats, flush=True)
            continue
        break
    server.stop()
    if args.stats:
        with open(args.stats, "w", encoding="utf-8") as stats_file:
            stats_file.write(stats + "\n")
    else:
        print(stats, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
