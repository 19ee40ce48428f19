"""TLS reporting (RFC 8460) from a real MxSmtpRelay, against real servers.

The DNS server, the MTA-STS policy host and the exchangers (SmtpEdges on
127.0.0.2 and 127.0.0.3) are those of ``test_mx_tls_policy``, imported from
it. The domain publishes ``_smtp._tls`` and an MTA-STS ``enforce`` policy;
some deliveries succeed and some fail, and the day's report must count
exactly them, then travel as a mail through a real queue. The reporter and
the policy cache share the injected clock; no sleeps.
"""

from __future__ import annotations

import datetime
import email
import email.policy
import gzip
import ipaddress
import json
import os
import ssl
from collections.abc import Iterator
from email.message import EmailMessage
from typing import Any

import pytest
import test_mx_tls_policy as tls_policy
import trustme
from test_mx_tls_policy import (
    DOMAIN,
    ENFORCE,
    MX1,
    MX2,
    NOW,
    Exchangers,
    Harness,
    authenticate,
    delivered,
    leaf_der,
    message,
    refused,
    server_context,
    zone,
)

from slimta.queue import Queue
from slimta.queue.dict import DictStorage
from slimta.relay.smtp.mx import MxSmtpRelay
from slimta.relay.smtp.tlspolicy import TlsOutcome, TlsResult
from slimta.relay.smtp.tlsrpt import TlsReport, TlsReporter

# The fixtures of test_mx_tls_policy this module uses.
dns_server = tls_policy.dns_server
exchangers = tls_policy.exchangers
harness = tls_policy.harness
policy_server = tls_policy.policy_server

pytestmark = pytest.mark.timeout(30)

RUA = f"tlsrpt@{DOMAIN}"
TLSRPT = f"v=TLSRPTv1; rua=mailto:{RUA},https://reports.{DOMAIN}/tlsrpt"


@pytest.fixture
def reporter(harness: Harness, tmp_path: Any) -> Iterator[TlsReporter]:
    made = TlsReporter(
        tmp_path / "reports", "Relay Test", "tlsrpt-sender@relay.test", clock=harness.clock
    )
    yield made
    made.kill()


def reporting(relay: MxSmtpRelay, reporter: TlsReporter) -> MxSmtpRelay:
    """Have the relay's outcomes counted too (the harness keeps its own list)."""
    keep = relay.tls_report
    assert keep is not None

    def both(outcome: TlsOutcome) -> None:
        keep(outcome)
        reporter.record(outcome)

    relay.tls_report = both
    return relay


def next_day(harness: Harness) -> None:
    harness.clock.now += 86400.0


def only_report(reports: list[TlsReport]) -> dict[str, Any]:
    [report] = reports
    with open(report.path, "rb") as stream:
        data: dict[str, Any] = json.loads(gzip.decompress(stream.read()))
    assert data == report.report
    return data


def expected_day(harness: Harness) -> tuple[str, str]:
    day = datetime.datetime.fromtimestamp(harness.clock.now - 86400.0, datetime.UTC).date()
    return f"{day}T00:00:00Z", f"{day}T23:59:59Z"


@pytest.mark.parametrize(
    ("case", "result", "reason"),
    [
        ("mismatch", TlsResult.CERTIFICATE_HOST_MISMATCH, "Hostname mismatch"),
        ("expired", TlsResult.CERTIFICATE_EXPIRED, "certificate has expired"),
        ("no-tls", TlsResult.STARTTLS_NOT_SUPPORTED, f"{MX1} did not offer STARTTLS"),
    ],
)
def test_report_counts_the_sessions(
    harness: Harness,
    exchangers: Exchangers,
    tls_ca: trustme.CA,
    reporter: TlsReporter,
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
        "no-tls": None,
    }
    zone(harness.dns, mx=("mx1", "mx2"))
    harness.dns.set(f"_smtp._tls.{DOMAIN}", "TXT", [(300, TLSRPT)])
    exchangers.mx1(contexts[case])
    mx2 = exchangers.mx2(server_context(tls_ca, MX2))
    relay = reporting(harness.relay(exchangers.port, sts=True), reporter)
    # Each attempt: mx1 fails the enforce policy, mx2 takes the message.
    for _ in range(3):
        assert delivered(relay.attempt(message(), 0))
    assert len(mx2.envelopes) == 3 and mx2.security == ["TLS"] * 3
    assert harness.results().count(("sts", MX1, result, True)) == 3
    assert harness.results().count(("sts", MX2, TlsResult.SUCCESS, False)) == 3

    assert reporter.flush() == []  # the day is not over
    next_day(harness)
    report = only_report(reporter.flush())
    start, end = expected_day(harness)
    assert report["date-range"] == {"start-datetime": start, "end-datetime": end}
    assert report["organization-name"] == "Relay Test"
    assert report["contact-info"] == "tlsrpt-sender@relay.test"
    [policy] = report["policies"]
    assert policy["policy"] == {
        "policy-type": "sts",
        "policy-string": ENFORCE.strip().split("\n"),
        "policy-domain": DOMAIN,
        "mx-host": ["*.example.test"],
    }
    assert policy["summary"] == {
        "total-successful-session-count": 3,
        "total-failure-session-count": 3,
    }
    [detail] = policy["failure-details"]
    assert ipaddress.ip_address(detail.pop("sending-mta-ip")).is_loopback
    assert reason in detail.pop("failure-reason-code")
    assert detail == {
        "result-type": result.value,
        "receiving-mx-hostname": MX1,
        "receiving-ip": "127.0.0.2",
        "failed-session-count": 3,
    }


def test_refused_delivery_and_the_stripping_attacker(
    harness: Harness, exchangers: Exchangers, tls_ca: trustme.CA, reporter: TlsReporter
) -> None:
    zone(harness.dns)
    harness.dns.set(f"_smtp._tls.{DOMAIN}", "TXT", [(300, TLSRPT)])
    attacker, real = exchangers.stripped_mx1(server_context(tls_ca, MX1))
    relay = reporting(harness.relay(exchangers.port, sts=True), reporter)
    for _ in range(2):
        reply = refused(relay)
        assert reply.message == f"4.7.5 MTA-STS: {MX1} did not offer STARTTLS"
    assert attacker.connections == 2 and not real.envelopes
    next_day(harness)
    [policy] = only_report(reporter.flush())["policies"]
    assert policy["summary"] == {
        "total-successful-session-count": 0,
        "total-failure-session-count": 2,
    }
    [detail] = policy["failure-details"]
    assert detail["result-type"] == "starttls-not-supported"
    assert (detail["receiving-ip"], detail["failed-session-count"]) == ("127.0.0.2", 2)


def test_dane_sessions_are_reported_per_exchanger(
    harness: Harness, exchangers: Exchangers, tls_ca: trustme.CA, reporter: TlsReporter
) -> None:
    zone(harness.dns, sts_id=None)
    harness.dns.set(f"_smtp._tls.{DOMAIN}", "TXT", [(300, TLSRPT)])
    ctx, _, spki = leaf_der(trustme.CA(), "whatever.test")
    exchangers.mx1(ctx)
    harness.dns.set(f"_25._tcp.{MX1}", "TLSA", [(300, f"3 1 1 {spki.hex()}")])
    authenticate(harness.dns, MX1)
    relay = reporting(harness.relay(exchangers.port, dane=True), reporter)
    assert delivered(relay.attempt(message(), 0))
    next_day(harness)
    [policy] = only_report(reporter.flush())["policies"]
    assert policy["policy"] == {
        "policy-type": "tlsa",
        "policy-string": [f"3 1 1 {spki.hex().upper()}"],
        "policy-domain": DOMAIN,
        "mx-host": [MX1],
    }
    assert policy["summary"]["total-successful-session-count"] == 1


def test_no_report_for_a_domain_without_tlsrpt(
    harness: Harness, exchangers: Exchangers, tls_ca: trustme.CA, reporter: TlsReporter
) -> None:
    zone(harness.dns)
    exchangers.mx1(server_context(tls_ca, MX1))
    relay = reporting(harness.relay(exchangers.port, sts=True), reporter)
    for _ in range(2):
        assert delivered(relay.attempt(message(), 0))
    next_day(harness)
    assert reporter.flush() == []
    assert reporter.pending() == []


def test_report_mailed_through_a_queue(
    harness: Harness, exchangers: Exchangers, tls_ca: trustme.CA, reporter: TlsReporter
) -> None:
    zone(harness.dns, mx=("mx1", "mx2"))
    harness.dns.set(f"_smtp._tls.{DOMAIN}", "TXT", [(300, TLSRPT)])
    exchangers.mx1(None)
    exchangers.mx2(server_context(tls_ca, MX2))
    relay = reporting(harness.relay(exchangers.port, sts=True), reporter)
    assert delivered(relay.attempt(message(), 0))
    reporter.kill()  # saved ...
    restarted = TlsReporter(
        reporter.reports_dir, "Relay Test", "tlsrpt-sender@relay.test", clock=harness.clock
    )  # ... and carried on by the next process
    next_day(harness)
    [written] = restarted.flush()

    store = DictStorage()
    assert restarted.send(Queue(store)) == 1
    [envelope] = store.env_db.values()
    assert (envelope.sender, envelope.recipients) == ("tlsrpt-sender@relay.test", [RUA])
    header, body = envelope.flatten()
    msg = email.message_from_bytes(header + body, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "tlsrpt"
    assert str(msg["Subject"]) == (
        f"Report Domain: {DOMAIN} Submitter: relay.test Report-ID: <{written.report_id}>"
    )
    assert (msg["TLS-Report-Domain"], msg["TLS-Report-Submitter"]) == (DOMAIN, "relay.test")
    [attachment] = list(msg.iter_attachments())
    assert attachment.get_content_type() == "application/tlsrpt+gzip"
    assert attachment.get_filename() == written.filename
    report = json.loads(gzip.decompress(attachment.get_content()))
    assert report == written.report
    [policy] = report["policies"]
    assert policy["summary"] == {
        "total-successful-session-count": 1,
        "total-failure-session-count": 1,
    }
    assert os.listdir(os.path.join(restarted.reports_dir, "sent")) == [written.filename]
    restarted.kill()
