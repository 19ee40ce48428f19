"""REQUIRETLS (RFC 8689) end to end, against real servers on loopback.

A client sends over STARTTLS (trustme certificates) to an SmtpEdge, whose
Queue (DictStorage) relays with MxSmtpRelay to SmtpEdges playing the
exchangers of ``example.test``; DNS, the MTA-STS policy host and the
exchangers are those of tests/integration/test_mx_tls_policy.py, whose
helpers and fixtures are imported. Bounces go to a recording queue.

Every wait is on an event that the delivery or the bounce sets; nothing
sleeps.
"""

from __future__ import annotations

import contextlib
import smtplib
import ssl
from collections.abc import Callable, Iterator
from typing import Any

import gevent.event
import pytest
import trustme
from test_mx_tls_policy import (
    DOMAIN,
    MX1,
    POLICY_REFUSED,
    Exchangers,
    Harness,
    Mx,
    PolicyServer,
    StripStartTls,
    authenticate,
    delivered,
    dns_server,
    exchangers,
    harness,
    is_,
    leaf_der,
    message,
    policy_server,
    refused,
    zone,
)
from test_mx_tls_policy import server_context as issued_context

from slimta.envelope import Envelope
from slimta.queue import Queue
from slimta.queue.dict import DictStorage
from slimta.relay import PermanentRelayError
from slimta.relay.smtp.mx import MxSmtpRelay
from slimta.relay.smtp.static import StaticSmtpRelay
from slimta.relay.smtp.tlspolicy import TlsResult
from slimta.smtp.reply import Reply

__all__ = ["dns_server", "exchangers", "harness", "policy_server"]  # fixtures, imported

pytestmark = pytest.mark.timeout(30)

#: Seconds a test waits for a delivery or a bounce.
WAIT = 10.0

REQUIRETLS_NEEDED = ("550", "5.7.30")
SECRET = b"From: sender@origin.test\r\nSubject: the plans\r\n\r\nthe secret body\r\n"


class Bounces:
    """A bounce queue that records what it is given."""

    def __init__(self) -> None:
        self.envelopes: list[Envelope] = []
        self.arrived = gevent.event.Event()

    def enqueue(self, envelope: Envelope) -> list[tuple[Envelope, str]]:
        self.envelopes.append(envelope)
        self.arrived.set()
        return [(envelope, f"bounce-{len(self.envelopes)}")]

    def one(self) -> Envelope:
        assert self.arrived.wait(WAIT), "no bounce"
        (bounce,) = self.envelopes
        return bounce


class Storage(DictStorage):
    """DictStorage noting the flag of each stored copy."""

    def __init__(self) -> None:
        super().__init__()
        self.flags: list[bool] = []

    def write(self, envelope: Envelope, timestamp: float) -> str:
        id = super().write(envelope, timestamp)
        self.flags.append(self.env_db[id].requiretls)
        return id


class QuietStripStartTls(StripStartTls):
    """The stripping attacker, whose greenlets end quietly when a peer
    resets: the origin's edge counts any greenlet that dies as a failure."""

    def _handle(self, client: Any, address: Any) -> None:
        with contextlib.suppress(OSError):
            super()._handle(client, address)

    @staticmethod
    def _copy(src: Any, dst: Any) -> None:
        with contextlib.suppress(OSError):
            StripStartTls._copy(src, dst)


def watch(mx: Mx) -> gevent.event.Event:
    """An event set when *mx* queues a message."""
    arrived = gevent.event.Event()
    enqueue = mx.enqueue

    def recording(envelope: Envelope) -> list[tuple[Envelope, str]]:
        try:
            return enqueue(envelope)
        finally:
            arrived.set()

    mx.enqueue = recording  # type: ignore[method-assign]
    return arrived


class Origin:
    """The origin MTA: an SmtpEdge with STARTTLS in front of a Queue that
    relays through *relay*."""

    def __init__(
        self,
        make_edge: Callable[..., tuple[Any, int, Any]],
        smtp: Callable[..., smtplib.SMTP],
        context: ssl.SSLContext,
        client_context: ssl.SSLContext,
        relay: MxSmtpRelay,
    ) -> None:
        self.bounces = Bounces()
        self.storage = Storage()
        self.queue = Queue(self.storage, relay, bounce_queue=self.bounces)
        self.queue.start()
        _, self.port, _ = make_edge(queue=self.queue, context=context)
        self.smtp = smtp
        self.client_context = client_context

    def send(
        self, data: bytes = SECRET, *, requiretls: bool = True, tls: bool = True
    ) -> smtplib.SMTP:
        """Send *data* to ``rcpt@example.test``, with REQUIRETLS on MAIL."""
        client = self.smtp(self.port)
        client.ehlo("client.test")
        if tls:
            client.starttls(context=self.client_context)
            client.ehlo("client.test")
        options = ["REQUIRETLS"] if requiretls else []
        client.sendmail("sender@origin.test", [f"rcpt@{DOMAIN}"], data, mail_options=options)
        client.quit()
        return client

    def close(self) -> None:
        self.queue.kill(block=True, timeout=WAIT)
        self.queue.relay_pool.join(timeout=WAIT)


@pytest.fixture
def origin(
    make_edge: Callable[..., tuple[Any, int, Any]],
    smtp: Callable[..., smtplib.SMTP],
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
) -> Iterator[Callable[[MxSmtpRelay], Origin]]:
    made: list[Origin] = []

    def factory(relay: MxSmtpRelay) -> Origin:
        origin = Origin(make_edge, smtp, server_context, client_context, relay)
        made.append(origin)
        return origin

    yield factory
    for origin in made:
        origin.close()


def bounce_text(bounce: Envelope) -> bytes:
    header, body = bounce.flatten()
    return header + body


# ================================================================ the edge
def test_edge_offers_requiretls_only_under_tls(
    make_edge: Callable[..., tuple[Any, int, Any]],
    smtp: Callable[..., smtplib.SMTP],
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
) -> None:
    _, port, queue = make_edge(context=server_context)
    client = smtp(port)
    client.ehlo("client.test")
    assert not client.has_extn("requiretls")
    code, text = client.mail("a@origin.test", ["REQUIRETLS"])
    assert (code, text) == (530, b"5.7.10 REQUIRETLS needs a TLS session")
    client.starttls(context=client_context)
    client.ehlo("client.test")
    assert client.has_extn("requiretls")
    client.sendmail("a@origin.test", ["b@example.test"], SECRET, ["REQUIRETLS"])
    client.sendmail("a@origin.test", ["b@example.test"], SECRET)
    assert [env.requiretls for env in queue.envelopes] == [True, False]


def test_edge_without_tls_or_with_requiretls_off(
    make_edge: Callable[..., tuple[Any, int, Any]],
    smtp: Callable[..., smtplib.SMTP],
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
) -> None:
    edge, port, _ = make_edge(context=server_context)
    edge.requiretls = False
    client = smtp(port)
    client.starttls(context=client_context)
    client.ehlo("client.test")
    assert not client.has_extn("requiretls")
    code, text = client.mail("a@origin.test", ["REQUIRETLS"])
    assert (code, text) == (555, b"5.5.4 Unsupported parameter: REQUIRETLS")
    _, plain_port, _ = make_edge()
    plain = smtp(plain_port)
    plain.ehlo("client.test")
    assert not plain.has_extn("requiretls") and not plain.has_extn("starttls")


# ========================================================== end to end, MX
def test_delivered_with_requiretls(
    harness: Harness,
    exchangers: Exchangers,
    tls_ca: trustme.CA,
    origin: Callable[[MxSmtpRelay], Origin],
) -> None:
    zone(harness.dns)
    mx1 = exchangers.mx1(issued_context(tls_ca, MX1))
    arrived = watch(mx1)
    sender = origin(harness.relay(exchangers.port, sts=True))
    sender.send()
    assert arrived.wait(WAIT)
    # Kept flagged in the queue (the storage holds a copy of its own).
    assert sender.storage.flags == [True]
    (received,) = mx1.envelopes
    # The exchanger's edge sets the flag only from REQUIRETLS on MAIL.
    assert received.requiretls is True and mx1.security == ["TLS"]
    assert received.flatten()[1] == b"the secret body\r\n"
    assert harness.results() == [("sts", MX1, TlsResult.SUCCESS, False)]
    assert sender.bounces.envelopes == []


def test_exchanger_without_requiretls_bounces(
    harness: Harness,
    exchangers: Exchangers,
    tls_ca: trustme.CA,
    origin: Callable[[MxSmtpRelay], Origin],
) -> None:
    zone(harness.dns)
    mx1 = exchangers.mx1(issued_context(tls_ca, MX1))
    mx1.edge.requiretls = False
    sender = origin(harness.relay(exchangers.port, sts=True))
    sender.send()
    bounce = sender.bounces.one()
    text = bounce_text(bounce)
    assert bounce.sender == "" and bounce.recipients == ["sender@origin.test"]
    assert b"550 5.7.30 REQUIRETLS support required: mx1.example.test does not offer" in text
    assert b"Status: 5.7.30" in text
    # RFC 8689 5: only the header block, and REQUIRETLS for the bounce too.
    assert b"Content-Type: text/rfc822-headers" in text and b"Subject: the plans" in text
    assert b"the secret body" not in text
    assert bounce.requiretls is True
    # A TLS session was made and verified, but no MAIL was sent.
    assert mx1.connections == 1 and mx1.envelopes == [] and mx1.security == []


@pytest.mark.parametrize("sts", [True, False])
def test_no_mta_sts_or_dane_bounces(
    harness: Harness,
    exchangers: Exchangers,
    tls_ca: trustme.CA,
    origin: Callable[[MxSmtpRelay], Origin],
    sts: bool,
) -> None:
    # The domain publishes no policy, or the relay applies none.
    zone(harness.dns, sts_id=None if sts else "1")
    mx1 = exchangers.mx1(issued_context(tls_ca, MX1))
    sender = origin(harness.relay(exchangers.port, sts=sts))
    sender.send()
    text = bounce_text(sender.bounces.one())
    reason = (
        f"{DOMAIN} has no MTA-STS policy, and DANE is off"
        if sts
        else f"neither MTA-STS nor DANE can authenticate the MX hosts of {DOMAIN}"
    )
    assert f"550 5.7.30 REQUIRETLS support required: {reason}".encode() in text
    assert mx1.connections == 0


def test_stripping_attacker_cannot_get_it(
    harness: Harness,
    exchangers: Exchangers,
    tls_ca: trustme.CA,
    origin: Callable[[MxSmtpRelay], Origin],
) -> None:
    zone(harness.dns)
    # mx1's address is the attacker's; the real server is behind it on mx2's.
    listeners = exchangers._listeners()
    real = Mx(listeners[1], issued_context(tls_ca, MX1))
    attacker = QuietStripStartTls(listeners[0], ("127.0.0.3", exchangers.port))
    exchangers.running += [real, attacker]
    sender = origin(harness.relay(exchangers.port, sts=True))
    sender.send()
    text = bounce_text(sender.bounces.one())
    assert (
        b"550 5.7.30 REQUIRETLS support required: MTA-STS: mx1.example.test did not offer "
        b"STARTTLS" in text
    )
    assert attacker.connections == 1 and real.envelopes == []


def test_bad_certificate_under_a_testing_policy_bounces(
    harness: Harness,
    exchangers: Exchangers,
    tls_ca: trustme.CA,
    policy_server: PolicyServer,
    origin: Callable[[MxSmtpRelay], Origin],
) -> None:
    # Testing mode would let other mail through; REQUIRETLS enforces it.
    zone(harness.dns)
    policy_server.serve("version: STSv1\nmode: testing\nmx: *.example.test\nmax_age: 86400\n")
    mx1 = exchangers.mx1(issued_context(tls_ca, "other.test"))
    sender = origin(harness.relay(exchangers.port, sts=True))
    sender.send()
    text = bounce_text(sender.bounces.one())
    assert b"550 5.7.30 REQUIRETLS support required: MTA-STS: certificate of" in text
    assert mx1.envelopes == []


def test_dane_authenticates_without_pkix(
    harness: Harness, exchangers: Exchangers, origin: Callable[[MxSmtpRelay], Origin]
) -> None:
    zone(harness.dns, sts_id=None)
    ctx, _, spki = leaf_der(trustme.CA(), "whatever.test")
    mx1 = exchangers.mx1(ctx)
    arrived = watch(mx1)
    harness.dns.set(f"_25._tcp.{MX1}", "TLSA", [(300, f"3 1 1 {spki.hex()}")])
    authenticate(harness.dns, MX1)
    sender = origin(harness.relay(exchangers.port, dane=True))
    sender.send()
    assert arrived.wait(WAIT)
    assert [env.requiretls for env in mx1.envelopes] == [True]
    assert harness.results() == [("tlsa", MX1, TlsResult.SUCCESS, False)]


# ========================================================== TLS-Required: No
def test_tls_required_no_goes_despite_mta_sts(
    harness: Harness, exchangers: Exchangers, origin: Callable[[MxSmtpRelay], Origin]
) -> None:
    zone(harness.dns)
    mx1 = exchangers.mx1(None)  # no STARTTLS: the enforce policy refuses it
    arrived = watch(mx1)
    relay = harness.relay(exchangers.port, sts=True)
    # Without the header field the policy holds the message back.
    assert is_(refused(relay), POLICY_REFUSED)
    sender = origin(relay)
    sender.send(b"TLS-Required: No\r\n" + SECRET, requiretls=False)
    assert arrived.wait(WAIT)
    (received,) = mx1.envelopes
    assert mx1.security == [None] and received.requiretls is False
    # The header field travels on (RFC 8689 4.2.2).
    assert received.tls_optional


def test_tls_required_no_ignored_with_requiretls(
    harness: Harness,
    exchangers: Exchangers,
    origin: Callable[[MxSmtpRelay], Origin],
) -> None:
    zone(harness.dns)
    mx1 = exchangers.mx1(None)
    sender = origin(harness.relay(exchangers.port, sts=True))
    sender.send(b"TLS-Required: No\r\n" + SECRET)
    text = bounce_text(sender.bounces.one())
    assert b"550 5.7.30 REQUIRETLS support required: MTA-STS:" in text
    assert mx1.envelopes == []


# ============================================================== smarthost
def static_message(requiretls: bool = True) -> Envelope:
    env = message()
    env.requiretls = requiretls
    return env


def static_refused(relay: StaticSmtpRelay) -> Reply:
    with pytest.raises(PermanentRelayError) as info:
        relay.attempt(static_message(), 0)
    return info.value.reply


def test_smarthost_needs_verified_tls_and_requiretls(
    exchangers: Exchangers, tls_ca: trustme.CA, client_context: ssl.SSLContext
) -> None:
    mx1 = exchangers.mx1(issued_context(tls_ca, "127.0.0.2"))
    relay = StaticSmtpRelay("127.0.0.2", exchangers.port, context=client_context)
    try:
        assert delivered(relay.attempt(static_message(), 0))
        assert [env.requiretls for env in mx1.envelopes] == [True]
        mx1.edge.requiretls = False
        reply = static_refused(relay)
        assert str(reply) == (
            "550 5.7.30 REQUIRETLS support required: 127.0.0.2 does not offer REQUIRETLS"
        )
        assert reply.command == b"MAIL" and reply.address == ("127.0.0.2", exchangers.port)
        # Other mail goes on over the same kind of session.
        assert delivered(relay.attempt(static_message(False), 0))
        assert len(mx1.envelopes) == 2
    finally:
        relay.kill()


def test_smarthost_unverified_tls_is_not_enough(exchangers: Exchangers, tls_ca: trustme.CA) -> None:
    exchangers.mx1(issued_context(tls_ca, "127.0.0.2"))
    unverified = ssl.create_default_context()
    unverified.check_hostname = False
    unverified.verify_mode = ssl.CERT_NONE
    relay = StaticSmtpRelay("127.0.0.2", exchangers.port, context=unverified)
    try:
        reply = static_refused(relay)
        assert str(reply) == (
            "550 5.7.30 REQUIRETLS support required: "
            "the certificate of 127.0.0.2 was not authenticated"
        )
        assert delivered(relay.attempt(static_message(False), 0))
    finally:
        relay.kill()


def test_smarthost_without_tls(exchangers: Exchangers, client_context: ssl.SSLContext) -> None:
    mx1 = exchangers.mx1(None)
    relay = StaticSmtpRelay("127.0.0.2", exchangers.port, context=client_context)
    try:
        reply = static_refused(relay)
        assert str(reply) == (
            "550 5.7.30 REQUIRETLS support required: 127.0.0.2 did not negotiate TLS"
        )
        assert mx1.envelopes == []
    finally:
        relay.kill()
