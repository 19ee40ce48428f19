"""PtrLookup and the SmtpEdge's PTR lookup against a real DNS server."""

from __future__ import annotations

import smtplib
import time
from collections.abc import Callable
from typing import Any

import pytest

import dnsserver
from dnsserver import DnsServer
from slimta.edge.smtp import SmtpEdge, SmtpValidators
from slimta.util.ptrlookup import PtrLookup

pytestmark = pytest.mark.timeout(30)

dns_server = dnsserver.dns_server

LOCALHOST_PTR = "1.0.0.127.in-addr.arpa"
V6_PTR = "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa"
QUEUED = ("250", "2.6.0")

EdgeFactory = Callable[..., tuple[Any, int, Any]]


def started(ip: str) -> PtrLookup:
    lookup = PtrLookup(ip)
    lookup.start()
    return lookup


def test_lookup_finds_the_name(dns_server: DnsServer) -> None:
    dns_server.set(LOCALHOST_PTR, "PTR", [(300, "client.example.test.")])
    assert started("127.0.0.1").finish(runtime=5.0) == "client.example.test"
    assert dns_server.count(LOCALHOST_PTR, "PTR") == 1


def test_lookup_of_an_ipv6_address(dns_server: DnsServer) -> None:
    dns_server.set(V6_PTR, "PTR", [(300, "six.example.test.")])
    assert started("2001:db8::1").finish(runtime=5.0) == "six.example.test"


def test_nxdomain_gives_none(dns_server: DnsServer) -> None:
    lookup = started("127.0.0.1")
    assert lookup.finish(runtime=5.0) is None
    assert lookup.successful()
    assert dns_server.count(LOCALHOST_PTR, "PTR") == 1


def test_never_answered_is_bounded_by_runtime(dns_server: DnsServer) -> None:
    dns_server.drop(LOCALHOST_PTR)
    with dns_server.slimta_resolver(timeout=5.0, tries=1):
        lookup = started("127.0.0.1")
        began = time.monotonic()
        assert lookup.finish(runtime=0.3) is None
        assert time.monotonic() - began < 0.3 + 0.5
        # finish() killed it.
        lookup.join(timeout=1.0)
        assert lookup.dead


# The edge ---------------------------------------------------------------------


def send_message(smtp: Callable[..., smtplib.SMTP], port: int) -> tuple[int, bytes]:
    client = smtp(port)
    client.ehlo("client.test")
    client.mail("sender@example.test")
    client.rcpt("rcpt@example.test")
    reply = client.data(b"Subject: ptr\r\n\r\nbody\r\n")
    client.quit()
    return reply


def test_edge_stores_the_ptr_name(
    dns_server: DnsServer,
    make_edge: EdgeFactory,
    smtp: Callable[..., smtplib.SMTP],
    reply_is: Callable[..., bool],
) -> None:
    dns_server.set(LOCALHOST_PTR, "PTR", [(300, "client.example.test.")])
    seen: list[str | None] = []

    class Validators(SmtpValidators):
        def handle_queued(self, reply: Any, results: Any) -> None:
            seen.append(self.session.reverse_address)

    _, port, queue = make_edge(validator_class=Validators)
    assert reply_is(send_message(smtp, port), QUEUED)
    (envelope,) = queue.envelopes
    assert envelope.client["host"] == "client.example.test"
    assert envelope.client["ip"] == "127.0.0.1"
    assert seen == ["client.example.test"]


def test_edge_asks_once_for_a_repeated_client(
    dns_server: DnsServer,
    make_edge: EdgeFactory,
    smtp: Callable[..., smtplib.SMTP],
    reply_is: Callable[..., bool],
) -> None:
    dns_server.set(LOCALHOST_PTR, "PTR", [(300, "client.example.test.")])
    _, port, queue = make_edge()
    for _ in range(3):
        assert reply_is(send_message(smtp, port), QUEUED)
    assert [e.client["host"] for e in queue.envelopes] == ["client.example.test"] * 3
    assert dns_server.count(LOCALHOST_PTR, "PTR") == 1


def test_edge_without_ptr_record(
    dns_server: DnsServer,
    make_edge: EdgeFactory,
    smtp: Callable[..., smtplib.SMTP],
    reply_is: Callable[..., bool],
) -> None:
    _, port, queue = make_edge()
    assert reply_is(send_message(smtp, port), QUEUED)
    assert queue.envelopes[0].client["host"] is None
    assert dns_server.count(LOCALHOST_PTR, "PTR") == 1


def test_edge_does_not_wait_past_the_bound(
    dns_server: DnsServer,
    make_edge: EdgeFactory,
    smtp: Callable[..., smtplib.SMTP],
    reply_is: Callable[..., bool],
) -> None:
    dns_server.drop(LOCALHOST_PTR)
    with dns_server.slimta_resolver(timeout=10.0, tries=1):
        edge, port, queue = make_edge()
        edge.ptr_lookup_timeout = 0.5
        began = time.monotonic()
        client = smtp(port)
        banner_after = time.monotonic() - began
        client.ehlo("client.test")
        client.mail("sender@example.test")
        client.rcpt("rcpt@example.test")
        reply = client.data(b"Subject: ptr\r\n\r\nbody\r\n")
        queued_after = time.monotonic() - began
        client.quit()
    assert reply_is(reply, QUEUED)
    assert banner_after < 0.5
    assert 0.3 < queued_after < 0.5 + 1.0, f"250 after {queued_after:.2f}s"
    assert queue.envelopes[0].client["host"] is None
    assert dns_server.count(LOCALHOST_PTR, "PTR") == 1


def test_edge_ptr_lookup_can_be_turned_off(
    dns_server: DnsServer,
    make_edge: EdgeFactory,
    smtp: Callable[..., smtplib.SMTP],
    reply_is: Callable[..., bool],
) -> None:
    dns_server.set(LOCALHOST_PTR, "PTR", [(300, "client.example.test.")])
    edge, port, queue = make_edge()
    edge.ptr_lookup = False
    assert reply_is(send_message(smtp, port), QUEUED)
    assert queue.envelopes[0].client["host"] is None
    assert dns_server.total_queries == 0
    assert SmtpEdge.ptr_lookup is True
