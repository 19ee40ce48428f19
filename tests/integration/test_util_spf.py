"""slimta.util.spf against a real DNS server (tests/dnsserver.py) and a real SmtpEdge."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import dnsserver
from dnsserver import DnsServer
from slimta.edge.smtp import SmtpValidators
from slimta.util.dns import DNSResolver
from slimta.util.spf import EnforceSpf

pytestmark = pytest.mark.timeout(30)

dns_server = dnsserver.dns_server

IP = "192.0.2.10"
IP6 = "2001:db8::10"
#: The test SMTP clients connect from here.
LOCAL = "127.0.0.1"

SENDER_OK = ("250", "2.1.0")
RCPT_OK = ("250", "2.1.5")
ACCESS_DENIED = ("550", "5.7.1")
TRY_LATER = ("451", "4.7.1")

EdgeFactory = Callable[..., tuple[Any, int, Any]]


def spf(server: DnsServer, domain: str, *records: str) -> None:
    """Give *domain* these TXT records."""
    server.set(domain, "TXT", [(300, text) for text in records])


def query(sender: str, ip: str = IP, helo: str = "helo.test", timeout: float = 10.0) -> str:
    return EnforceSpf(timeout).query(sender, ip, helo)[0]


@pytest.fixture
def slow_resolver(dns_server: DnsServer) -> Iterator[DnsServer]:
    """The resolver waits 5 s, longer than the checks' own timeout."""
    with dns_server.slimta_resolver(timeout=5.0, tries=1):
        yield dns_server


# pass ---------------------------------------------------------------------


def test_pass_ip4(dns_server: DnsServer) -> None:
    spf(dns_server, "s.test", "v=spf1 ip4:192.0.2.0/24 -all")
    assert query("a@s.test") == "pass"
    assert query("a@s.test", ip="198.51.100.1") == "fail"


def test_pass_ip6(dns_server: DnsServer) -> None:
    spf(dns_server, "s.test", "v=spf1 ip6:2001:db8::/64 -all")
    assert query("a@s.test", ip=IP6) == "pass"
    assert query("a@s.test", ip="2001:db8:1::1") == "fail"
    assert query("a@s.test", ip=IP) == "fail"


def test_ipv4_mapped_client_is_ipv4(dns_server: DnsServer) -> None:
    spf(dns_server, "s.test", "v=spf1 ip4:192.0.2.10 -all")
    assert query("a@s.test", ip="::ffff:192.0.2.10") == "pass"


def test_pass_a(dns_server: DnsServer) -> None:
    spf(dns_server, "s.test", "v=spf1 a a:other.test/24 -all")
    dns_server.set("s.test", "A", [(300, "203.0.113.5")])
    dns_server.set("other.test", "A", [(300, "192.0.2.200")])
    assert query("a@s.test", ip="203.0.113.5") == "pass"
    assert query("a@s.test", ip=IP) == "pass"  # /24 of other.test
    assert query("a@s.test", ip="203.0.113.6") == "fail"


def test_pass_a_ipv6_with_dual_cidr(dns_server: DnsServer) -> None:
    spf(dns_server, "s.test", "v=spf1 a/32//48 -all")
    dns_server.set("s.test", "AAAA", [(300, "2001:db8::1")])
    assert query("a@s.test", ip=IP6) == "pass"
    assert query("a@s.test", ip="2001:db9::1") == "fail"


def test_pass_mx(dns_server: DnsServer) -> None:
    spf(dns_server, "s.test", "v=spf1 mx -all")
    dns_server.set("s.test", "MX", [(300, "10 mx1.s.test."), (300, "20 mx2.s.test.")])
    dns_server.set("mx1.s.test", "A", [(300, "203.0.113.1")])
    dns_server.set("mx2.s.test", "A", [(300, IP)])
    assert query("a@s.test") == "pass"
    assert query("a@s.test", ip="203.0.113.9") == "fail"


def test_pass_include(dns_server: DnsServer) -> None:
    spf(dns_server, "s.test", "v=spf1 include:inc.test -all")
    spf(dns_server, "inc.test", "v=spf1 ip4:192.0.2.10 -all")
    assert query("a@s.test") == "pass"
    # The include's -all is "no match", not a fail of the whole check.
    # (Another domain: the resolver keeps answers for their TTL.)
    spf(dns_server, "s2.test", "v=spf1 include:inc.test ?all")
    assert query("a@s2.test", ip="203.0.113.1") == "neutral"


def test_pass_ptr_and_exists(dns_server: DnsServer) -> None:
    spf(dns_server, "s.test", "v=spf1 ptr:s.test -all")
    dns_server.set("10.2.0.192.in-addr.arpa", "PTR", [(300, "mail.s.test.")])
    dns_server.set("mail.s.test", "A", [(300, IP)])
    assert query("a@s.test") == "pass"
    spf(dns_server, "x.test", "v=spf1 exists:%{ir}.%{v}.%{l}.e.test -all")
    dns_server.set("10.2.0.192.in-addr.bob.e.test", "A", [(300, "127.0.0.2")])
    assert query("bob@x.test") == "pass"
    assert query("alice@x.test") == "fail"


def test_ptr_lookup_error_is_no_match(dns_server: DnsServer) -> None:
    spf(dns_server, "s.test", "v=spf1 ptr -all")
    dns_server.fail("10.2.0.192.in-addr.arpa")
    assert query("a@s.test") == "fail"  # 5.5: not temperror


def test_more_than_ten_mx_records(dns_server: DnsServer) -> None:
    spf(dns_server, "s.test", "v=spf1 mx ip4:192.0.2.10 -all")
    dns_server.set("s.test", "MX", [(300, f"{n} mx{n}.s.test.") for n in range(11)])
    for n in range(11):
        dns_server.set(f"mx{n}.s.test", "A", [(300, "203.0.113.1")])
    assert query("a@s.test") == "permerror"


def test_txt_records_that_are_not_spf_are_ignored(dns_server: DnsServer) -> None:
    spf(dns_server, "s.test", "google-site-verification=x", "v=spf1 +all", "v=spf10 -all")
    assert query("a@s.test") == "pass"


# other results -------------------------------------------------------------


@pytest.mark.parametrize(
    ("last", "result"), [("-all", "fail"), ("~all", "softfail"), ("?all", "neutral")]
)
def test_all_qualifiers(dns_server: DnsServer, last: str, result: str) -> None:
    spf(dns_server, "s.test", f"v=spf1 ip4:203.0.113.1 {last}")
    assert query("a@s.test") == result


def test_no_match_is_neutral(dns_server: DnsServer) -> None:
    spf(dns_server, "s.test", "v=spf1 ip4:203.0.113.1")
    assert query("a@s.test") == "neutral"


def test_none(dns_server: DnsServer) -> None:
    assert query("a@nxdomain.test") == "none"  # NXDOMAIN
    dns_server.set("nospf.test", "A", [(300, IP)])
    assert query("a@nospf.test") == "none"  # NODATA
    spf(dns_server, "txt.test", "just some text")
    assert query("a@txt.test") == "none"
    before = dns_server.total_queries
    assert query("a@not_a_domain") == "none"  # 4.3: not looked up
    assert query("a@bad..test") == "none"
    assert dns_server.total_queries == before


def test_redirect(dns_server: DnsServer) -> None:
    spf(dns_server, "s.test", "v=spf1 redirect=_spf.other.test")
    spf(dns_server, "_spf.other.test", "v=spf1 ip4:192.0.2.0/24 ~all")
    assert query("a@s.test") == "pass"
    assert query("a@s.test", ip="203.0.113.1") == "softfail"


def test_redirect_to_nothing_is_permerror(dns_server: DnsServer) -> None:
    spf(dns_server, "s.test", "v=spf1 redirect=missing.test")
    assert query("a@s.test") == "permerror"


def test_helo_identity_for_null_sender(dns_server: DnsServer) -> None:
    spf(dns_server, "helo.test", "v=spf1 ip4:192.0.2.10 -all")
    spf(dns_server, "%s.test", "v=spf1 -all")
    assert query("", helo="helo.test") == "pass"
    assert query("", ip="203.0.113.1", helo="helo.test") == "fail"
    assert EnforceSpf().query("", IP, "helo.test")[1] == "helo.test matched ip4:192.0.2.10"


def test_macros(dns_server: DnsServer) -> None:
    spf(dns_server, "s.test", "v=spf1 exists:%{l1r-}.%{o}.%{d2}.%{h}.m.test -all")
    dns_server.set("first.s.test.s.test.helo.test.m.test", "A", [(300, "127.0.0.2")])
    assert query("first-last@s.test") == "pass"


def test_ipv6_i_macro(dns_server: DnsServer) -> None:
    spf(dns_server, "s.test", "v=spf1 exists:%{i}.m.test -all")
    nibbles = ".".join("20010db8000000000000000000000010")
    dns_server.set(f"{nibbles}.m.test", "A", [(300, "127.0.0.2")])
    assert query("a@s.test", ip=IP6) == "pass"


# permerror -----------------------------------------------------------------


@pytest.mark.parametrize(
    "record",
    [
        "v=spf1 foo:bar.test -all",
        "v=spf1 ip4:192.0.2.300 -all",
        "v=spf1 ip4:192.0.2.0/33",
        "v=spf1 ip6:192.0.2.1",
        "v=spf1 include -all",
        "v=spf1 redirect=a.test redirect=b.test",
        "v=spf1 exists:%{z}.test",
        "v=spf1 a:%{d0}.test",
        "v=spf1 -all/24",
        # A syntax error anywhere counts, even after a matching term (4.6).
        "v=spf1 +all bad!term",
    ],
)
def test_syntax_errors(dns_server: DnsServer, record: str) -> None:
    spf(dns_server, "s.test", record)
    assert query("a@s.test") == "permerror"


def test_unknown_modifier_is_ignored(dns_server: DnsServer) -> None:
    spf(dns_server, "s.test", "v=spf1 foo=bar ip4:192.0.2.10 exp=explain.test -all")
    assert query("a@s.test") == "pass"


def test_two_records(dns_server: DnsServer) -> None:
    spf(dns_server, "s.test", "v=spf1 +all", "v=spf1 -all")
    assert query("a@s.test") == "permerror"


def test_more_than_ten_dns_terms(dns_server: DnsServer) -> None:
    for n in range(11):
        dns_server.set(f"h{n}.test", "A", [(300, "203.0.113.1")])
    ten = " ".join(f"a:h{n}.test" for n in range(10))
    spf(dns_server, "ten.test", f"v=spf1 {ten} ip4:192.0.2.10 -all")
    assert query("a@ten.test") == "pass"
    spf(dns_server, "eleven.test", f"v=spf1 {ten} a:h10.test ip4:192.0.2.10 -all")
    assert query("a@eleven.test") == "permerror"
    assert dns_server.count("h10.test", "A") == 0  # stopped before the 11th


def test_include_loop(dns_server: DnsServer) -> None:
    spf(dns_server, "s.test", "v=spf1 include:loop.test -all")
    spf(dns_server, "loop.test", "v=spf1 include:s.test -all")
    assert query("a@s.test") == "permerror"


def test_include_of_nothing_is_permerror(dns_server: DnsServer) -> None:
    spf(dns_server, "s.test", "v=spf1 include:missing.test -all")
    assert query("a@s.test") == "permerror"


def test_more_than_two_void_lookups(dns_server: DnsServer) -> None:
    spf(dns_server, "two.test", "v=spf1 a:v1.test a:v2.test ip4:192.0.2.10 -all")
    assert query("a@two.test") == "pass"
    spf(dns_server, "three.test", "v=spf1 a:v1.test a:v2.test a:v3.test ip4:192.0.2.10 -all")
    assert query("a@three.test") == "permerror"


# temperror -----------------------------------------------------------------


def test_servfail(dns_server: DnsServer) -> None:
    dns_server.fail("s.test")
    assert query("a@s.test") == "temperror"
    spf(dns_server, "inc.test", "v=spf1 include:s.test -all")
    assert query("a@inc.test") == "temperror"


def test_timeout_of_the_resolver(dns_server: DnsServer) -> None:
    dns_server.drop("s.test")
    assert query("a@s.test") == "temperror"


def test_timeout_of_the_check(slow_resolver: DnsServer) -> None:
    slow_resolver.drop("s.test")
    start = time.monotonic()
    result, reason = EnforceSpf(timeout=0.3).query("a@s.test", IP, "helo.test")
    assert result == "temperror"
    assert "timed out" in reason
    assert time.monotonic() - start < 1.5


def test_resolver_bug_is_temperror(dns_server: DnsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any) -> Any:
        raise RuntimeError("resolver bug")

    monkeypatch.setattr(DNSResolver, "query_cached", broken)
    assert EnforceSpf().query("a@s.test", IP, "helo.test") == ("temperror", "internal error")


def test_bad_ip_is_none(dns_server: DnsServer) -> None:
    assert query("a@s.test", ip="not an ip") == "none"


# set_enforcement -------------------------------------------------------------


def test_set_enforcement_rejects_unknown_results() -> None:
    with pytest.raises(ValueError):
        EnforceSpf().set_enforcement("failed")


# the decorator on a real edge ---------------------------------------------


def edge_validators(enforce: EnforceSpf) -> tuple[type[SmtpValidators], list[str]]:
    calls: list[str] = []

    class Validators(SmtpValidators):
        @enforce.check
        def handle_mail(self, reply, sender, params):
            calls.append("mail:" + sender)

        @enforce.check
        def handle_rcpt(self, reply, recipient, params):
            calls.append("rcpt:" + recipient)

    return Validators, calls


def test_edge_fail_is_refused(dns_server: DnsServer, make_edge: EdgeFactory, raw) -> None:
    spf(dns_server, "s.test", "v=spf1 ip4:192.0.2.10 -all")
    enforce = EnforceSpf()
    enforce.set_enforcement("fail", match_message="5.7.1 SPF says no: {reason}")
    validators, calls = edge_validators(enforce)
    _, port, _ = make_edge(validator_class=validators)
    client = raw(port)
    client.greet()
    client.send(b"MAIL FROM:<a@s.test>\r\n")
    assert client.expect(ACCESS_DENIED) == "5.7.1 SPF says no: s.test matched all"
    assert calls == []


def test_edge_pass_is_accepted_and_checked_once(
    dns_server: DnsServer, make_edge: EdgeFactory, raw
) -> None:
    spf(dns_server, "s.test", f"v=spf1 ip4:{LOCAL} -all")
    queries: list[str] = []

    class CountingSpf(EnforceSpf):
        def query(self, sender: str, ip: str, ehlo_as: str | None) -> tuple[str, str]:
            queries.append(sender)
            return super().query(sender, ip, ehlo_as)

    enforce = CountingSpf()
    enforce.set_enforcement("fail")
    validators, calls = edge_validators(enforce)
    _, port, _ = make_edge(validator_class=validators)
    client = raw(port)
    client.greet()
    client.send(b"MAIL FROM:<a@s.test>\r\n")
    client.expect(SENDER_OK)
    client.send(b"RCPT TO:<b@example.test>\r\n")
    client.expect(RCPT_OK)
    client.send(b"RCPT TO:<c@example.test>\r\n")
    client.expect(RCPT_OK)
    assert calls == ["mail:a@s.test", "rcpt:b@example.test", "rcpt:c@example.test"]
    assert queries == ["a@s.test"]  # once for the transaction
    client.send(b"RSET\r\n")
    client.read_reply()
    client.send(b"MAIL FROM:<other@s.test>\r\n")
    client.expect(SENDER_OK)
    assert queries == ["a@s.test", "other@s.test"]


def test_edge_fail_without_enforcement_is_accepted(
    dns_server: DnsServer, make_edge: EdgeFactory, raw
) -> None:
    spf(dns_server, "s.test", "v=spf1 -all")
    enforce = EnforceSpf()
    enforce.set_enforcement("softfail")
    validators, calls = edge_validators(enforce)
    _, port, _ = make_edge(validator_class=validators)
    client = raw(port)
    client.greet()
    client.send(b"MAIL FROM:<a@s.test>\r\n")
    client.expect(SENDER_OK)
    assert calls == ["mail:a@s.test"]


def test_edge_temperror_mapped_as_configured(
    dns_server: DnsServer, make_edge: EdgeFactory, raw
) -> None:
    dns_server.fail("s.test")
    enforce = EnforceSpf()
    enforce.set_enforcement("fail")
    enforce.set_enforcement("temperror", match_code="451", match_message="4.7.1 Try later")
    validators, calls = edge_validators(enforce)
    _, port, _ = make_edge(validator_class=validators)
    client = raw(port)
    client.greet()
    client.send(b"MAIL FROM:<a@s.test>\r\n")
    assert client.expect(TRY_LATER) == "4.7.1 Try later"
    assert calls == []


def test_edge_rcpt_hook_only(dns_server: DnsServer, make_edge: EdgeFactory, raw) -> None:
    spf(dns_server, "helo.test", "v=spf1 -all")
    enforce = EnforceSpf()
    enforce.set_enforcement("fail")
    calls: list[str] = []

    class Validators(SmtpValidators):
        @enforce.check
        def handle_rcpt(self, reply, recipient, params):
            calls.append(recipient)

    _, port, _ = make_edge(validator_class=Validators)
    client = raw(port)
    client.greet("helo.test")
    client.send(b"MAIL FROM:<>\r\n")
    client.expect(SENDER_OK)
    client.send(b"RCPT TO:<b@example.test>\r\n")
    client.expect(ACCESS_DENIED)
    assert calls == []


def test_old_import_path() -> None:
    from slimta.spf import EnforceSpf as Old

    assert Old is EnforceSpf
