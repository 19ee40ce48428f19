"""slimta.relay.smtp.tlsrpt without a network: the TLSRPT record parser, the
counting, the report files (JSON shape, names), persistence and the mails.

DNS answers come from a fake query function behind a real
:class:`~slimta.util.dns.DNSCache` put in place of ``DNSResolver.cache``;
the reporter's clock is injected.
"""

from __future__ import annotations

import datetime
import email
import email.policy
import gzip
import json
import os
import re
import ssl
from collections.abc import Iterator
from email.message import EmailMessage
from typing import Any

import pycares.errno
import pytest
from gevent.event import AsyncResult

from slimta.envelope import Envelope
from slimta.queue import Queue, QueueError
from slimta.queue.dict import DictStorage
from slimta.relay.smtp import tlsrpt
from slimta.relay.smtp.tlspolicy import TlsOutcome, TlsResult
from slimta.relay.smtp.tlsrpt import (
    TlsReporter,
    TlsRptError,
    TlsRptRecord,
    parse_record,
    record_from_txt,
    report_filename,
    report_message,
)
from slimta.util.dns import DNSCache, DNSError, DNSResolver, TxtRecord

# RFC 8460 4.4, the JSON report schema: every field name a report may use.
TOP_FIELDS = {"organization-name", "date-range", "contact-info", "report-id", "policies"}
DATE_RANGE_FIELDS = {"start-datetime", "end-datetime"}
POLICY_ENTRY_FIELDS = {"policy", "summary", "failure-details"}
POLICY_FIELDS = {"policy-type", "policy-string", "policy-domain", "mx-host"}
SUMMARY_FIELDS = {"total-successful-session-count", "total-failure-session-count"}
FAILURE_FIELDS = {
    "result-type",
    "sending-mta-ip",
    "receiving-mx-hostname",
    "receiving-mx-helo",
    "receiving-ip",
    "failed-session-count",
    "additional-information",
    "failure-reason-code",
}
# RFC 8460 4.3: the result types.
RESULT_TYPES = {result.value for result in TlsResult}
# RFC 8460 5.1: sender!policy-domain!begin!end[!unique-id].json.gz
FILENAME = re.compile(r"([^!]+)!([^!]+)!([0-9]+)!([0-9]+)(?:!([A-Za-z0-9]+))?\.json\.gz")

DAY = datetime.date(2027, 1, 15)
MIDNIGHT = datetime.datetime(2027, 1, 15, tzinfo=datetime.UTC).timestamp()
STS_POLICY = ("version: STSv1", "mode: enforce", "mx: *.a.test", "max_age: 86400")
TLSA = ("3 1 1 " + "AB" * 32,)


# ------------------------------------------------------------------ helpers
class Clock:
    def __init__(self) -> None:
        self.now = MIDNIGHT + 3600.0

    def __call__(self) -> float:
        return self.now

    def next_day(self) -> None:
        self.now += 86400.0


class FakeDns:
    """TXT answers by name; anything else is NXDOMAIN."""

    def __init__(self) -> None:
        self.zone: dict[str, list[str] | int] = {}
        self.asked: list[str] = []

    def txt(self, domain: str, *texts: str) -> None:
        self.zone[f"_smtp._tls.{domain}"] = list(texts)

    def fail(self, domain: str, errno: int) -> None:
        self.zone[f"_smtp._tls.{domain}"] = errno

    def __call__(self, name: str, query_type: int) -> AsyncResult:
        self.asked.append(name)
        result = AsyncResult()
        value = self.zone.get(name, pycares.errno.ARES_ENOTFOUND)
        if isinstance(value, int):
            result.set_exception(DNSError(value))
        else:
            result.set([TxtRecord(text, text.encode(), 300) for text in value])
        return result


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> FakeDns:
    fake = FakeDns()
    monkeypatch.setattr(DNSResolver, "cache", DNSCache(fake))
    fake.txt("a.test", "v=TLSRPTv1; rua=mailto:tlsrpt@a.test")
    fake.txt("b.test", "v=TLSRPTv1;rua=mailto:one@b.test,mailto:two@reports.test")
    return fake


def warm(*domains: str) -> None:
    """Have the DNS cache hold the domains' answers, as after a first lookup."""
    for domain in domains:
        result = DNSResolver.query_cached(f"_smtp._tls.{domain}", "TXT")
        result.wait(2)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def reporter(tmp_path: Any, clock: Clock, dns: FakeDns) -> Iterator[TlsReporter]:
    made = TlsReporter(
        tmp_path / "reports", "Example Sender", "tls-reports@sender.test", clock=clock
    )
    yield made
    made.kill()


def sts(result: TlsResult = TlsResult.SUCCESS, **kw: Any) -> TlsOutcome:
    kw.setdefault("domain", "a.test")
    kw.setdefault("mx_host", "mx1.a.test")
    kw.setdefault("policy_string", STS_POLICY)
    kw.setdefault("mx_patterns", ("*.a.test",))
    kw.setdefault("sending_ip", "192.0.2.1")
    kw.setdefault("receiving_ip", "198.51.100.25")
    kw.setdefault("detail", "" if result is TlsResult.SUCCESS else f"{result.value} detail")
    kw.setdefault("enforced", result is not TlsResult.SUCCESS)
    return TlsOutcome("sts", result=result, **kw)


def read_report(path: str) -> dict[str, Any]:
    with open(path, "rb") as stream:
        data = stream.read()
    assert data[:2] == b"\x1f\x8b", "not gzip"
    report: dict[str, Any] = json.loads(gzip.decompress(data))
    return report


def check_schema(report: dict[str, Any]) -> None:
    """Every field name is one of RFC 8460 4.4's, and the required ones are there."""
    assert set(report) == TOP_FIELDS
    assert set(report["date-range"]) == DATE_RANGE_FIELDS
    for entry in report["policies"]:
        assert set(entry) <= POLICY_ENTRY_FIELDS and {"policy", "summary"} <= set(entry)
        assert set(entry["policy"]) <= POLICY_FIELDS
        assert {"policy-type", "policy-domain"} <= set(entry["policy"])
        assert entry["policy"]["policy-type"] in ("sts", "tlsa", "no-policy-found")
        assert set(entry["summary"]) == SUMMARY_FIELDS
        failures = entry.get("failure-details", [])
        for detail in failures:
            assert set(detail) <= FAILURE_FIELDS
            assert {"result-type", "failed-session-count"} <= set(detail)
            assert detail["result-type"] in RESULT_TYPES
        total = sum(detail["failed-session-count"] for detail in failures)
        assert entry["summary"]["total-failure-session-count"] == total


# ------------------------------------------------------------ record parser
@pytest.mark.parametrize(
    ("text", "rua", "mailto"),
    [
        ("v=TLSRPTv1; rua=mailto:r@example.com", ("mailto:r@example.com",), ("r@example.com",)),
        ("v=TLSRPTv1;rua=mailto:r@example.com", ("mailto:r@example.com",), ("r@example.com",)),
        (
            "v=TLSRPTv1 ;\trua=mailto:r@example.com ; ",
            ("mailto:r@example.com",),
            ("r@example.com",),
        ),
        ("v=TLSRPTv1; rua=mailto:r@example.com;", ("mailto:r@example.com",), ("r@example.com",)),
        (
            "v=TLSRPTv1; rua=mailto:a@x.test , https://reports.x.test/tls",
            ("mailto:a@x.test", "https://reports.x.test/tls"),
            ("a@x.test",),
        ),
        ("v=TLSRPTv1; rua=https://r.test/v1", ("https://r.test/v1",), ()),
        (
            "v=TLSRPTv1; ext=1; rua=mailto:a@x.test; x.y-z_1=a:b",
            ("mailto:a@x.test",),
            ("a@x.test",),
        ),
        ("v=TLSRPTv1; rua=mailto:a%21b@x.test", ("mailto:a%21b@x.test",), ("a!b@x.test",)),
        (
            "v=TLSRPTv1; rua=mailto:a@x.test%2Cb@y.test?subject=tls",
            ("mailto:a@x.test%2Cb@y.test?subject=tls",),
            ("a@x.test", "b@y.test"),
        ),
        ("v=TLSRPTv1; rua=MAILTO:a@x.test", ("MAILTO:a@x.test",), ("a@x.test",)),
        ("v=TLSRPTv1; rua=mailto:a@x.test,mailto:a@x.test", None, ("a@x.test",)),
        # Syntactically a URI, but a percent-encoded line break is no address.
        ("v=TLSRPTv1; rua=mailto:a@x.test%0D%0ABcc:e@evil.test", None, ()),
        ("v=TLSRPTv1; RUA=mailto:b@x.test; rua=mailto:a@x.test", None, ("a@x.test",)),
    ],
)
def test_valid_records(text: str, rua: tuple[str, ...] | None, mailto: tuple[str, ...]) -> None:
    record = parse_record(text)
    if rua is not None:
        assert record.rua == rua
    assert record.mailto == mailto
    assert record_from_txt([text]) == record


@pytest.mark.parametrize(
    "text",
    [
        "",
        "v=TLSRPTv2; rua=mailto:r@example.com",
        "v=tlsrptv1; rua=mailto:r@example.com",
        " v=TLSRPTv1; rua=mailto:r@example.com",
        "v=TLSRPTv1",
        "v=TLSRPTv1;",
        "v=TLSRPTv1; ",
        "v=TLSRPTv1 rua=mailto:r@example.com",
        "v=TLSRPTv1x; rua=mailto:r@example.com",
        "v=TLSRPTv1 x; rua=mailto:r@example.com",
        "v=TLSRPTv1, rua=mailto:r@example.com",
        "v=TLSRPTv1; ext=1",
        "v=TLSRPTv1; rua=",
        "v=TLSRPTv1; rua=mailto:r@example.com;;",
        "v=TLSRPTv1;; rua=mailto:r@example.com",
        "v=TLSRPTv1; rua =mailto:r@example.com",
        "v=TLSRPTv1; rua= mailto:r@example.com",
        "v=TLSRPTv1; rua=mailto:a!b@example.com",
        "v=TLSRPTv1; rua=mailto:r@example.com!10m",
        "v=TLSRPTv1; rua=mailto:r@example.com,",
        "v=TLSRPTv1; rua=r@example.com",
        "v=TLSRPTv1; rua=https://r.test/a b",
        "v=TLSRPTv1; rua=mailto:r@example.com; rua=mailto:s@example.com",
        "v=TLSRPTv1; rua=mailto:r@example.com; _x=1",
        "v=TLSRPTv1; rua=mailto:r@example.com; x=a=b",
        "v=TLSRPTv1; rua=mailto:r@example.com; x=",
        "v=TLSRPTv1; rua=mailto:r@example.com; novalue",
        "v=TLSRPTv1; rua=mailto:r@example.com; " + "x" * 33 + "=1",
        "v=TLSRPTv1; rua=mailto:r@exämple.com",
        "v=TLSRPTv1;\nrua=mailto:r@example.com",
    ],
)
def test_invalid_records(text: str) -> None:
    with pytest.raises(TlsRptError):
        parse_record(text)
    assert record_from_txt([text]) is None


def test_one_tlsrpt_record_among_the_txt_records() -> None:
    good = "v=TLSRPTv1; rua=mailto:r@x.test"
    assert record_from_txt(["v=spf1 -all", good, "other"]) == TlsRptRecord(("mailto:r@x.test",))
    # RFC 8460 3: not exactly one: the domain does not implement TLSRPT.
    assert record_from_txt([good, "v=TLSRPTv1; rua=mailto:s@x.test"]) is None
    assert record_from_txt([good, "v=TLSRPTv1"]) is None
    assert record_from_txt([good, "v=TLSRPTv10; rua=mailto:s@x.test"]) is not None
    assert record_from_txt([]) is None


def test_https_uris_are_kept_apart() -> None:
    record = parse_record("v=TLSRPTv1; rua=https://a.test/r,mailto:m@a.test,HTTPS://b.test/")
    assert record.https == ("https://a.test/r", "HTTPS://b.test/")
    assert record.mailto == ("m@a.test",)


# ------------------------------------------------------------- file names
def test_report_filename() -> None:
    name = report_filename("sender.test", "example.com", 1470013207, 1470186007, "001")
    assert name == "sender.test!example.com!1470013207!1470186007!001.json.gz"
    assert report_filename("s.test", "e.test", 1, 2) == "s.test!e.test!1!2.json.gz"
    for bad in ("a!b.test", "a/b", "", "../x"):
        with pytest.raises(ValueError):
            report_filename(bad, "e.test", 1, 2)
        with pytest.raises(ValueError):
            report_filename("s.test", bad, 1, 2)
    with pytest.raises(ValueError):
        report_filename("s.test", "e.test", 1, 2, "a-b")


# ------------------------------------------------------- counting, reports
def test_daily_report_counts_and_shape(
    reporter: TlsReporter, clock: Clock, dns: FakeDns, tmp_path: Any
) -> None:
    warm("a.test", "b.test", "c.test")
    for _ in range(5):
        reporter.record(sts())
    for _ in range(2):
        reporter.record(sts(TlsResult.CERTIFICATE_EXPIRED))
    reporter.record(sts(TlsResult.STARTTLS_NOT_SUPPORTED, mx_host="mx2.a.test"))
    # A failed policy fetch: no session, no addresses.
    fetch = TlsResult.STS_POLICY_FETCH_ERROR
    reporter.record(sts(fetch, mx_host="", sending_ip="", receiving_ip="", detail="timed out"))
    # DANE: a policy per exchanger.
    for result in (TlsResult.SUCCESS, TlsResult.CERTIFICATE_NOT_TRUSTED):
        reporter.record(
            TlsOutcome("tlsa", "b.test", "mx.b.test", result, "no TLSA record matched", True, TLSA)
        )
    # c.test publishes no TLSRPT record, d.test no valid one: not counted.
    dns.txt("d.test", "v=TLSRPTv1; rua=mailto:a!b@d.test", "v=spf1 -all")
    warm("d.test")
    reporter.record(sts(domain="c.test"))
    reporter.record(sts(domain="d.test"))
    assert reporter.counts().keys() == {"a.test", "b.test"}

    assert reporter.flush() == []  # the day is not over
    assert not [name for name in os.listdir(reporter.reports_dir) if name.endswith(".gz")]
    clock.next_day()
    written = reporter.flush()
    assert [report.policy_domain for report in written] == ["a.test", "b.test"]

    begin = int(MIDNIGHT)
    end = begin + 86399
    for report in written:
        name = os.path.basename(report.path)
        match = FILENAME.fullmatch(name)
        assert match is not None, name
        assert match.groups()[:4] == ("sender.test", report.policy_domain, str(begin), str(end))
        assert (report.begin, report.end) == (begin, end)
        data = read_report(report.path)
        assert data == report.report
        check_schema(data)
        assert data["organization-name"] == "Example Sender"
        assert data["contact-info"] == "tls-reports@sender.test"
        assert data["date-range"] == {
            "start-datetime": "2027-01-15T00:00:00Z",
            "end-datetime": "2027-01-15T23:59:59Z",
        }
        assert data["report-id"] == report.report_id
        assert report.report_id.endswith("@sender.test")

    a_report = read_report(written[0].path)
    assert a_report["policies"] == [
        {
            "policy": {
                "policy-type": "sts",
                "policy-string": list(STS_POLICY),
                "policy-domain": "a.test",
                "mx-host": ["*.a.test"],
            },
            "summary": {"total-successful-session-count": 5, "total-failure-session-count": 4},
            "failure-details": [
                {
                    "result-type": "certificate-expired",
                    "sending-mta-ip": "192.0.2.1",
                    "receiving-mx-hostname": "mx1.a.test",
                    "receiving-ip": "198.51.100.25",
                    "failed-session-count": 2,
                    "failure-reason-code": "certificate-expired detail",
                },
                {
                    "result-type": "starttls-not-supported",
                    "sending-mta-ip": "192.0.2.1",
                    "receiving-mx-hostname": "mx2.a.test",
                    "receiving-ip": "198.51.100.25",
                    "failed-session-count": 1,
                    "failure-reason-code": "starttls-not-supported detail",
                },
                {
                    "result-type": "sts-policy-fetch-error",
                    "failed-session-count": 1,
                    "failure-reason-code": "timed out",
                },
            ],
        }
    ]
    [tlsa] = read_report(written[1].path)["policies"]
    assert tlsa["policy"] == {
        "policy-type": "tlsa",
        "policy-string": list(TLSA),
        "policy-domain": "b.test",
        "mx-host": ["mx.b.test"],
    }
    assert tlsa["summary"] == {
        "total-successful-session-count": 1,
        "total-failure-session-count": 1,
    }
    # Flushed days are gone; a second flush writes nothing.
    assert reporter.counts(DAY) == {}
    assert reporter.flush() == []


def test_a_changed_policy_is_a_policy_of_its_own(reporter: TlsReporter, clock: Clock) -> None:
    warm("a.test")
    reporter.record(sts())
    testing = tuple(line.replace("enforce", "testing") for line in STS_POLICY)
    reporter.record(sts(policy_string=testing))
    reporter.record(TlsOutcome("no-policy-found", "a.test", "mx1.a.test", TlsResult.SUCCESS))
    clock.next_day()
    [report] = reporter.flush()
    policies = [entry["policy"] for entry in report.report["policies"]]
    assert [(p["policy-type"], p["policy-string"][1:2]) for p in policies] == [
        ("no-policy-found", []),
        ("sts", ["mode: enforce"]),
        ("sts", ["mode: testing"]),
    ]
    check_schema(report.report)


def test_flush_of_one_day(reporter: TlsReporter, clock: Clock) -> None:
    warm("a.test")
    reporter.record(sts())
    with pytest.raises(ValueError):
        reporter.flush(DAY)  # today
    clock.next_day()
    reporter.record(sts())
    assert reporter.flush(DAY - datetime.timedelta(days=1)) == []
    [report] = reporter.flush(DAY)
    assert report.report["policies"][0]["summary"]["total-successful-session-count"] == 1
    assert reporter.counts()["a.test"][0]["summary"]["total-successful-session-count"] == 1


def test_the_first_outcomes_of_a_domain_wait_for_its_record(
    reporter: TlsReporter, clock: Clock, dns: FakeDns
) -> None:
    # Nothing cached yet: counted, and the lookup started without waiting.
    reporter.record(sts(domain="c.test"))
    reporter.record(sts(domain="a.test"))
    assert dns.asked == ["_smtp._tls.c.test", "_smtp._tls.a.test"]
    assert set(reporter.counts()) == {"a.test", "c.test"}
    warm("a.test", "c.test")  # the answers are in
    assert dns.asked == ["_smtp._tls.c.test", "_smtp._tls.a.test"]
    reporter.record(sts(domain="c.test"))  # NXDOMAIN, cached: not counted
    reporter.record(sts(domain="a.test"))
    clock.next_day()
    # c.test publishes nothing: its early count makes no report.
    [report] = reporter.flush()
    assert report.policy_domain == "a.test"
    assert report.report["policies"][0]["summary"]["total-successful-session-count"] == 2


def test_invalid_domains_are_not_counted(reporter: TlsReporter, dns: FakeDns) -> None:
    for domain in ("../etc", "a!b.test", "", "x" * 300):
        reporter.record(sts(domain=domain))
    assert reporter.counts() == {}
    assert dns.asked == []


def test_counts_wait_out_a_dns_failure(reporter: TlsReporter, clock: Clock, dns: FakeDns) -> None:
    warm("a.test")
    reporter.record(sts())
    dns.fail("a.test", pycares.errno.ARES_ESERVFAIL)
    DNSResolver.cache.clear()
    clock.next_day()
    assert reporter.flush() == []
    assert reporter.counts(DAY)["a.test"][0]["summary"]["total-successful-session-count"] == 1
    dns.txt("a.test", "v=TLSRPTv1; rua=mailto:tlsrpt@a.test")
    [report] = reporter.flush()
    assert report.report["policies"][0]["summary"]["total-successful-session-count"] == 1


def test_counts_of_a_failing_domain_expire(
    reporter: TlsReporter, clock: Clock, dns: FakeDns
) -> None:
    warm("a.test")
    reporter.record(sts())
    dns.fail("a.test", pycares.errno.ARES_ETIMEOUT)
    DNSResolver.cache.clear()
    clock.now += 86400.0 * (reporter.retain_days + 1)
    assert reporter.flush() == []
    assert reporter.counts(DAY) == {}


def test_memory_is_bounded(tmp_path: Any, clock: Clock, dns: FakeDns) -> None:
    reporter = TlsReporter(tmp_path, "Org", "r@sender.test", clock=clock, max_keys=3)
    warm("a.test", "b.test")
    reporter.record(sts(TlsResult.CERTIFICATE_EXPIRED))  # policy + detail: 2 keys
    reporter.record(sts(TlsResult.CERTIFICATE_EXPIRED, detail="another reason"))  # 3 keys
    # Full: a new reason would fold into the detail without addresses and
    # reason, but there is none, so it is dropped; and so is a new policy.
    reporter.record(sts(TlsResult.CERTIFICATE_EXPIRED, detail="third reason"))
    reporter.record(sts(domain="b.test"))
    assert reporter.dropped == 2
    # Known keys still count.
    reporter.record(sts(TlsResult.CERTIFICATE_EXPIRED))
    reporter.record(sts())
    [policy] = reporter.counts()["a.test"]
    assert policy["summary"] == {
        "total-successful-session-count": 1,
        "total-failure-session-count": 3,
    }
    # A new day starts empty.
    clock.next_day()
    reporter.record(sts(domain="b.test"))
    assert "b.test" in reporter.counts()


def test_days_never_flushed_are_dropped_in_time(reporter: TlsReporter, clock: Clock) -> None:
    warm("a.test")
    reporter.record(sts())
    clock.now += 86400.0 * reporter.retain_days
    reporter.record(sts())
    assert reporter.counts(DAY) != {}
    clock.next_day()
    reporter.record(sts())
    assert reporter.counts(DAY) == {}
    assert reporter.counts() != {}


def test_full_counters_fold_failures_into_a_coarser_detail(
    tmp_path: Any, clock: Clock, dns: FakeDns
) -> None:
    reporter = TlsReporter(tmp_path, "Org", "r@sender.test", clock=clock, max_keys=3)
    warm("a.test")
    reporter.record(sts(TlsResult.CERTIFICATE_EXPIRED, sending_ip="", receiving_ip="", detail=""))
    reporter.record(sts(TlsResult.CERTIFICATE_EXPIRED))
    reporter.record(sts(TlsResult.CERTIFICATE_EXPIRED, receiving_ip="198.51.100.26"))
    assert reporter.dropped == 0
    [policy] = reporter.counts()["a.test"]
    coarse = [d for d in policy["failure-details"] if "receiving-ip" not in d]
    assert coarse == [
        {
            "result-type": "certificate-expired",
            "receiving-mx-hostname": "mx1.a.test",
            "failed-session-count": 2,
        }
    ]


def test_counters_survive_a_restart(tmp_path: Any, clock: Clock, dns: FakeDns) -> None:
    warm("a.test")
    first = TlsReporter(tmp_path, "Org", "r@sender.test", clock=clock)
    for _ in range(3):
        first.record(sts())
    first.record(sts(TlsResult.CERTIFICATE_HOST_MISMATCH))
    first.kill()  # saves
    assert os.path.exists(tmp_path / ".tlsrpt-counters.json")

    second = TlsReporter(tmp_path, "Org", "r@sender.test", clock=clock)
    assert second.counts() == first.counts()
    second.record(sts())
    second.record(sts(TlsResult.CERTIFICATE_HOST_MISMATCH))
    second.save()
    third = TlsReporter(tmp_path, "Org", "r@sender.test", clock=clock)
    clock.next_day()
    [report] = third.flush()
    [policy] = report.report["policies"]
    assert policy["summary"] == {
        "total-successful-session-count": 4,
        "total-failure-session-count": 2,
    }
    assert policy["failure-details"][0]["failed-session-count"] == 2
    # Flushed, then saved: a fourth reporter has nothing left to report.
    fourth = TlsReporter(tmp_path, "Org", "r@sender.test", clock=clock)
    assert fourth.counts(DAY) == {}
    assert fourth.flush() == []


def test_unsaved_counts_are_lost_but_nothing_else(
    tmp_path: Any, clock: Clock, dns: FakeDns
) -> None:
    warm("a.test")
    first = TlsReporter(tmp_path, "Org", "r@sender.test", clock=clock)
    first.record(sts())
    first.save()
    first.record(sts())  # after the last save: lost with the process
    second = TlsReporter(tmp_path, "Org", "r@sender.test", clock=clock)
    assert second.counts()["a.test"][0]["summary"]["total-successful-session-count"] == 1


def test_a_corrupt_counters_file_is_ignored(tmp_path: Any, clock: Clock, dns: FakeDns) -> None:
    (tmp_path / ".tlsrpt-counters.json").write_text('{"version": 1, "days": [{"day": "x"}]}')
    reporter = TlsReporter(tmp_path, "Org", "r@sender.test", clock=clock)
    assert reporter.counts() == {}


def test_tick_saves_and_flushes(reporter: TlsReporter, clock: Clock) -> None:
    warm("a.test")
    reporter.record(sts())
    reporter.tick()
    assert os.path.exists(os.path.join(reporter.reports_dir, ".tlsrpt-counters.json"))
    assert reporter.pending() == []
    clock.next_day()
    reporter.tick()
    assert len(reporter.pending()) == 1


def test_defaults_from_the_contact(tmp_path: Any, clock: Clock) -> None:
    reporter = TlsReporter(tmp_path, "Org", "mailto:Reports@Sender.Test", clock=clock)
    assert (reporter.submitter, reporter.mail_from) == ("sender.test", "Reports@Sender.Test")
    other = TlsReporter(tmp_path, "Org", "https://sender.test/tls", submitter="mta.sender.test")
    assert other.mail_from == "tlsrpt-noreply@mta.sender.test"
    with pytest.raises(ValueError):
        TlsReporter(tmp_path, "Org", "x", submitter="not a domain")


# ------------------------------------------------------------------- mails
def parse_mail(data: bytes) -> EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def test_report_message_format() -> None:
    report = gzip.compress(b'{"report-id": "id-1@sender.test"}')
    name = "sender.test!a.test!1!2!abc.json.gz"
    data = report_message(
        report,
        name,
        policy_domain="a.test",
        submitter="sender.test",
        report_id="2027-01-15.abc@sender.test",
        mail_from="tls-reports@sender.test",
        to="tlsrpt@a.test",
        organization="Example Sender",
        date=MIDNIGHT,
    )
    assert b"\n" not in data.replace(b"\r\n", b"")
    msg = parse_mail(data)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "tlsrpt"
    assert str(msg["Subject"]) == (
        "Report Domain: a.test Submitter: sender.test Report-ID: <2027-01-15.abc@sender.test>"
    )
    assert msg["TLS-Report-Domain"] == "a.test"
    assert msg["TLS-Report-Submitter"] == "sender.test"
    assert msg["TLS-Required"] == "No"
    assert msg["To"] == "tlsrpt@a.test"
    assert msg["From"].addresses[0].addr_spec == "tls-reports@sender.test"
    assert msg["MIME-Version"] == "1.0"
    assert msg["Message-ID"]
    assert email.utils.parsedate_to_datetime(msg["Date"]).timestamp() == MIDNIGHT
    text, attachment = msg.iter_parts()
    assert text.get_content_type() == "text/plain"
    assert attachment.get_content_type() == "application/tlsrpt+gzip"
    assert attachment.get_content_disposition() == "attachment"
    assert attachment.get_filename() == name
    assert attachment["Content-Transfer-Encoding"] == "base64"
    assert attachment.get_content() == report


def stored(queue_store: DictStorage) -> list[Envelope]:
    return list(queue_store.env_db.values())


def test_send_mails_each_report_to_each_mailto(
    reporter: TlsReporter, clock: Clock, dns: FakeDns
) -> None:
    warm("a.test", "b.test")
    reporter.record(sts())
    reporter.record(sts(domain="b.test", mx_host="mx.b.test"))
    clock.next_day()
    written = {report.policy_domain: report for report in reporter.flush()}
    store = DictStorage()
    assert reporter.send(Queue(store)) == 3
    envelopes = sorted(stored(store), key=lambda env: env.recipients)
    assert [(env.sender, env.recipients) for env in envelopes] == [
        ("tls-reports@sender.test", ["one@b.test"]),
        ("tls-reports@sender.test", ["tlsrpt@a.test"]),
        ("tls-reports@sender.test", ["two@reports.test"]),
    ]
    for envelope in envelopes:
        header, body = envelope.flatten()
        msg = parse_mail(header + body)
        domain = msg["TLS-Report-Domain"]
        report = written[domain]
        assert msg["To"] == envelope.recipients[0]
        assert f"Report-ID: <{report.report_id}>" in str(msg["Subject"])
        [attachment] = [part for part in msg.iter_attachments()]
        assert attachment.get_filename() == report.filename
        assert json.loads(gzip.decompress(attachment.get_content())) == report.report
    # Sent reports move to sent/; a second send has nothing to do.
    assert reporter.pending() == []
    sent = sorted(os.listdir(os.path.join(reporter.reports_dir, "sent")))
    assert sent == sorted(report.filename for report in written.values())
    assert reporter.send(Queue(store)) == 0


def test_https_only_rua_is_skipped(
    reporter: TlsReporter, clock: Clock, dns: FakeDns, caplog: pytest.LogCaptureFixture
) -> None:
    dns.txt("a.test", "v=TLSRPTv1; rua=https://reports.a.test/tlsrpt")
    warm("a.test")
    reporter.record(sts())
    clock.next_day()
    reporter.flush()
    store = DictStorage()
    with caplog.at_level("INFO", logger=tlsrpt.__name__):
        assert reporter.send(Queue(store)) == 0
    assert not store.env_db
    assert "https reporting is not supported" in caplog.text
    assert reporter.pending() == []


class FailingQueue:
    def __init__(self) -> None:
        self.calls = 0

    def enqueue(self, envelope: Envelope) -> list[tuple[Envelope, str | QueueError]]:
        self.calls += 1
        return [(envelope, QueueError("storage is down"))]


def test_a_report_that_could_not_be_queued_stays_pending(
    reporter: TlsReporter, clock: Clock, dns: FakeDns
) -> None:
    warm("a.test")
    reporter.record(sts())
    clock.next_day()
    [report] = reporter.flush()
    failing = FailingQueue()
    assert reporter.send(failing) == 0
    assert failing.calls == 1
    assert reporter.pending() == [report.filename]
    store = DictStorage()
    assert reporter.send(Queue(store)) == 1
    assert reporter.pending() == []


def test_queue_option_sends_on_flush(tmp_path: Any, clock: Clock, dns: FakeDns) -> None:
    store = DictStorage()
    reporter = TlsReporter(tmp_path, "Org", "r@sender.test", clock=clock, queue=Queue(store))
    warm("a.test")
    reporter.record(sts())
    clock.next_day()
    [report] = reporter.flush()
    [envelope] = stored(store)
    assert envelope.recipients == ["tlsrpt@a.test"]
    assert os.path.exists(os.path.join(tmp_path, "sent", report.filename))


# ------------------------------------------- session addresses (tlspolicy)
class FakeSocket:
    def __init__(self, ours: str, theirs: str) -> None:
        self.ours, self.theirs = ours, theirs

    def getsockname(self) -> tuple[str, int]:
        return self.ours, 40000

    def getpeername(self) -> tuple[str, int]:
        return self.theirs, 25


def test_outcomes_carry_the_addresses_of_their_greenlets_session() -> None:
    import gevent

    from slimta.relay.smtp.tlspolicy import TlsRequirement, session_addresses, track_addresses

    seen: list[TlsOutcome] = []
    requirement = TlsRequirement(
        "sts",
        "a.test",
        "mx1.a.test",
        ssl.create_default_context(),
        report=seen.append,
        policy_string=STS_POLICY,
    )

    def session(ours: str, theirs: str) -> None:
        connect = track_addresses(lambda address, timeout=None: FakeSocket(ours, theirs))
        connect(("mx1.a.test", 25), timeout=5)
        gevent.sleep(0)  # the other session connects meanwhile
        requirement.outcome(TlsResult.SUCCESS)

    gevent.joinall(
        [
            gevent.spawn(session, "192.0.2.1", "198.51.100.1"),
            gevent.spawn(session, "192.0.2.2", "198.51.100.2"),
        ],
        raise_error=True,
    )
    assert sorted((o.sending_ip, o.receiving_ip) for o in seen) == [
        ("192.0.2.1", "198.51.100.1"),
        ("192.0.2.2", "198.51.100.2"),
    ]
    assert all(o.policy_string == STS_POLICY for o in seen)
    # A greenlet that connected through nothing tracked has no addresses.
    assert session_addresses() == ("", "")
    assert requirement.outcome(TlsResult.CERTIFICATE_EXPIRED).receiving_ip == ""
