"""MxSmtpRelay against a real DNS server and real SMTP servers on loopback.

DNS answers come from tests/dnsserver.py (``dns_server``: a dnspython-based
authoritative server that slimta's DNSResolver is pointed at, with query
counters). The exchangers are SmtpEdges, or Postfix's smtp-sink, listening
on different loopback addresses (127.0.0.2, 127.0.0.3, ...) that share one
port, because MX records carry names, not ports: every exchanger of a
domain is reached on the relay's one ``port``.

MX host names are resolved when connecting, by the relay's
``socket_creator`` (the system resolver by default, as in 4.0); here a
creator that asks the test DNS server for A/AAAA records stands in, so the
names in the zone really decide where the connection goes.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import gevent.socket
import pytest

import dnsserver
from slimta.edge.smtp import SmtpEdge, SmtpValidators
from slimta.envelope import Envelope
from slimta.relay import PermanentRelayError, TransientRelayError
from slimta.relay.smtp import SmtpTransientRelayError
from slimta.relay.smtp.mx import MxSmtpRelay, NoDomainError
from slimta.smtp.reply import Reply
from slimta.util import build_ipv4_socket_creator
from slimta.util.dns import DNSCache, DNSError, DNSResolver

pytestmark = pytest.mark.timeout(30)

dns_server = dnsserver.dns_server

QUEUED = ("250", "2.6.0")
NULL_MX = ("556", "5.1.10")
NO_SUCH_DOMAIN = ("550", "5.1.2")
NO_DOMAIN = ("550", "5.1.5")
DNS_FAILED = ("451", "4.4.3")
CONNECT_FAILED = ("451", "4.3.0")
TLS_FAILED = ("421", "4.7.0")
TRY_LATER = ("451", "4.3.0")

SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"


def is_(reply: Reply | None, named: tuple[str, str]) -> bool:
    assert reply is not None
    return reply.code == named[0] and reply.enhanced_status_code == named[1]


def message(rcpt: str = "rcpt@example.test", *more: str) -> Envelope:
    env = Envelope("sender@origin.test", [rcpt, *more])
    env.parse(b"Subject: mx test\r\nFrom: sender@origin.test\r\n\r\nhello\r\n")
    return env


def delivered(results: Any) -> bool:
    return isinstance(results, dict) and all(is_(r, QUEUED) for r in results.values())


# ------------------------------------------------------------ SMTP servers
class QuietEdge(SmtpEdge):
    """No PTR lookups of the relay's address: the DNS counters see only the relay."""

    ptr_lookup = False


class MailServer:
    """One SmtpEdge on ``(ip, port)`` counting connections and messages."""

    def __init__(self, listener: socket.socket, **edge_kwargs: Any) -> None:
        self.ip, self.port = listener.getsockname()[:2]
        self.connections = 0
        self.envelopes: list[Envelope] = []
        self.security: list[str | None] = []
        self.rcpt_reply: tuple[str, str] | None = None
        server = self

        class Validators(SmtpValidators):
            def handle_banner(self, reply: Reply, address: Any) -> None:
                server.connections += 1

            def handle_mail(self, reply: Reply, sender: str, params: Any) -> None:
                server.security.append(self.session.security)

            def handle_rcpt(self, reply: Reply, recipient: str, params: Any) -> None:
                if server.rcpt_reply is not None:
                    reply.code, reply.message = server.rcpt_reply

        self.edge = QuietEdge(
            listener, self, validator_class=Validators, hostname="mx.test", **edge_kwargs
        )
        self.edge.start()

    def enqueue(self, envelope: Envelope) -> list[tuple[Envelope, str]]:
        self.envelopes.append(envelope)
        return [(envelope, f"id-{len(self.envelopes)}")]

    def kill(self) -> None:
        with gevent.Timeout(10, AssertionError("edge.kill() did not return")):
            self.edge.kill()


def _listeners_on_one_port(ips: list[str]) -> list[socket.socket]:
    """Listening sockets on *ips*, all with the same (free) port."""
    for _ in range(50):
        socks: list[socket.socket] = []
        try:
            port = 0
            for ip in ips:
                family = socket.AF_INET6 if ":" in ip else socket.AF_INET
                sock = socket.socket(family, socket.SOCK_STREAM)
                socks.append(sock)
                sock.bind((ip, port))
                port = sock.getsockname()[1]
        except OSError:
            for sock in socks:
                sock.close()
            continue
        for sock in socks:
            sock.listen(16)
        return socks
    raise RuntimeError(f"no common free port on {ips}")


class Servers:
    """The exchangers of one test, sharing :attr:`port`."""

    def __init__(self) -> None:
        self.port = 0
        self.by_ip: dict[str, MailServer] = {}
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, *ips: str, **edge_kwargs: Any) -> list[MailServer]:
        assert not self.port, "start() once per test"
        listeners = _listeners_on_one_port(list(ips))
        self.port = listeners[0].getsockname()[1]
        started = [MailServer(listener, **edge_kwargs) for listener in listeners]
        self.by_ip.update(zip(ips, started, strict=True))
        return started

    def total_connections(self) -> int:
        return sum(server.connections for server in self.by_ip.values())

    def close(self) -> None:
        for server in self.by_ip.values():
            server.kill()
        for proc in self.procs:
            proc.terminate()
            proc.wait(5)


@pytest.fixture
def servers() -> Iterator[Servers]:
    made = Servers()
    yield made
    made.close()


def via_test_dns(address: tuple[str, int], timeout: float | None = None) -> socket.socket:
    """A ``socket_creator`` resolving the host through DNSResolver (A, then AAAA)."""
    host, port = address
    for qtype in ("A", "AAAA"):
        try:
            records = DNSResolver.query(host, qtype).get(timeout=5)
        except DNSError:
            continue
        sock: socket.socket = gevent.socket.create_connection((records[0].host, port), timeout)
        return sock
    raise OSError(f"test DNS has no address for {host}")


@pytest.fixture
def relays() -> Iterator[Callable[..., MxSmtpRelay]]:
    made: list[MxSmtpRelay] = []

    def factory(port: int, **kw: Any) -> MxSmtpRelay:
        kw.setdefault("socket_creator", via_test_dns)
        kw.setdefault("connect_timeout", 3.0)
        kw.setdefault("command_timeout", 3.0)
        kw.setdefault("ehlo_as", "relay.test")
        relay = MxSmtpRelay(port=port, **kw)
        made.append(relay)
        return relay

    yield factory
    for relay in made:
        relay.kill()


def host_records(dns: dnsserver.DnsServer, **hosts: str) -> None:
    """A records ``name.test -> ip`` for each ``name=ip``."""
    for name, ip in hosts.items():
        dns.set(f"{name}.test", "A", [(300, ip)])


# --------------------------------------------------------------- delivery
def test_delivers_to_the_mx(dns_server: Any, servers: Servers, relays: Any) -> None:
    (mx1,) = servers.start("127.0.0.2")
    dns_server.set("example.test", "MX", [(300, "10 mx1.test.")])
    host_records(dns_server, mx1="127.0.0.2")
    results = relays(servers.port).attempt(message("a@Example.TEST", "b@example.test"), 0)
    assert delivered(results) and set(results) == {"a@Example.TEST", "b@example.test"}
    assert [env.recipients for env in mx1.envelopes] == [["a@Example.TEST", "b@example.test"]]
    assert mx1.envelopes[0].message == b"hello\r\n"
    assert dns_server.count("example.test", "MX") == 1


def test_lowest_preference_first_then_rotation(
    dns_server: Any, servers: Servers, relays: Any
) -> None:
    mx1, mx2 = servers.start("127.0.0.2", "127.0.0.3")
    dns_server.set("example.test", "MX", [(300, "20 mx2.test."), (300, "10 mx1.test.")])
    host_records(dns_server, mx1="127.0.0.2", mx2="127.0.0.3")
    relay = relays(servers.port)
    assert delivered(relay.attempt(message(), 0))
    assert (mx1.connections, mx2.connections) == (1, 0)
    # The queue's second attempt (one failed before) starts at the next MX.
    assert delivered(relay.attempt(message(), 1))
    assert (mx1.connections, mx2.connections) == (1, 1)
    assert delivered(relay.attempt(message(), 2))
    assert (mx1.connections, mx2.connections) == (2, 1)


def test_next_mx_when_the_first_refuses(dns_server: Any, servers: Servers, relays: Any) -> None:
    (mx2,) = servers.start("127.0.0.3")  # nothing listens on 127.0.0.2
    dns_server.set("example.test", "MX", [(300, "10 mx1.test."), (300, "20 mx2.test.")])
    host_records(dns_server, mx1="127.0.0.2", mx2="127.0.0.3")
    assert delivered(relays(servers.port).attempt(message(), 0))
    assert len(mx2.envelopes) == 1 and mx2.connections == 1


def test_no_mx_reachable_is_transient(dns_server: Any, servers: Servers, relays: Any) -> None:
    (other,) = servers.start("127.0.0.9")  # only to reserve a port
    dns_server.set("example.test", "MX", [(300, "10 mx1.test."), (300, "20 mx2.test.")])
    host_records(dns_server, mx1="127.0.0.2", mx2="127.0.0.3")
    with pytest.raises(TransientRelayError) as info:
        relays(servers.port).attempt(message(), 0)
    assert is_(info.value.reply, CONNECT_FAILED) and info.value.reply.command == b"[CONNECT]"
    # Both were looked up: both were tried.
    assert dns_server.count("mx1.test", "A") == 1 and dns_server.count("mx2.test", "A") == 1
    assert other.connections == 0


def test_server_reply_ends_the_attempt(dns_server: Any, servers: Servers, relays: Any) -> None:
    mx1, mx2 = servers.start("127.0.0.2", "127.0.0.3")
    mx1.rcpt_reply = ("451", "4.3.0 Try again later")
    dns_server.set("example.test", "MX", [(300, "10 mx1.test."), (300, "20 mx2.test.")])
    host_records(dns_server, mx1="127.0.0.2", mx2="127.0.0.3")
    with pytest.raises(SmtpTransientRelayError) as info:
        relays(servers.port).attempt(message(), 0)
    assert is_(info.value.reply, TRY_LATER) and info.value.reply.command == b"RCPT"
    assert mx2.connections == 0 and not mx1.envelopes


def test_equal_preferences_in_random_order(dns_server: Any, servers: Servers, relays: Any) -> None:
    ips = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    servers.start(*ips)
    dns_server.set("example.test", "MX", [(300, f"10 mx{i}.test.") for i in range(3)])
    host_records(dns_server, **{f"mx{i}": ip for i, ip in enumerate(ips)})

    def first_choice(seed: int) -> str:
        before = {ip: s.connections for ip, s in servers.by_ip.items()}
        assert delivered(relays(servers.port, rng=random.Random(seed)).attempt(message(), 0))
        (ip,) = [ip for ip, s in servers.by_ip.items() if s.connections > before[ip]]
        return ip

    firsts = [first_choice(seed) for seed in range(12)]
    assert set(firsts) == set(ips)  # each exchanger is sometimes first
    assert first_choice(3) == firsts[3]  # a seeded generator repeats its order
    # One relay keeps its order across attempts: three attempts, three hosts.
    relay = relays(servers.port, rng=random.Random(5))
    before = servers.total_connections()
    for attempts in range(3):
        assert delivered(relay.attempt(message(), attempts))
    assert all(s.connections >= 1 for s in servers.by_ip.values())
    assert servers.total_connections() == before + 3
    # Every relay used the one cached answer.
    assert dns_server.count("example.test", "MX") == 1


# ------------------------------------------------------------------ null MX
def test_null_mx_fails_without_connecting(dns_server: Any, servers: Servers, relays: Any) -> None:
    (mx,) = servers.start("127.0.0.2")
    dns_server.set("nomail.test", "MX", [(300, "0 .")])
    dns_server.set("nomail.test", "A", [(300, "127.0.0.2")])  # must not be used
    with pytest.raises(PermanentRelayError) as info:
        relays(servers.port).attempt(message("a@nomail.test"), 0)
    assert is_(info.value.reply, NULL_MX)
    assert mx.connections == 0
    assert dns_server.count("nomail.test", "A") == 0
    assert dns_server.count("nomail.test", "AAAA") == 0


# ------------------------------------------------------ NXDOMAIN and NODATA
def test_nxdomain_is_permanent(dns_server: Any, servers: Servers, relays: Any) -> None:
    (mx,) = servers.start("127.0.0.2")
    with pytest.raises(PermanentRelayError) as info:
        relays(servers.port).attempt(message("a@nowhere.test"), 0)
    assert is_(info.value.reply, NO_SUCH_DOMAIN)
    assert "nowhere.test" in (info.value.reply.message or "")
    assert dns_server.count("nowhere.test", "MX") == 1
    assert dns_server.count("nowhere.test", "A") == 0  # no implicit MX
    assert mx.connections == 0


def test_nodata_uses_the_domain_as_implicit_mx(
    dns_server: Any, servers: Servers, relays: Any
) -> None:
    (mx,) = servers.start("127.0.0.2")
    dns_server.set("implicit.test", "A", [(300, "127.0.0.2")])
    assert delivered(relays(servers.port).attempt(message("a@implicit.test"), 0))
    assert len(mx.envelopes) == 1
    assert dns_server.count("implicit.test", "MX") == 1


def test_implicit_mx_over_ipv6(dns_server: Any, servers: Servers, relays: Any) -> None:
    (mx,) = servers.start("::1")
    dns_server.set("v6only.test", "AAAA", [(300, "::1")])
    assert delivered(relays(servers.port).attempt(message("a@v6only.test"), 0))
    assert len(mx.envelopes) == 1
    assert dns_server.count("v6only.test", "AAAA") >= 1


def test_nodata_without_addresses_is_permanent(
    dns_server: Any, servers: Servers, relays: Any
) -> None:
    (mx,) = servers.start("127.0.0.2")
    dns_server.set("textonly.test", "TXT", [(300, "v=spf1 -all")])
    with pytest.raises(PermanentRelayError) as info:
        relays(servers.port).attempt(message("a@textonly.test"), 0)
    assert is_(info.value.reply, NO_SUCH_DOMAIN)
    assert info.value.reply.message == "5.1.2 No usable DNS records found: textonly.test"
    assert dns_server.count("textonly.test", "A") == 1
    assert dns_server.count("textonly.test", "AAAA") == 1
    assert mx.connections == 0


# ------------------------------------------------------------ DNS failures
def test_servfail_is_transient_and_not_kept(dns_server: Any, servers: Servers, relays: Any) -> None:
    (mx,) = servers.start("127.0.0.2")
    dns_server.set("example.test", "MX", [(300, "10 mx1.test.")])
    host_records(dns_server, mx1="127.0.0.2")
    dns_server.fail("example.test")
    relay = relays(servers.port)
    with pytest.raises(TransientRelayError) as info:
        relay.attempt(message(), 0)
    assert is_(info.value.reply, DNS_FAILED)
    assert info.value.reply.message == "4.4.3 DNS lookup failed"  # no resolver detail
    assert mx.connections == 0
    dns_server.heal("example.test")
    assert delivered(relay.attempt(message(), 1))
    assert dns_server.count("example.test", "MX") == 2


def test_dns_timeout_is_transient(dns_server: Any, servers: Servers, relays: Any) -> None:
    (mx,) = servers.start("127.0.0.2")
    dns_server.drop("example.test")
    start = time.monotonic()
    with pytest.raises(TransientRelayError) as info:
        relays(servers.port).attempt(message(), 0)
    assert time.monotonic() - start < 10
    assert is_(info.value.reply, DNS_FAILED)
    assert mx.connections == 0


# -------------------------------------------------------------------- cache
def test_one_mx_query_for_many_messages(dns_server: Any, servers: Servers, relays: Any) -> None:
    (mx,) = servers.start("127.0.0.2")
    dns_server.set("example.test", "MX", [(300, "10 mx1.test.")])
    host_records(dns_server, mx1="127.0.0.2")
    relay = relays(servers.port, idle_timeout=5.0)
    rcpts = ["a@example.test", "b@EXAMPLE.test", "c@example.TEST", "d@example.test"]
    for rcpt in rcpts:
        assert delivered(relay.attempt(message(rcpt), 0))
    assert dns_server.count("example.test", "MX") == 1
    assert len(mx.envelopes) == 4
    assert mx.connections == 1  # one pooled connection to the one exchanger


def test_mx_looked_up_again_after_ttl(
    dns_server: Any, servers: Servers, relays: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [1000.0]
    monkeypatch.setattr(DNSResolver, "cache", DNSCache(clock=lambda: now[0]))
    mx1, mx2 = servers.start("127.0.0.2", "127.0.0.3")
    dns_server.set("example.test", "MX", [(60, "10 mx1.test.")])
    host_records(dns_server, mx1="127.0.0.2", mx2="127.0.0.3")
    relay = relays(servers.port)
    assert delivered(relay.attempt(message(), 0))
    dns_server.set("example.test", "MX", [(60, "10 mx2.test.")])
    now[0] += 59
    assert delivered(relay.attempt(message(), 0))
    assert (len(mx1.envelopes), len(mx2.envelopes)) == (2, 0)
    now[0] += 2
    assert delivered(relay.attempt(message(), 0))
    assert (len(mx1.envelopes), len(mx2.envelopes)) == (2, 1)
    assert dns_server.count("example.test", "MX") == 2


# ------------------------------------------------------------- no DNS at all
def test_force_mx_bypasses_dns(dns_server: Any, servers: Servers, relays: Any) -> None:
    (mx,) = servers.start("127.0.0.2")
    dns_server.set("forced.test", "MX", [(300, "10 elsewhere.test.")])
    relay = relays(0, socket_creator=None)  # the default creator: no test DNS
    relay.force_mx("Forced.Test", "127.0.0.2", servers.port)
    assert delivered(relay.attempt(message("a@forced.test"), 0))
    assert delivered(relay.attempt(message("b@FORCED.test"), 1))
    assert len(mx.envelopes) == 2
    assert dns_server.total_queries == 0


def test_no_domain_error(dns_server: Any, servers: Servers, relays: Any) -> None:
    (mx,) = servers.start("127.0.0.2")
    with pytest.raises(NoDomainError) as info:
        relays(servers.port).attempt(message("postmaster"), 0)
    assert is_(info.value.reply, NO_DOMAIN) and info.value.recipient == "postmaster"
    assert dns_server.total_queries == 0 and mx.connections == 0


# ---------------------------------------------------- sockets, TLS, others
def test_ipv4_socket_creator(dns_server: Any, servers: Servers, relays: Any) -> None:
    (mx,) = servers.start("127.0.0.1")
    dns_server.set("example.test", "MX", [(300, "10 localhost.")])
    ipv4 = build_ipv4_socket_creator()
    seen: list[tuple[str, int]] = []

    def creator(address: tuple[str, int], *args: Any) -> socket.socket:
        seen.append(address)
        sock = ipv4(address, *args)
        assert sock.family == socket.AF_INET
        return sock

    assert delivered(relays(servers.port, socket_creator=creator).attempt(message(), 0))
    assert seen == [("localhost", servers.port)] and len(mx.envelopes) == 1


def test_default_context_refuses_untrusted_certificate(
    dns_server: Any,
    servers: Servers,
    relays: Any,
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
) -> None:
    (mx,) = servers.start("127.0.0.2", context=server_context)
    dns_server.set("example.test", "MX", [(300, "10 mx.test.")])
    dns_server.set("mx.test", "A", [(300, "127.0.0.2")])
    # The test CA is not trusted by the default context: transient, nothing sent.
    with pytest.raises(SmtpTransientRelayError) as info:
        relays(servers.port).attempt(message(), 0)
    assert is_(info.value.reply, TLS_FAILED) and info.value.reply.command == b"STARTTLS"
    assert not mx.envelopes
    # A context trusting it verifies the MX host name (mx.test) and delivers.
    assert delivered(relays(servers.port, context=client_context).attempt(message(), 0))
    assert mx.security == ["TLS"]


def test_static_relay_per_exchanger(dns_server: Any, servers: Servers, relays: Any) -> None:
    servers.start("127.0.0.2")
    dns_server.set("one.test", "MX", [(300, "10 mx1.test.")])
    dns_server.set("two.test", "MX", [(300, "10 MX1.test.")])
    host_records(dns_server, mx1="127.0.0.2")
    relay = relays(servers.port, pool_size=2)
    assert delivered(relay.attempt(message("a@one.test"), 0))
    assert delivered(relay.attempt(message("a@two.test"), 0))
    assert list(relay._relays) == [("mx1.test", servers.port)]
    assert relay._relays[("mx1.test", servers.port)].pool_size == 2


# ---------------------------------------------------------------- smtp-sink
def _start_sink(servers: Servers, ip: str) -> int:
    for _ in range(20):
        (probe,) = _listeners_on_one_port([ip])
        port: int = probe.getsockname()[1]
        probe.close()
        proc = subprocess.Popen(
            [SMTP_SINK, "-u", "nobody", f"{ip}:{port}", "100"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        servers.procs.append(proc)
        deadline = time.monotonic() + 5
        while proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                socket.create_connection((ip, port), timeout=1).close()
                return port
            gevent.sleep(0.02)  # polling a foreign process: no event to wait on
    raise RuntimeError("smtp-sink did not start")


@pytest.mark.skipif(not shutil.which(SMTP_SINK), reason="no smtp-sink")
def test_delivers_to_smtp_sink(dns_server: Any, servers: Servers, relays: Any) -> None:
    port = _start_sink(servers, "127.0.0.5")
    dns_server.set("example.test", "MX", [(300, "10 sink.test.")])
    host_records(dns_server, sink="127.0.0.5")
    relay = relays(port, idle_timeout=2.0)
    for _ in range(2):
        results = relay.attempt(message("a@example.test", "b@example.test"), 0)
        assert isinstance(results, dict) and all(r.code == "250" for r in results.values())
    assert dns_server.count("example.test", "MX") == 1


# -------------------------------------------------------- address literals
@pytest.mark.parametrize(
    ("ip", "literal"),
    [("127.0.0.2", "[127.0.0.2]"), ("::1", "[IPv6:::1]"), ("::1", "[ipv6:0:0:0:0:0:0:0:1]")],
)
def test_address_literal_is_delivered_to_the_ip(
    dns_server: Any, servers: Servers, relays: Any, ip: str, literal: str
) -> None:
    (mx,) = servers.start(ip)
    relay = relays(servers.port, socket_creator=gevent.socket.create_connection)
    results = relay.attempt(message(f"user@{literal}"), 0)
    assert delivered(results)
    assert [env.recipients for env in mx.envelopes] == [[f"user@{literal}"]]
    assert not dns_server.queries  # no DNS for a literal


@pytest.mark.parametrize(
    "literal", ["[300.1.2.3]", "[IPv6:not-an-address]", "[tag:content]", "[127.0.0.1", "[]"]
)
def test_invalid_address_literal_fails_for_good(dns_server: Any, relays: Any, literal: str) -> None:
    with pytest.raises(PermanentRelayError) as info:
        relays(25).attempt(message(f"user@{literal}"), 0)
    assert is_(info.value.reply, ("550", "5.1.2"))
    assert not dns_server.queries


# ------------------------------------------------- RFC 5321 5.1 loop check
def test_local_host_and_lower_preferences_are_dropped(
    dns_server: Any, servers: Servers, relays: Any
) -> None:
    mx1, me, mx3 = servers.start("127.0.0.2", "127.0.0.3", "127.0.0.4")
    dns_server.set(
        "example.test", "MX", [(300, "10 mx1.test."), (300, "20 me.test."), (300, "30 mx3.test.")]
    )
    host_records(dns_server, mx1="127.0.0.2", me="127.0.0.3", mx3="127.0.0.4")
    relay = relays(servers.port, local_hosts=["ME.test."])
    # Attempts 1 and 2 would start at "me" and mx3 without the check.
    for attempts in range(3):
        assert delivered(relay.attempt(message(), attempts))
    assert (mx1.connections > 0, me.connections, mx3.connections) == (True, 0, 0)
    assert len(mx1.envelopes) == 3


@pytest.mark.parametrize(
    "records", [["10 me.test.", "20 mx1.test."], ["10 mx1.test.", "10 me.test."]]
)
def test_local_host_as_best_exchanger_is_a_loop(
    dns_server: Any, servers: Servers, relays: Any, records: list[str]
) -> None:
    mx1, me = servers.start("127.0.0.2", "127.0.0.3")
    dns_server.set("example.test", "MX", [(300, record) for record in records])
    host_records(dns_server, mx1="127.0.0.2", me="127.0.0.3")
    with pytest.raises(PermanentRelayError) as info:
        relays(servers.port, local_hosts=["me.test"]).attempt(message(), 0)
    assert is_(info.value.reply, ("550", "5.4.6"))
    assert mx1.connections == me.connections == 0


def test_implicit_mx_that_is_this_host_is_a_loop(
    dns_server: Any, servers: Servers, relays: Any
) -> None:
    (me,) = servers.start("127.0.0.3")
    dns_server.set("me.test", "A", [(300, "127.0.0.3")])
    with pytest.raises(PermanentRelayError) as info:
        relays(servers.port, local_hosts=["me.test"]).attempt(message("a@me.test"), 0)
    assert is_(info.value.reply, ("550", "5.4.6"))
    assert me.connections == 0


def test_no_loop_check_without_local_hosts(dns_server: Any, servers: Servers, relays: Any) -> None:
    (me,) = servers.start("127.0.0.3")
    dns_server.set("example.test", "MX", [(300, "10 me.test.")])
    host_records(dns_server, me="127.0.0.3")
    assert delivered(relays(servers.port).attempt(message(), 0))
    assert len(me.envelopes) == 1
