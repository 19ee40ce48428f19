"""MTA-STS and DANE in MxSmtpRelay, against real servers on loopback.

* DNS: tests/dnsserver.py (MX, A, TXT and TLSA records; the AD bit on the
  answers a test says are DNSSEC-validated).
* Policy host: a gevent.pywsgi HTTPS server with a trustme certificate for
  ``mta-sts.example.test`` on 127.0.0.9, found through the test DNS server's
  A record; the relay's fetcher trusts the test CA.
* Exchangers: SmtpEdges on 127.0.0.2 and 127.0.0.3 (one shared port), with
  certificates that match, do not match, have expired, come from an unknown
  CA, or no TLS at all; and a man in the middle that removes STARTTLS from
  the EHLO reply of a TLS-capable edge (the stripping attacker).

Each case says whether the message was delivered, to which exchanger, over
what, and the reply when it was not. No sleeps: a clock is injected into the
policy cache, and the one time-bound test waits for its own bound.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import socket
import ssl
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import gevent.event
import gevent.socket
import pycares.errno
import pytest
import trustme
from gevent.pywsgi import WSGIServer
from gevent.server import StreamServer

import dnsserver
from slimta.edge.smtp import SmtpEdge, SmtpValidators
from slimta.envelope import Envelope
from slimta.relay import TransientRelayError
from slimta.relay.smtp.dane import Dane
from slimta.relay.smtp.mtasts import HttpsPolicyFetcher, MtaSts, PolicyFetchError
from slimta.relay.smtp.mx import MxSmtpRelay
from slimta.relay.smtp.tlspolicy import TlsOutcome, TlsResult
from slimta.smtp.reply import Reply
from slimta.util.dns import DNSError, DNSResolver, TrustedResolver

pytestmark = pytest.mark.timeout(30)

dns_server = dnsserver.dns_server

DOMAIN = "example.test"
MX1 = "mx1.example.test"
MX2 = "mx2.example.test"
POLICY_HOST = "mta-sts.example.test"
POLICY_IP = "127.0.0.9"
ENFORCE = "version: STSv1\nmode: enforce\nmx: *.example.test\nmax_age: 86400\n"
TESTING = ENFORCE.replace("enforce", "testing")
NOW = datetime.datetime.now(datetime.UTC)

QUEUED = ("250", "2.6.0")
POLICY_REFUSED = ("451", "4.7.5")
TLS_FAILED = ("421", "4.7.0")


def is_(reply: Reply, named: tuple[str, str]) -> bool:
    return reply.code == named[0] and reply.enhanced_status_code == named[1]


def message(rcpt: str = f"rcpt@{DOMAIN}") -> Envelope:
    env = Envelope("sender@origin.test", [rcpt])
    env.parse(b"Subject: tls policy test\r\nFrom: sender@origin.test\r\n\r\nhello\r\n")
    return env


def delivered(results: Any) -> bool:
    return isinstance(results, dict) and all(is_(r, QUEUED) for r in results.values())


def server_context(ca: trustme.CA, *names: str, **cert_kwargs: Any) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names, **cert_kwargs).configure_cert(ctx)
    return ctx


def leaf_der(ctx_ca: trustme.CA, *names: str) -> tuple[ssl.SSLContext, bytes, bytes]:
    """A server context for *names*, its leaf (DER) and its SPKI SHA-256."""
    from slimta.relay.smtp.dane import spki_der

    cert = ctx_ca.issue_cert(*names)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    der = ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())
    return ctx, der, hashlib.sha256(spki_der(der)).digest()


# ------------------------------------------------------------------ servers
class Mx:
    """One SmtpEdge playing an exchanger, recording what it received and how."""

    def __init__(
        self, listener: socket.socket, context: ssl.SSLContext | None, **edge_kwargs: Any
    ) -> None:
        self.connections = 0
        self.envelopes: list[Envelope] = []
        self.security: list[str | None] = []
        mx = self

        class Validators(SmtpValidators):
            def handle_banner(self, reply: Reply, address: Any) -> None:
                mx.connections += 1

            def handle_mail(self, reply: Reply, sender: str, params: Any) -> None:
                mx.security.append(self.session.security)

        class QuietEdge(SmtpEdge):
            ptr_lookup = False

        self.edge = QuietEdge(
            listener,
            self,
            validator_class=Validators,
            hostname="mx.test",
            context=context,
            **edge_kwargs,
        )
        self.edge.start()

    def enqueue(self, envelope: Envelope) -> list[tuple[Envelope, str]]:
        self.envelopes.append(envelope)
        return [(envelope, f"id-{len(self.envelopes)}")]

    def kill(self) -> None:
        self.edge.kill()


class StripStartTls:
    """The stripping attacker: relays to a real server, removing STARTTLS
    from its EHLO reply, so the client sees a server without TLS."""

    def __init__(self, listener: socket.socket, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.connections = 0
        self.server = StreamServer(listener, self._handle)
        self.server.start()

    def _handle(self, client: Any, address: Any) -> None:
        self.connections += 1
        upstream = gevent.socket.create_connection(self.upstream, 5)
        pump = gevent.spawn(self._copy, client, upstream)
        try:
            self._filter(upstream, client)
        finally:
            pump.kill()
            upstream.close()

    @staticmethod
    def _copy(src: Any, dst: Any) -> None:
        while data := src.recv(65536):
            dst.sendall(data)

    @staticmethod
    def _filter(src: Any, dst: Any) -> None:
        buffer = b""
        held: bytes | None = None  # a "250-" line, until we know what follows
        while data := src.recv(65536):
            buffer += data
            *lines, buffer = buffer.split(b"\r\n")
            out = []
            for line in lines:
                if line[4:].upper() == b"STARTTLS" and line[:3] == b"250":
                    if line[3:4] == b" " and held is not None:
                        out.append(b"250 " + held[4:])
                        held = None
                    continue
                if held is not None:
                    out.append(held)
                    held = None
                if line.startswith(b"250-"):
                    held = line
                else:
                    out.append(line)
            if out:
                dst.sendall(b"".join(item + b"\r\n" for item in out))

    def kill(self) -> None:
        self.server.stop(timeout=1)


def _listeners_on_one_port(ips: list[str]) -> list[socket.socket]:
    for _ in range(50):
        socks: list[socket.socket] = []
        try:
            port = 0
            for ip in ips:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
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


class Exchangers:
    """The exchangers of one test on 127.0.0.2 (mx1) and 127.0.0.3 (mx2)."""

    def __init__(self) -> None:
        self.port = 0
        self.running: list[Any] = []
        self.listeners: list[socket.socket] = []

    def _listeners(self) -> list[socket.socket]:
        if not self.listeners:
            self.listeners = _listeners_on_one_port(["127.0.0.2", "127.0.0.3"])
            self.port = self.listeners[0].getsockname()[1]
        return self.listeners

    def mx1(self, context: ssl.SSLContext | None, **edge_kwargs: Any) -> Mx:
        made = Mx(self._listeners()[0], context, **edge_kwargs)
        self.running.append(made)
        return made

    def mx2(self, context: ssl.SSLContext | None) -> Mx:
        made = Mx(self._listeners()[1], context)
        self.running.append(made)
        return made

    def stripped_mx1(self, context: ssl.SSLContext) -> tuple[StripStartTls, Mx]:
        """mx1's address is the attacker's; the real server is behind it on mx2's."""
        listeners = self._listeners()
        real = Mx(listeners[1], context)
        attacker = StripStartTls(listeners[0], ("127.0.0.3", self.port))
        self.running += [real, attacker]
        return attacker, real

    def close(self) -> None:
        for item in self.running:
            item.kill()
        for sock in self.listeners:
            sock.close()


@pytest.fixture
def exchangers() -> Iterator[Exchangers]:
    made = Exchangers()
    yield made
    made.close()


class PolicyServer:
    """A real HTTPS server for ``/.well-known/mta-sts.txt`` (gevent.pywsgi)."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.status = "200 OK"
        self.body = ENFORCE.encode()
        self.content_type = "text/plain; charset=utf-8"
        self.headers: list[tuple[str, str]] = []
        self.requests = 0
        self.paths: list[str] = []
        self.hold: gevent.event.Event | None = None
        #: Set when a request arrives.
        self.arrived = gevent.event.Event()
        self.server = WSGIServer(
            (POLICY_IP, 0), self._app, ssl_context=context, log=None, error_log=None
        )
        self.server.start()
        self.port: int = self.server.server_port

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        self.requests += 1
        self.paths.append(environ["PATH_INFO"])
        self.arrived.set()
        if self.hold is not None:
            self.hold.wait(10)
        if environ["PATH_INFO"] != "/.well-known/mta-sts.txt":
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"no"]
        start_response(self.status, [("Content-Type", self.content_type), *self.headers])
        return [self.body]

    def serve(self, policy: str) -> None:
        self.body = policy.encode()

    def close(self) -> None:
        if self.hold is not None:
            self.hold.set()
        self.server.stop(timeout=1)


@pytest.fixture
def policy_server(tls_ca: trustme.CA) -> Iterator[PolicyServer]:
    made = PolicyServer(server_context(tls_ca, POLICY_HOST))
    yield made
    made.close()


class Clock:
    """Wall-clock seconds for the policy cache, moved by hand."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def via_test_dns(address: tuple[str, int], timeout: float | None = None) -> socket.socket:
    """A ``socket_creator`` resolving the host through DNSResolver."""
    host, port = address
    records = DNSResolver.query(host, "A").get(timeout=5)
    sock: socket.socket = gevent.socket.create_connection((records[0].host, port), timeout)
    return sock


def zone(
    dns: dnsserver.DnsServer,
    *,
    mx: tuple[str, ...] = ("mx1",),
    sts_id: str | None = "1",
) -> None:
    """MX records (preference 10, 20 ...), their A records, the MTA-STS TXT
    record and the policy host's address."""
    dns.set(DOMAIN, "MX", [(300, f"{10 * (i + 1)} {n}.{DOMAIN}.") for i, n in enumerate(mx)])
    dns.set(MX1, "A", [(300, "127.0.0.2")])
    dns.set(MX2, "A", [(300, "127.0.0.3")])
    dns.set(POLICY_HOST, "A", [(300, POLICY_IP)])
    if sts_id is not None:
        dns.set(f"_mta-sts.{DOMAIN}", "TXT", [(300, f"v=STSv1; id={sts_id}")])


class Harness:
    """Builds relays with the test's DNS, policy host and trust, and keeps
    every :class:`TlsOutcome` they report."""

    def __init__(
        self, dns: dnsserver.DnsServer, client_context: ssl.SSLContext, policy_port: int
    ) -> None:
        self.dns = dns
        self.client_context = client_context
        self.policy_port = policy_port
        self.clock = Clock()
        self.outcomes: list[TlsOutcome] = []
        self.relays: list[MxSmtpRelay] = []

    def mta_sts(self, **kwargs: Any) -> MtaSts:
        fetcher = HttpsPolicyFetcher(self.client_context, port=self.policy_port, timeout=5.0)
        kwargs.setdefault("fetcher", fetcher)
        kwargs.setdefault("clock", self.clock)
        return MtaSts(**kwargs)

    def dane(self) -> Dane:
        return Dane(TrustedResolver([f"127.0.0.1:{self.dns.port}"], timeout=1.0, tries=1))

    def relay(self, port: int, *, sts: bool = False, dane: bool = False, **kw: Any) -> MxSmtpRelay:
        kw.setdefault("context", self.client_context)
        kw.setdefault("socket_creator", via_test_dns)
        kw.setdefault("connect_timeout", 3.0)
        kw.setdefault("command_timeout", 3.0)
        kw.setdefault("ehlo_as", "relay.test")
        if sts:
            kw.setdefault("mta_sts", self.mta_sts())
        if dane:
            kw.setdefault("dane", self.dane())
        relay = MxSmtpRelay(port=port, tls_report=self.outcomes.append, **kw)
        self.relays.append(relay)
        return relay

    def results(self) -> list[tuple[str, str, TlsResult, bool]]:
        return [(o.policy_type, o.mx_host, o.result, o.enforced) for o in self.outcomes]


@pytest.fixture
def harness(
    dns_server: dnsserver.DnsServer, client_context: ssl.SSLContext, policy_server: PolicyServer
) -> Iterator[Harness]:
    made = Harness(dns_server, client_context, policy_server.port)
    yield made
    for relay in made.relays:
        relay.kill()


def refused(relay: MxSmtpRelay, env: Envelope | None = None) -> Reply:
    """The reply of an attempt that must fail transiently."""
    with pytest.raises(TransientRelayError) as info:
        relay.attempt(env or message(), 0)
    return info.value.reply


# ============================================================ MTA-STS enforce
def test_enforce_delivers_over_verified_tls(
    harness: Harness, exchangers: Exchangers, policy_server: PolicyServer, tls_ca: trustme.CA
) -> None:
    zone(harness.dns)
    mx1 = exchangers.mx1(server_context(tls_ca, MX1))
    assert delivered(harness.relay(exchangers.port, sts=True).attempt(message(), 0))
    assert mx1.security == ["TLS"] and len(mx1.envelopes) == 1
    assert policy_server.paths == ["/.well-known/mta-sts.txt"]
    assert harness.results() == [("sts", MX1, TlsResult.SUCCESS, False)]


@pytest.mark.parametrize(
    ("case", "result", "reason"),
    [
        ("mismatch", TlsResult.CERTIFICATE_HOST_MISMATCH, "Hostname mismatch"),
        ("expired", TlsResult.CERTIFICATE_EXPIRED, "certificate has expired"),
        ("unknown-ca", TlsResult.CERTIFICATE_NOT_TRUSTED, "unable to get local issuer"),
        ("no-tls", TlsResult.STARTTLS_NOT_SUPPORTED, f"{MX1} did not offer STARTTLS"),
    ],
)
def test_enforce_refuses_bad_tls(
    harness: Harness,
    exchangers: Exchangers,
    tls_ca: trustme.CA,
    case: str,
    result: TlsResult,
    reason: str,
) -> None:
    contexts: dict[str, ssl.SSLContext | None] = {
        "mismatch": server_context(tls_ca, "other.test"),
        "expired": server_context(
            tls_ca,
            MX1,
            not_before=NOW - datetime.timedelta(days=30),
            not_after=NOW - datetime.timedelta(days=1),
        ),
        "unknown-ca": server_context(trustme.CA(), MX1),
        "no-tls": None,
    }
    zone(harness.dns)
    mx1 = exchangers.mx1(contexts[case])
    reply = refused(harness.relay(exchangers.port, sts=True))
    assert is_(reply, POLICY_REFUSED), reply
    assert reply.message is not None
    assert reply.message.startswith("4.7.5 MTA-STS: ") and MX1 in reply.message
    assert reason in reply.message
    assert not mx1.envelopes
    assert harness.results() == [("sts", MX1, result, True)]


def test_stripping_attacker(harness: Harness, exchangers: Exchangers, tls_ca: trustme.CA) -> None:
    zone(harness.dns)
    attacker, real = exchangers.stripped_mx1(server_context(tls_ca, MX1))
    # Without a policy the attack works: the mail goes in plain text.
    assert delivered(harness.relay(exchangers.port).attempt(message(), 0))
    assert real.security == [None] and attacker.connections == 1
    # With the domain's enforce policy, nothing is sent.
    reply = refused(harness.relay(exchangers.port, sts=True))
    assert is_(reply, POLICY_REFUSED)
    assert reply.message == f"4.7.5 MTA-STS: {MX1} did not offer STARTTLS"
    assert len(real.envelopes) == 1 and attacker.connections == 2
    assert harness.results() == [("sts", MX1, TlsResult.STARTTLS_NOT_SUPPORTED, True)]


def test_enforce_goes_on_to_the_next_mx(
    harness: Harness, exchangers: Exchangers, tls_ca: trustme.CA
) -> None:
    zone(harness.dns, mx=("mx1", "mx2"))
    mx1 = exchangers.mx1(None)
    mx2 = exchangers.mx2(server_context(tls_ca, MX2))
    # RFC 8461 5.1: a host that fails the policy is skipped, in the same attempt.
    assert delivered(harness.relay(exchangers.port, sts=True).attempt(message(), 0))
    assert (len(mx1.envelopes), mx2.security) == (0, ["TLS"])
    assert harness.results() == [
        ("sts", MX1, TlsResult.STARTTLS_NOT_SUPPORTED, True),
        ("sts", MX2, TlsResult.SUCCESS, False),
    ]


def test_enforce_skips_mx_hosts_not_in_the_policy(
    harness: Harness, exchangers: Exchangers, policy_server: PolicyServer, tls_ca: trustme.CA
) -> None:
    zone(harness.dns, mx=("mx1", "mx2"))
    policy_server.serve(ENFORCE.replace("*.example.test", MX2))
    mx1 = exchangers.mx1(server_context(tls_ca, MX1))
    mx2 = exchangers.mx2(server_context(tls_ca, MX2))
    assert delivered(harness.relay(exchangers.port, sts=True).attempt(message(), 0))
    # mx1 has the better preference, but the policy does not list it.
    assert (mx1.connections, len(mx2.envelopes)) == (0, 1)
    assert ("sts", MX1, TlsResult.VALIDATION_FAILURE, True) in harness.results()


def test_enforce_without_any_matching_mx(
    harness: Harness, exchangers: Exchangers, policy_server: PolicyServer, tls_ca: trustme.CA
) -> None:
    zone(harness.dns, mx=("mx1", "mx2"))
    policy_server.serve(ENFORCE.replace("*.example.test", "mail.elsewhere.test"))
    mx1 = exchangers.mx1(server_context(tls_ca, MX1))
    reply = refused(harness.relay(exchangers.port, sts=True))
    assert is_(reply, POLICY_REFUSED)
    assert reply.message == f"4.7.5 MTA-STS: no MX host of {DOMAIN} matches its policy"
    assert mx1.connections == 0


# ============================================================ testing, none
def test_testing_mode_delivers_and_reports(
    harness: Harness, exchangers: Exchangers, policy_server: PolicyServer
) -> None:
    zone(harness.dns, mx=("mx1", "mx2"))
    policy_server.serve(TESTING.replace("*.example.test", MX2))
    mx1 = exchangers.mx1(None)
    assert delivered(harness.relay(exchangers.port, sts=True).attempt(message(), 0))
    assert mx1.security == [None]
    assert harness.results() == [
        ("sts", MX1, TlsResult.VALIDATION_FAILURE, False),
        ("sts", MX1, TlsResult.STARTTLS_NOT_SUPPORTED, False),
    ]


def test_testing_mode_keeps_the_relays_tls(
    harness: Harness, exchangers: Exchangers, policy_server: PolicyServer, tls_ca: trustme.CA
) -> None:
    # "As before": the relay's own (verifying) context still refuses a bad
    # certificate, with the usual TLS failure, and the outcome is reported.
    zone(harness.dns)
    policy_server.serve(TESTING)
    exchangers.mx1(server_context(tls_ca, "other.test"))
    reply = refused(harness.relay(exchangers.port, sts=True))
    assert is_(reply, TLS_FAILED)
    assert harness.results() == [("sts", MX1, TlsResult.CERTIFICATE_HOST_MISMATCH, False)]


@pytest.mark.parametrize("sts_id", ["1", None])
def test_mode_none_or_no_record_is_no_policy(
    harness: Harness, exchangers: Exchangers, policy_server: PolicyServer, sts_id: str | None
) -> None:
    zone(harness.dns, sts_id=sts_id)
    policy_server.serve("version: STSv1\nmode: none\nmax_age: 600\n")
    mx1 = exchangers.mx1(None)
    assert delivered(harness.relay(exchangers.port, sts=True).attempt(message(), 0))
    assert mx1.security == [None] and harness.outcomes == []
    assert policy_server.requests == (1 if sts_id else 0)


# =================================================================== caching
def test_policy_fetched_once_for_many_messages(
    harness: Harness, exchangers: Exchangers, policy_server: PolicyServer, tls_ca: trustme.CA
) -> None:
    zone(harness.dns)
    mx1 = exchangers.mx1(server_context(tls_ca, MX1))
    relay = harness.relay(exchangers.port, sts=True)
    for _ in range(3):
        assert delivered(relay.attempt(message(), 0))
    assert policy_server.requests == 1 and len(mx1.envelopes) == 3


def test_changed_id_fetches_again(harness: Harness, policy_server: PolicyServer) -> None:
    zone(harness.dns)
    sts = harness.mta_sts()
    assert sts.policy(DOMAIN) is not None and policy_server.requests == 1
    assert sts.lookup(DOMAIN).policy_id == "1" and policy_server.requests == 1
    policy_server.serve(TESTING)
    harness.dns.set(f"_mta-sts.{DOMAIN}", "TXT", [(300, "v=STSv1; id=2")])
    DNSResolver.cache.clear()
    found = sts.lookup(DOMAIN)
    assert found.policy is not None and found.policy.mode == "testing"
    assert (found.policy_id, policy_server.requests) == ("2", 2)
    # The same id again: the cached policy, no fetch.
    assert sts.lookup(DOMAIN).policy_id == "2" and policy_server.requests == 2


def test_failed_fetch_keeps_the_cached_policy(
    harness: Harness, exchangers: Exchangers, policy_server: PolicyServer
) -> None:
    zone(harness.dns)
    exchangers.mx1(None)
    relay = harness.relay(exchangers.port, sts=True)
    assert is_(refused(relay), POLICY_REFUSED)
    # A new id, but the policy host fails: the cached enforce policy applies
    # (RFC 8461 5.1), so the MX without TLS still gets nothing.
    harness.dns.set(f"_mta-sts.{DOMAIN}", "TXT", [(300, "v=STSv1; id=2")])
    DNSResolver.cache.clear()
    policy_server.status = "500 Internal Server Error"
    assert is_(refused(relay), POLICY_REFUSED)
    fetch_errors = [o for o in harness.outcomes if o.result is TlsResult.STS_POLICY_FETCH_ERROR]
    assert len(fetch_errors) == 1 and "answered 500" in fetch_errors[0].detail
    # Nor does the TXT record's removal end it.
    harness.dns.remove(f"_mta-sts.{DOMAIN}")
    DNSResolver.cache.clear()
    assert is_(refused(relay), POLICY_REFUSED)
    # Once it expires, with no live policy, delivery goes on without one.
    harness.clock.now += 86400
    assert delivered(relay.attempt(message(), 0))


def test_failed_fetch_without_cache_is_no_policy(
    harness: Harness, exchangers: Exchangers, policy_server: PolicyServer
) -> None:
    zone(harness.dns)
    policy_server.status = "503 Service Unavailable"
    mx1 = exchangers.mx1(None)
    assert delivered(harness.relay(exchangers.port, sts=True).attempt(message(), 0))
    assert mx1.security == [None]
    assert harness.results() == [("sts", "", TlsResult.STS_POLICY_FETCH_ERROR, False)]


def test_failed_fetch_is_retried_after_an_interval(
    harness: Harness, policy_server: PolicyServer
) -> None:
    zone(harness.dns)
    sts = harness.mta_sts(retry_interval=300.0)
    policy_server.status = "500 Internal Server Error"
    assert sts.lookup(DOMAIN).error is not None
    assert sts.lookup(DOMAIN).error is not None and policy_server.requests == 1
    policy_server.status = "200 OK"
    harness.clock.now += 299
    assert sts.policy(DOMAIN) is None and policy_server.requests == 1
    harness.clock.now += 1
    assert sts.policy(DOMAIN) is not None and policy_server.requests == 2


def test_policy_cache_on_disk(harness: Harness, policy_server: PolicyServer, tmp_path: Any) -> None:
    zone(harness.dns)
    first = harness.mta_sts(cache_dir=tmp_path / "sts")
    assert first.policy(DOMAIN) is not None
    saved = json.loads((tmp_path / "sts" / f"{DOMAIN}.json").read_text())
    assert (saved["domain"], saved["id"], saved["policy"]) == (DOMAIN, "1", ENFORCE)
    assert saved["expires"] == harness.clock.now + 86400

    def broken(domain: str) -> bytes:
        raise PolicyFetchError("down")

    # A new process: the policy comes from the disk, not the network.
    second = harness.mta_sts(cache_dir=tmp_path / "sts", fetcher=broken)
    policy = second.policy(DOMAIN)
    assert policy is not None and policy.enforce and policy_server.requests == 1
    # Expired on disk: ignored.
    harness.clock.now += 86400
    assert harness.mta_sts(cache_dir=tmp_path / "sts", fetcher=broken).policy(DOMAIN) is None


def test_broken_fetcher_is_a_failed_fetch(harness: Harness) -> None:
    zone(harness.dns)

    def broken(domain: str) -> bytes:
        raise RuntimeError("bug")

    found = harness.mta_sts(fetcher=broken).lookup(DOMAIN)
    assert found.policy is None and found.error is not None
    assert found.error.result is TlsResult.STS_POLICY_FETCH_ERROR
    assert "RuntimeError('bug')" in found.error.reason


def test_concurrent_lookups_share_one_fetch(harness: Harness, policy_server: PolicyServer) -> None:
    zone(harness.dns)
    sts = harness.mta_sts()
    policy_server.hold = gevent.event.Event()
    lookups = [gevent.spawn(sts.policy, DOMAIN) for _ in range(5)]
    # The five share one TXT answer; the first to go on fetches, and the
    # others wait for it by the time its request reaches the server.
    assert policy_server.arrived.wait(5)
    policy_server.hold.set()
    gevent.joinall(lookups, timeout=10, raise_error=True)
    assert all(g.value is not None for g in lookups)
    assert policy_server.requests == 1 and sts.fetches == 1


# ============================================================ policy fetching
@pytest.mark.parametrize(
    ("change", "result", "reason"),
    [
        (
            {"status": "301 Moved Permanently", "headers": [("Location", "https://x.test/")]},
            TlsResult.STS_POLICY_FETCH_ERROR,
            "redirect to https://x.test/ not followed",
        ),
        ({"status": "404 Not Found"}, TlsResult.STS_POLICY_FETCH_ERROR, "answered 404"),
        ({"content_type": "text/html"}, TlsResult.STS_POLICY_FETCH_ERROR, "not text/plain"),
        ({"content_type": "text/plainx"}, TlsResult.STS_POLICY_FETCH_ERROR, "not text/plain"),
        ({"body": b"x" * 70000}, TlsResult.STS_POLICY_FETCH_ERROR, "over 65536 bytes"),
        ({"body": b"version: STSv1\n"}, TlsResult.STS_POLICY_INVALID, "no mode field"),
        ({"body": b"\xff\xfe"}, TlsResult.STS_POLICY_INVALID, "not UTF-8"),
    ],
)
def test_fetch_rules(
    harness: Harness,
    policy_server: PolicyServer,
    change: dict[str, Any],
    result: TlsResult,
    reason: str,
) -> None:
    zone(harness.dns)
    for name, value in change.items():
        setattr(policy_server, name, value)
    found = harness.mta_sts().lookup(DOMAIN)
    assert found.policy is None and found.error is not None
    assert found.error.result is result and reason in found.error.reason


def test_fetch_accepts_text_plain_with_parameters(
    harness: Harness, policy_server: PolicyServer
) -> None:
    zone(harness.dns)
    policy_server.content_type = "Text/Plain ; charset=us-ascii"
    assert harness.mta_sts().policy(DOMAIN) is not None


@pytest.mark.parametrize("names", [(POLICY_HOST,), ("other.example.test",)])
def test_fetch_verifies_the_policy_host(
    harness: Harness, dns_server: dnsserver.DnsServer, tls_ca: trustme.CA, names: tuple[str, ...]
) -> None:
    zone(dns_server)
    # An unknown CA for the right name, or the test CA for another name.
    ca = trustme.CA() if names == (POLICY_HOST,) else tls_ca
    impostor = PolicyServer(server_context(ca, *names))
    try:
        fetcher = HttpsPolicyFetcher(harness.client_context, port=impostor.port, timeout=5.0)
        found = harness.mta_sts(fetcher=fetcher).lookup(DOMAIN)
    finally:
        impostor.close()
    assert found.policy is None and found.error is not None
    assert found.error.result is TlsResult.STS_WEBPKI_INVALID
    assert found.error.reason.startswith(f"certificate of {POLICY_HOST} not valid")


def test_fetch_is_time_bounded(harness: Harness, policy_server: PolicyServer) -> None:
    zone(harness.dns)
    policy_server.hold = gevent.event.Event()
    fetcher = HttpsPolicyFetcher(harness.client_context, port=policy_server.port, timeout=0.3)
    with gevent.Timeout(5):
        found = harness.mta_sts(fetcher=fetcher).lookup(DOMAIN)
    assert found.error is not None and "timed out" in found.error.reason


def test_fetch_without_policy_host_address(harness: Harness) -> None:
    zone(harness.dns)
    harness.dns.remove(POLICY_HOST)
    found = harness.mta_sts().lookup(DOMAIN)
    assert found.error is not None and f"no address for {POLICY_HOST}" in found.error.reason


# ====================================================================== DANE
def authenticate(dns: dnsserver.DnsServer, *hosts: str) -> None:
    for host in hosts:
        dns.authenticate(host, f"_25._tcp.{host}")


def test_dane_ee_authenticates_without_pkix(harness: Harness, exchangers: Exchangers) -> None:
    zone(harness.dns, sts_id=None)
    # A certificate no CA the relay trusts issued, for another name.
    ctx, _, spki = leaf_der(trustme.CA(), "whatever.test")
    mx1 = exchangers.mx1(ctx)
    harness.dns.set(f"_25._tcp.{MX1}", "TLSA", [(300, f"3 1 1 {spki.hex()}")])
    authenticate(harness.dns, MX1)
    assert delivered(harness.relay(exchangers.port, dane=True).attempt(message(), 0))
    assert mx1.security == ["TLS"]
    assert harness.results() == [("tlsa", MX1, TlsResult.SUCCESS, False)]


def test_dane_mismatch_is_refused(
    harness: Harness, exchangers: Exchangers, tls_ca: trustme.CA
) -> None:
    zone(harness.dns, sts_id=None)
    # A perfectly good PKIX certificate, but not the key the TLSA record names.
    mx1 = exchangers.mx1(server_context(tls_ca, MX1))
    harness.dns.set(f"_25._tcp.{MX1}", "TLSA", [(300, f"3 1 1 {'ab' * 32}")])
    authenticate(harness.dns, MX1)
    relay = harness.relay(exchangers.port, dane=True)
    reply = refused(relay)
    assert is_(reply, POLICY_REFUSED)
    assert reply.message == f"4.7.5 DANE: certificate of {MX1} matches no TLSA record"
    assert not mx1.envelopes
    assert harness.results() == [("tlsa", MX1, TlsResult.CERTIFICATE_NOT_TRUSTED, True)]


def test_dane_needs_the_ad_bit(
    harness: Harness, exchangers: Exchangers, tls_ca: trustme.CA
) -> None:
    zone(harness.dns, sts_id=None)
    mx1 = exchangers.mx1(server_context(tls_ca, MX1))
    harness.dns.set(f"_25._tcp.{MX1}", "TLSA", [(300, f"3 1 1 {'ab' * 32}")])
    # The same records, not validated: DANE does not apply; opportunistic TLS.
    assert delivered(harness.relay(exchangers.port, dane=True).attempt(message(), 0))
    assert mx1.security == ["TLS"] and harness.outcomes == []
    # Validated TXT of the host but not its TLSA: still no DANE.
    harness.dns.authenticate(MX1)
    assert delivered(harness.relay(exchangers.port, dane=True).attempt(message(), 0))
    assert harness.outcomes == []


def test_dane_requires_starttls(harness: Harness, exchangers: Exchangers) -> None:
    zone(harness.dns, sts_id=None)
    mx1 = exchangers.mx1(None)
    harness.dns.set(f"_25._tcp.{MX1}", "TLSA", [(300, f"3 1 1 {'ab' * 32}")])
    authenticate(harness.dns, MX1)
    reply = refused(harness.relay(exchangers.port, dane=True))
    assert reply.message == f"4.7.5 DANE: {MX1} did not offer STARTTLS"
    assert not mx1.envelopes


@pytest.mark.parametrize("matching", [True, False])
def test_dane_with_implicit_tls(harness: Harness, exchangers: Exchangers, matching: bool) -> None:
    # tls_immediately (port 465 style): the records are checked right after
    # the handshake, before the banner is even read.
    zone(harness.dns, sts_id=None)
    ctx, _, spki = leaf_der(trustme.CA(), "whatever.test")
    mx1 = exchangers.mx1(ctx, tls_immediately=True)
    digest = spki.hex() if matching else "ab" * 32
    harness.dns.set(f"_25._tcp.{MX1}", "TLSA", [(300, f"3 1 1 {digest}")])
    authenticate(harness.dns, MX1)
    relay = harness.relay(exchangers.port, dane=True, tls_immediately=True)
    if matching:
        assert delivered(relay.attempt(message(), 0))
        assert mx1.security == ["TLS"]
        return
    reply = refused(relay)
    assert reply.command == b"[TLS]"
    assert reply.message == f"4.7.5 DANE: certificate of {MX1} matches no TLSA record"
    assert not mx1.envelopes


def test_dane_ta_with_the_intermediate_ca(harness: Harness, exchangers: Exchangers) -> None:
    from slimta.relay.smtp.dane import spki_der

    zone(harness.dns, sts_id=None)
    inter = trustme.CA().create_child_ca()
    mx1 = exchangers.mx1(server_context(inter, MX1))
    inter_der = ssl.PEM_cert_to_DER_cert(inter.cert_pem.bytes().decode())
    digest = hashlib.sha256(spki_der(inter_der)).hexdigest()
    harness.dns.set(f"_25._tcp.{MX1}", "TLSA", [(300, f"2 1 1 {digest}")])
    authenticate(harness.dns, MX1)
    assert delivered(harness.relay(exchangers.port, dane=True).attempt(message(), 0))
    assert mx1.security == ["TLS"]
    # The same anchor, a certificate for another name: DANE-TA checks names.
    exchangers.close()
    other = Exchangers()
    try:
        other.mx1(server_context(inter, "other.test"))
        reply = refused(harness.relay(other.port, dane=True))
        assert reply.message == f"4.7.5 DANE: certificate of {MX1} is not valid for {MX1}"
    finally:
        other.close()


def test_dane_wins_over_mta_sts(
    harness: Harness, exchangers: Exchangers, tls_ca: trustme.CA
) -> None:
    zone(harness.dns, mx=("mx1", "mx2"))
    # mx1: a certificate PKIX rejects, but the TLSA record names its key.
    ctx, _, spki = leaf_der(trustme.CA(), MX1)
    mx1 = exchangers.mx1(ctx)
    # mx2: a good PKIX certificate, but TLSA records for another key.
    mx2 = exchangers.mx2(server_context(tls_ca, MX2))
    harness.dns.set(f"_25._tcp.{MX1}", "TLSA", [(300, f"3 1 1 {spki.hex()}")])
    harness.dns.set(f"_25._tcp.{MX2}", "TLSA", [(300, f"3 1 1 {'cd' * 32}")])
    authenticate(harness.dns, MX1, MX2)
    relay = harness.relay(exchangers.port, sts=True, dane=True)
    assert delivered(relay.attempt(message(), 0))
    assert mx1.security == ["TLS"]
    # The enforce policy alone would take mx2; its TLSA records refuse it,
    # and MTA-STS never overrides DANE (RFC 8461 2).
    harness.dns.set(DOMAIN, "MX", [(300, f"10 {MX2}.")])
    DNSResolver.cache.clear()
    reply = refused(relay)
    assert reply.message == f"4.7.5 DANE: certificate of {MX2} matches no TLSA record"
    assert not mx2.envelopes
    assert harness.results() == [
        ("tlsa", MX1, TlsResult.SUCCESS, False),
        ("tlsa", MX2, TlsResult.CERTIFICATE_NOT_TRUSTED, True),
    ]


def test_dane_lookup_failure_makes_the_host_unusable(
    harness: Harness, exchangers: Exchangers, tls_ca: trustme.CA
) -> None:
    zone(harness.dns, mx=("mx1", "mx2"), sts_id=None)
    mx1 = exchangers.mx1(server_context(tls_ca, MX1))
    mx2 = exchangers.mx2(server_context(tls_ca, MX2))
    harness.dns.authenticate(MX1)  # a signed zone ...
    harness.dns.fail(f"_25._tcp.{MX1}")  # ... whose TLSA answer is bogus: SERVFAIL
    relay = harness.relay(exchangers.port, dane=True)
    assert delivered(relay.attempt(message(), 0))
    assert (mx1.connections, len(mx2.envelopes)) == (0, 1)
    assert harness.results()[0] == ("tlsa", MX1, TlsResult.TLSA_INVALID, True)
    # mx1 alone: the attempt fails for now, naming the host.
    harness.dns.set(DOMAIN, "MX", [(300, f"10 {MX1}.")])
    DNSResolver.cache.clear()
    reply = refused(harness.relay(exchangers.port, dane=True))
    assert is_(reply, POLICY_REFUSED) and reply.command == b"[TLSA]"
    assert reply.message is not None
    assert reply.message.startswith(f"4.7.5 DANE: TLSA lookup for {MX1} failed")
    assert mx1.connections == 0


def test_dane_lookup_failure_in_an_unsigned_zone_is_ignored(
    harness: Harness, exchangers: Exchangers, tls_ca: trustme.CA
) -> None:
    zone(harness.dns, sts_id=None)
    mx1 = exchangers.mx1(server_context(tls_ca, MX1))
    harness.dns.fail(f"_25._tcp.{MX1}")  # MX1's address is not validated
    assert delivered(harness.relay(exchangers.port, dane=True).attempt(message(), 0))
    assert len(mx1.envelopes) == 1 and harness.outcomes == []


def test_dane_unusable_records_still_require_tls(harness: Harness, exchangers: Exchangers) -> None:
    zone(harness.dns, mx=("mx1", "mx2"), sts_id=None)
    mx1 = exchangers.mx1(None)
    # Any certificate at all: no authentication, but TLS.
    mx2 = exchangers.mx2(server_context(trustme.CA(), "whatever.test"))
    for host in (MX1, MX2):
        # PKIX-EE(1) and an unknown matching type: unusable for SMTP.
        harness.dns.set(
            f"_25._tcp.{host}", "TLSA", [(300, f"1 1 1 {'ab' * 32}"), (300, "3 1 9 abcd")]
        )
    authenticate(harness.dns, MX1, MX2)
    assert delivered(harness.relay(exchangers.port, dane=True).attempt(message(), 0))
    assert (mx1.envelopes, mx2.security) == ([], ["TLS"])
    assert harness.results() == [
        ("tlsa", MX1, TlsResult.STARTTLS_NOT_SUPPORTED, True),
        ("tlsa", MX2, TlsResult.SUCCESS, False),
    ]


def test_policy_connections_are_pooled_apart(
    harness: Harness, exchangers: Exchangers, tls_ca: trustme.CA
) -> None:
    zone(harness.dns)
    harness.dns.set("other.test", "MX", [(300, f"10 {MX1}.")])  # no MTA-STS there
    mx1 = exchangers.mx1(server_context(tls_ca, MX1))
    relay = harness.relay(exchangers.port, sts=True, idle_timeout=5.0)
    assert delivered(relay.attempt(message(), 0))
    # Mail without a policy never rides the connection made under one ...
    assert delivered(relay.attempt(message("x@other.test"), 0))
    assert mx1.connections == 2
    # ... while mail under the same policy does.
    assert delivered(relay.attempt(message(), 0))
    assert mx1.connections == 2 and len(mx1.envelopes) == 3
    assert sorted(len(key) for key in relay._relays) == [2, 3]


# ======================================================== TrustedResolver
def test_trusted_resolver_reports_the_ad_bit(dns_server: dnsserver.DnsServer) -> None:
    resolver = TrustedResolver([f"127.0.0.1:{dns_server.port}"], timeout=1.0, tries=1)
    dns_server.set("a.test", "TLSA", [(300, f"3 1 1 {'00' * 32}")])
    dns_server.set("b.test", "A", [(300, "192.0.2.1")])
    answer = resolver.query("a.test", "TLSA")
    assert not answer.authenticated and answer.errno is None
    (record,) = answer.records
    assert (record.usage, record.selector, record.mtype, record.cert) == (3, 1, 1, bytes(32))
    dns_server.authenticate("a.test", "nowhere.test")
    resolver.clear()
    assert resolver.query("a.test.", "TLSA").authenticated
    # Validated denials: NXDOMAIN and NODATA.
    nx = resolver.query("nowhere.test", "TLSA")
    assert nx.authenticated and nx.errno == pycares.errno.ARES_ENOTFOUND and not nx.records
    nodata = resolver.query("b.test", "TLSA")
    assert not nodata.authenticated and nodata.errno == pycares.errno.ARES_ENODATA
    # Answers are kept by TTL.
    lookups = resolver.lookups
    assert resolver.query("A.TEST", 52).authenticated and resolver.lookups == lookups
    assert dns_server.count("a.test", "TLSA") == 2


def test_trusted_resolver_failures(dns_server: dnsserver.DnsServer) -> None:
    resolver = TrustedResolver([f"127.0.0.1:{dns_server.port}"], timeout=0.2, tries=1)
    dns_server.set("bad.test", "TLSA", [(300, f"3 1 1 {'00' * 32}")])
    dns_server.fail("bad.test")
    with pytest.raises(DNSError) as info:
        resolver.query("bad.test", "TLSA")
    assert info.value.errno == pycares.errno.ARES_ESERVFAIL
    dns_server.drop("slow.test")
    with pytest.raises(DNSError) as info:
        resolver.query("slow.test", "TLSA")
    assert info.value.errno == pycares.errno.ARES_ETIMEOUT


def test_trusted_resolver_uses_tcp_for_large_answers(dns_server: dnsserver.DnsServer) -> None:
    resolver = TrustedResolver([f"127.0.0.1:{dns_server.port}"], timeout=1.0, tries=1)
    records = [(300, f"3 0 0 {bytes([i]).hex() * 200}") for i in range(10)]
    dns_server.set("big.test", "TLSA", records)
    dns_server.authenticate("big.test")
    answer = resolver.query("big.test", "TLSA")
    assert answer.authenticated and len(answer.records) == 10


def test_trusted_resolver_refuses_bad_queries(dns_server: dnsserver.DnsServer) -> None:
    resolver = TrustedResolver([f"127.0.0.1:{dns_server.port}"], timeout=1.0, tries=1)
    for name in ("a" * 64 + ".test", "bad..name"):
        with pytest.raises(DNSError) as info:
            resolver.query(name, "TLSA")
        assert info.value.errno == pycares.errno.ARES_EBADNAME
    with pytest.raises(ValueError, match="unknown DNS query type"):
        resolver.query("ok.test", "NOPE")
    assert dns_server.total_queries == 0


# ============================================================ configuration
def test_relay_options(tmp_path: Any, client_context: ssl.SSLContext) -> None:
    relay = MxSmtpRelay(client_context, mta_sts=True, mta_sts_cache=tmp_path / "sts")
    assert relay.mta_sts is not None and relay.mta_sts.cache_dir == str(tmp_path / "sts")
    assert relay.verify_context is client_context and relay.dane is None
    # A context that does not verify is not used for enforce policies.
    lax = ssl.create_default_context()
    lax.check_hostname = False
    lax.verify_mode = ssl.CERT_NONE
    relay = MxSmtpRelay(lax)
    assert relay.verify_context is not lax and relay.verify_context.check_hostname
    with pytest.raises(ValueError, match="verify_context"):
        MxSmtpRelay(verify_context=lax)
    with pytest.raises(ValueError, match="mta_sts_cache"):
        MxSmtpRelay(mta_sts_cache=tmp_path)
    with pytest.raises(ValueError, match="mta_sts_cache"):
        MxSmtpRelay(mta_sts=MtaSts(), mta_sts_cache=tmp_path)
    # Off by default, as in 4.0.
    relay = MxSmtpRelay()
    assert relay.mta_sts is None and relay.dane is None
