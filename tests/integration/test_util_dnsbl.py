"""slimta.util.dnsbl against a real DNS server (tests/dnsserver.py) and a real SmtpEdge."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import gevent.event
import pytest
from gevent.monkey import get_original
from gevent.pool import Pool

import dnsserver
from dnsserver import DnsServer
from slimta.edge.smtp import SmtpValidators
from slimta.logging import parseline
from slimta.util.dns import DNSResolver
from slimta.util.dnsbl import DnsBlocklist, DnsBlocklistGroup, check_dnsbl

pytestmark = pytest.mark.timeout(30)

dns_server = dnsserver.dns_server

LIST = "bl.test"
OTHER = "other.test"
IP = "192.0.2.1"
#: IP's name on LIST: its octets reversed (RFC 5782 2.1).
IP_NAME = "1.2.0.192.bl.test"
IP6 = "2001:db8::1"
#: IP6's name on LIST: its 32 nibbles reversed (RFC 5782 2.4).
IP6_NAME = "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.bl.test"
#: The test clients connect from 127.0.0.1.
CLIENT_NAME = "1.0.0.127.bl.test"

#: Resolver timeout for tests where our own, shorter, timeout must end the wait.
SLOW_RESOLVER = 5.0
#: How far past a timeout a wait may end (scheduling, a loaded machine).
SLACK = 0.5

BANNER = ("220", None)
OK = ("250", "2.0.0")
SENDER_OK = ("250", "2.1.0")
ACCESS_DENIED = ("550", "5.7.1")
REFUSED_BANNER = ("554", "5.7.1")

EdgeFactory = Callable[..., tuple[Any, int, Any]]

#: time.sleep as it was before monkey-patching: blocks the hub.
blocking_sleep: Callable[[float], None] = get_original("time", "sleep")


def listed(server: DnsServer, name: str, *answers: str) -> None:
    server.set(name, "A", [(300, answer) for answer in answers])


@pytest.fixture
def dnsbl_log(
    caplog: pytest.LogCaptureFixture,
) -> Callable[[], list[tuple[str, str, dict[str, Any]]]]:
    """``() -> [(list, operation, data)]`` of the lines slimta.util.dnsbl logged."""
    caplog.set_level(logging.DEBUG, logger="slimta.util.dnsbl")

    def lines() -> list[tuple[str, str, dict[str, Any]]]:
        found = []
        for record in caplog.records:
            if record.name == "slimta.util.dnsbl":
                kind, typeid, operation, data = parseline(record.getMessage())
                assert kind == "dnsbl"
                found.append((typeid, operation, data))
        return found

    return lines


@pytest.fixture
def slow_resolver(dns_server: DnsServer) -> Iterator[DnsServer]:
    """The resolver waits SLOW_RESOLVER seconds for an answer."""
    with dns_server.slimta_resolver(timeout=SLOW_RESOLVER, tries=1):
        yield dns_server


# DnsBlocklist -------------------------------------------------------------------


def test_listed_ipv4(dns_server: DnsServer) -> None:
    listed(dns_server, IP_NAME, "127.0.0.2")
    assert DnsBlocklist(LIST).get(IP) is True
    assert dns_server.count(IP_NAME, "A") == 1


def test_listed_ipv6(dns_server: DnsServer) -> None:
    listed(dns_server, IP6_NAME, "127.0.0.2")
    assert DnsBlocklist(LIST).get(IP6) is True
    assert DnsBlocklist(LIST).get("2001:DB8:0:0::1") is True
    assert dns_server.count(IP6_NAME, "A") == 1


def test_ipv4_mapped_address_is_looked_up_as_ipv4(dns_server: DnsServer) -> None:
    listed(dns_server, IP_NAME, "127.0.0.2")
    assert DnsBlocklist(LIST).get("::ffff:" + IP) is True


def test_list_address_with_a_trailing_dot(dns_server: DnsServer) -> None:
    listed(dns_server, IP_NAME, "127.0.0.2")
    assert DnsBlocklist(LIST + ".").get(IP) is True


def test_nxdomain_is_not_listed(dns_server: DnsServer, dnsbl_log) -> None:
    blocklist = DnsBlocklist(LIST)
    assert blocklist.get(IP) is False
    # NXDOMAIN is an answer, not a failure: strict does not apply.
    assert blocklist.get(IP, strict=True) is False
    assert dnsbl_log() == []


def test_name_without_a_records_is_not_listed(dns_server: DnsServer, dnsbl_log) -> None:
    dns_server.set(IP_NAME, "TXT", [(300, "only a reason")])
    assert DnsBlocklist(LIST).get(IP, strict=True) is False
    assert dnsbl_log() == []


def test_in_operator(dns_server: DnsServer) -> None:
    listed(dns_server, IP_NAME, "127.0.0.2")
    blocklist = DnsBlocklist(LIST)
    assert IP in blocklist
    assert "192.0.2.2" not in blocklist


def test_reason(dns_server: DnsServer) -> None:
    listed(dns_server, IP_NAME, "127.0.0.2")
    dns_server.set(IP_NAME, "TXT", [(300, "Listed for spam, see https://bl.test/192.0.2.1")])
    blocklist = DnsBlocklist(LIST)
    assert blocklist.get_reason(IP) == "Listed for spam, see https://bl.test/192.0.2.1"
    assert blocklist[IP] == "Listed for spam, see https://bl.test/192.0.2.1"
    assert dns_server.count(IP_NAME, "TXT") == 1  # the second came from the cache


def test_no_reason(dns_server: DnsServer, dnsbl_log) -> None:
    listed(dns_server, IP_NAME, "127.0.0.2")
    blocklist = DnsBlocklist(LIST)
    assert blocklist.get_reason(IP) is None  # NODATA
    assert blocklist.get_reason("192.0.2.2") is None  # NXDOMAIN
    assert dnsbl_log() == []


def test_reason_servfail(dns_server: DnsServer, dnsbl_log) -> None:
    dns_server.fail(IP_NAME)
    assert DnsBlocklist(LIST).get_reason(IP) is None
    [(name, operation, data)] = dnsbl_log()
    assert (name, operation, data["ip"]) == (LIST, "reason_failed", IP)


def test_reason_timeout(slow_resolver: DnsServer, dnsbl_log) -> None:
    slow_resolver.drop(IP_NAME)
    began = time.monotonic()
    assert DnsBlocklist(LIST).get_reason(IP, timeout=0.2) is None
    assert time.monotonic() - began < 0.2 + SLACK
    [(_, operation, _)] = dnsbl_log()
    assert operation == "reason_timed_out"


@pytest.mark.parametrize("strict", [False, True])
def test_servfail_answers_strict(dns_server: DnsServer, dnsbl_log, strict: bool) -> None:
    dns_server.fail(IP_NAME)
    assert DnsBlocklist(LIST).get(IP, strict=strict) is strict
    [(name, operation, data)] = dnsbl_log()
    assert (name, operation, data["ip"]) == (LIST, "lookup_failed", IP)
    assert "ARES_ESERVFAIL" in data["error"]


@pytest.mark.parametrize("strict", [False, True])
def test_resolver_timeout_answers_strict(dns_server: DnsServer, dnsbl_log, strict: bool) -> None:
    dns_server.drop(IP_NAME)
    with dns_server.slimta_resolver(timeout=0.3, tries=1):
        assert DnsBlocklist(LIST).get(IP, strict=strict) is strict
    [(name, operation, data)] = dnsbl_log()
    assert (name, operation, data["ip"]) == (LIST, "lookup_failed", IP)
    assert "ARES_ETIMEOUT" in data["error"]


@pytest.mark.parametrize("strict", [False, True])
def test_timeout_bounds_the_wait(slow_resolver: DnsServer, dnsbl_log, strict: bool) -> None:
    slow_resolver.drop(IP_NAME)
    began = time.monotonic()
    assert DnsBlocklist(LIST).get(IP, timeout=0.2, strict=strict) is strict
    took = time.monotonic() - began
    assert 0.2 <= took < 0.2 + SLACK, f"waited {took:.2f}s"
    [(name, operation, data)] = dnsbl_log()
    assert (name, operation, data) == (LIST, "timed_out", {"ip": IP, "timeout": 0.2})


def test_timeout_counts_from_the_call_after_a_busy_hub(slow_resolver: DnsServer) -> None:
    # gevent's timers start from the loop's cached clock, which stands still
    # while a greenlet keeps the hub from running (here a blocking sleep).
    slow_resolver.drop(IP_NAME)
    blocking_sleep(0.3)
    began = time.monotonic()
    assert DnsBlocklist(LIST).get(IP, timeout=0.2) is False
    assert time.monotonic() - began >= 0.2
    group = DnsBlocklistGroup()
    group.add_dnsbl(LIST)
    blocking_sleep(0.3)
    began = time.monotonic()
    assert group.get(IP, timeout=0.2) == set()
    assert time.monotonic() - began >= 0.2


def test_the_hub_runs_while_waiting(slow_resolver: DnsServer) -> None:
    slow_resolver.drop(IP_NAME)
    ran = gevent.event.Event()
    other = gevent.spawn(ran.set)
    assert DnsBlocklist(LIST).get(IP, timeout=0.2) is False
    assert ran.is_set()
    other.join(timeout=1.0)


def test_timeout_raises_no_timeout_into_the_caller(slow_resolver: DnsServer) -> None:
    # The caller's own Timeout still reaches it, and only it.
    slow_resolver.drop(IP_NAME)
    mine = gevent.Timeout(0.1)
    mine.start()
    try:
        with pytest.raises(gevent.Timeout) as caught:
            DnsBlocklist(LIST).get(IP, timeout=2.0)
    finally:
        mine.close()
    assert caught.value is mine


def broken_resolver(name: str, query_type: Any) -> Any:
    raise RuntimeError("resolver bug")


def test_resolver_bug_is_logged_and_answers_strict(
    dns_server: DnsServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(DNSResolver, "query_cached", broken_resolver)
    blocklist = DnsBlocklist(LIST)
    assert blocklist.get(IP) is False
    assert blocklist.get(IP, strict=True) is True
    assert blocklist.get_reason(IP) is None
    unhandled = [r for r in caplog.records if "exception:RuntimeError:unhandled" in r.getMessage()]
    assert len(unhandled) == 3


@pytest.mark.parametrize(
    ("answers", "expected", "logged"),
    [
        (["127.0.0.2"], True, None),
        (["127.0.0.10"], True, None),
        (["127.1.2.3"], True, None),
        (["127.255.254.255"], True, None),
        (["127.255.255.252"], False, "refused"),
        (["127.255.255.254"], False, "refused"),
        (["127.255.255.255"], False, "refused"),
        (["127.255.255.0"], False, "refused"),
        (["192.0.2.99"], False, "bad_answer"),
        (["128.0.0.2"], False, "bad_answer"),
        (["126.255.255.255"], False, "bad_answer"),
        (["192.0.2.99", "127.0.0.4"], True, None),
        (["127.255.255.254", "127.0.0.2"], True, None),
    ],
)
def test_only_127_slash_8_answers_are_listings(
    dns_server: DnsServer, dnsbl_log, answers: list[str], expected: bool, logged: str | None
) -> None:
    listed(dns_server, IP_NAME, *answers)
    assert DnsBlocklist(LIST).get(IP, strict=True) is expected
    warnings = [(name, op, data["ip"]) for name, op, data in dnsbl_log() if op != "listed"]
    assert warnings == ([] if logged is None else [(LIST, logged, IP)])


@pytest.mark.parametrize(
    "ip",
    [None, "", "/var/run/slimta.sock", "unknown", "example.test", "192.0.2", 42, b"192.0.2.1"],
)
def test_not_an_ip_address_is_not_listed_and_not_looked_up(dns_server: DnsServer, ip: Any) -> None:
    blocklist = DnsBlocklist(LIST)
    group = DnsBlocklistGroup()
    group.add_dnsbl(LIST)
    assert blocklist.get(ip, strict=True) is False
    assert blocklist.get_reason(ip) is None
    assert group.get(ip) == set()
    assert group.get_reasons([LIST], ip) == {LIST: None}
    assert dns_server.total_queries == 0


# DnsBlocklistGroup ------------------------------------------------------------


@pytest.fixture
def group(dns_server: DnsServer) -> DnsBlocklistGroup:
    group = DnsBlocklistGroup(Pool())
    group.add_dnsbl(LIST)
    group.add_dnsbl(OTHER)
    return group


def test_group_one_of_two_lists(dns_server: DnsServer, group: DnsBlocklistGroup) -> None:
    listed(dns_server, IP_NAME, "127.0.0.2")
    dns_server.set(IP_NAME, "TXT", [(300, "bad one")])
    matches = group.get(IP)
    assert matches == {LIST}
    assert dns_server.count("1.2.0.192.other.test", "A") == 1
    assert group.get_reasons(matches, IP) == {LIST: "bad one"}
    assert IP in group
    assert "192.0.2.2" not in group
    assert group.pool.join(timeout=1.0)


def test_group_both_lists(dns_server: DnsServer, group: DnsBlocklistGroup) -> None:
    listed(dns_server, IP_NAME, "127.0.0.2")
    listed(dns_server, "1.2.0.192.other.test", "127.0.0.3")
    dns_server.set("1.2.0.192.other.test", "TXT", [(300, "other reason")])
    matches = group.get(IP)
    assert matches == {LIST, OTHER}
    assert group.get_reasons(matches, IP) == {LIST: None, OTHER: "other reason"}
    assert group.get_reasons([OTHER, "not-in-group.test"], IP) == {OTHER: "other reason"}


def test_group_lists_are_asked_in_parallel(
    slow_resolver: DnsServer, group: DnsBlocklistGroup
) -> None:
    group.add_dnsbl("third.test")
    names = [f"1.2.0.192.{name}" for name in (LIST, OTHER, "third.test")]
    for name in names:
        slow_resolver.drop(name)
    began = time.monotonic()
    assert group.get(IP, timeout=0.4) == set()
    took = time.monotonic() - began
    # One overall timeout, not one per list.
    assert 0.4 <= took < 0.4 + SLACK, f"waited {took:.2f}s"
    assert [slow_resolver.count(name, "A") for name in names] == [1, 1, 1]


def test_group_timeout_keeps_the_answers_that_came(
    slow_resolver: DnsServer, group: DnsBlocklistGroup, dnsbl_log
) -> None:
    listed(slow_resolver, "1.2.0.192.other.test", "127.0.0.2")
    slow_resolver.drop(IP_NAME)
    began = time.monotonic()
    assert group.get(IP, timeout=0.3) == {OTHER}
    assert time.monotonic() - began < 0.3 + SLACK
    # Nothing is left running in the pool (the resolver waits 5 s).
    assert group.pool.join(timeout=1.0)
    assert (LIST, "timed_out") in [(name, op) for name, op, _ in dnsbl_log()]


def test_group_reasons_timeout(slow_resolver: DnsServer, group: DnsBlocklistGroup) -> None:
    slow_resolver.drop(IP_NAME)
    slow_resolver.set("1.2.0.192.other.test", "TXT", [(300, "other reason")])
    began = time.monotonic()
    assert group.get_reasons([LIST, OTHER], IP, timeout=0.3) == {
        LIST: None,
        OTHER: "other reason",
    }
    assert time.monotonic() - began < 0.3 + SLACK
    assert group.pool.join(timeout=1.0)


def test_group_failing_list_does_not_match(dns_server: DnsServer, group: DnsBlocklistGroup) -> None:
    dns_server.fail(IP_NAME)
    listed(dns_server, "1.2.0.192.other.test", "127.0.0.2")
    assert group.get(IP) == {OTHER}


def test_group_interrupted_caller_leaves_nothing_running(
    slow_resolver: DnsServer, group: DnsBlocklistGroup
) -> None:
    slow_resolver.drop(IP_NAME)
    slow_resolver.drop("1.2.0.192.other.test")
    # The caller's own Timeout ends its wait (and reaches it) long before the
    # group's timeout or the resolver's.
    mine = gevent.Timeout(0.3)
    with pytest.raises(gevent.Timeout) as caught, mine:
        group.get(IP, timeout=5.0)
    assert caught.value is mine
    assert slow_resolver.total_queries == 2
    assert group.pool.join(timeout=1.0)


@pytest.mark.parametrize("size", [1, Pool(1)], ids=["int", "pool"])
def test_group_bounded_pool(dns_server: DnsServer, size: Any) -> None:
    group = DnsBlocklistGroup(size)
    for name in (LIST, OTHER, "third.test"):
        group.add_dnsbl(name)
        listed(dns_server, f"1.2.0.192.{name}", "127.0.0.2")
    assert group.get(IP, timeout=5.0) == {LIST, OTHER, "third.test"}


def test_group_full_pool_is_bounded_by_the_timeout(dns_server: DnsServer, dnsbl_log) -> None:
    pool = Pool(1)
    group = DnsBlocklistGroup(pool)
    group.add_dnsbl(LIST)
    listed(dns_server, IP_NAME, "127.0.0.2")
    release = gevent.event.Event()
    blocker = pool.spawn(release.wait)
    try:
        began = time.monotonic()
        assert group.get(IP, timeout=0.2) == set()
        assert time.monotonic() - began < 0.2 + SLACK
    finally:
        release.set()
        blocker.join(timeout=1.0)
    assert (LIST, "not_checked") in [(name, op) for name, op, _ in dnsbl_log()]
    assert dns_server.total_queries == 0


def test_group_accepts_blocklist_objects(dns_server: DnsServer) -> None:
    class AlwaysListed(DnsBlocklist):
        def get(self, ip: Any, timeout: float | None = None, strict: bool = False) -> bool:
            return True

    group = DnsBlocklistGroup()
    group.add_dnsbl(AlwaysListed("always.test"))
    group.add_dnsbl(LIST)
    assert group.get(IP) == {"always.test"}


def test_group_survives_a_broken_blocklist(dns_server: DnsServer, caplog) -> None:
    class Broken(DnsBlocklist):
        def get(self, ip: Any, timeout: float | None = None, strict: bool = False) -> bool:
            raise RuntimeError("broken")

    listed(dns_server, IP_NAME, "127.0.0.2")
    group = DnsBlocklistGroup()
    group.add_dnsbl(Broken("broken.test"))
    group.add_dnsbl(LIST)
    assert group.get(IP) == {LIST}
    assert any("exception:RuntimeError:unhandled" in r.getMessage() for r in caplog.records)


# check_dnsbl on a real SmtpEdge -----------------------------------------------------


def validators_with(check: Any) -> tuple[type[SmtpValidators], list[str]]:
    """A validator class whose banner and MAIL hooks are checked by *check*."""
    calls: list[str] = []

    class Validators(SmtpValidators):
        @check
        def handle_mail(self, reply, sender, params):
            calls.append(sender)

    return Validators, calls


def test_edge_refuses_a_listed_client(dns_server: DnsServer, make_edge: EdgeFactory, raw) -> None:
    listed(dns_server, CLIENT_NAME, "127.0.0.2")
    validators, calls = validators_with(check_dnsbl(LIST))
    _, port, _ = make_edge(validator_class=validators)
    client = raw(port)
    client.greet()
    client.send(b"MAIL FROM:<a@example.test>\r\n")
    text = client.expect(ACCESS_DENIED)
    assert text == "5.7.1 Access denied"
    assert calls == []  # the hook was not called
    assert dns_server.count(CLIENT_NAME, "A") == 1


def test_edge_accepts_an_unlisted_client(
    dns_server: DnsServer, make_edge: EdgeFactory, raw
) -> None:
    validators, calls = validators_with(check_dnsbl(LIST))
    _, port, _ = make_edge(validator_class=validators)
    client = raw(port)
    client.greet()
    client.send(b"MAIL FROM:<a@example.test>\r\n")
    client.expect(SENDER_OK)
    assert calls == ["a@example.test"]
    assert dns_server.count(CLIENT_NAME, "A") == 1


def test_edge_custom_reply_on_the_banner(
    dns_server: DnsServer, make_edge: EdgeFactory, raw
) -> None:
    listed(dns_server, CLIENT_NAME, "127.0.0.2")
    banners = []

    class Validators(SmtpValidators):
        @check_dnsbl(DnsBlocklist(LIST), match_code="554", match_message="5.7.1 Listed")
        def handle_banner(self, reply, address):
            banners.append(address)

    _, port, _ = make_edge(validator_class=Validators)
    client = raw(port)
    assert client.expect(REFUSED_BANNER) == "5.7.1 Listed"
    assert banners == []


def test_edge_with_a_group(dns_server: DnsServer, make_edge: EdgeFactory, raw) -> None:
    listed(dns_server, "1.0.0.127.other.test", "127.0.0.2")
    group = DnsBlocklistGroup()
    group.add_dnsbl(LIST)
    group.add_dnsbl(OTHER)
    validators, calls = validators_with(check_dnsbl(group))
    _, port, _ = make_edge(validator_class=validators)
    client = raw(port)
    client.greet()
    client.send(b"MAIL FROM:<a@example.test>\r\n")
    client.expect(ACCESS_DENIED)
    assert calls == []


def test_edge_servfail_lets_the_session_go_on(
    dns_server: DnsServer, make_edge: EdgeFactory, smtp
) -> None:
    dns_server.fail(CLIENT_NAME)
    validators, calls = validators_with(check_dnsbl(LIST))
    _, port, queue = make_edge(validator_class=validators)
    client = smtp(port)
    assert client.sendmail("a@example.test", ["b@example.test"], b"Subject: hi\r\n\r\nhi\r\n") == {}
    assert calls == ["a@example.test"]
    assert len(queue.envelopes) == 1


def test_edge_resolver_bug_lets_the_session_go_on(
    dns_server: DnsServer, make_edge: EdgeFactory, raw, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(DNSResolver, "query_cached", broken_resolver)
    validators, calls = validators_with(check_dnsbl(LIST))
    _, port, _ = make_edge(validator_class=validators)
    client = raw(port)
    client.greet()
    client.send(b"MAIL FROM:<a@example.test>\r\n")
    client.expect(SENDER_OK)
    assert calls == ["a@example.test"]


def test_edge_silent_dns_delays_the_hook_by_the_timeout_at_most(
    slow_resolver: DnsServer, make_edge: EdgeFactory, raw
) -> None:
    slow_resolver.drop(CLIENT_NAME)
    called = gevent.event.Event()

    class Validators(SmtpValidators):
        @check_dnsbl(LIST, timeout=0.3)
        def handle_banner(self, reply, address):
            called.set()

    _, port, _ = make_edge(validator_class=Validators)
    began = time.monotonic()
    client = raw(port)
    client.expect(BANNER)
    took = time.monotonic() - began
    assert called.wait(1.0)
    assert 0.3 <= took < 0.3 + SLACK, f"banner after {took:.2f}s"
    assert slow_resolver.count(CLIENT_NAME, "A") == 1
    # The session goes on as usual.
    client.send(b"EHLO client.test\r\n")
    client.expect(("250", None))
    client.send(b"MAIL FROM:<a@example.test>\r\n")
    client.expect(SENDER_OK)


# check_dnsbl without an edge: sessions without an IP address ------------------------


class FakeSession:
    def __init__(self, address: Any) -> None:
        self.address = address


class FakeReply:
    code = "250"
    message = "2.1.0 Sender Ok"


@pytest.mark.parametrize(
    "address", [None, (), (None, None), ("/var/run/slimta.sock",), "/var/run/slimta.sock"]
)
def test_decorator_without_an_ip_calls_the_hook(dns_server: DnsServer, address: Any) -> None:
    calls = []

    class Validators(SmtpValidators):
        @check_dnsbl(LIST)
        def handle_mail(self, reply, sender, params):
            calls.append(sender)
            return "hook result"

    validators = Validators(FakeSession(address))  # type: ignore[arg-type]
    reply = FakeReply()
    assert validators.handle_mail(reply, "a@example.test", {}) == "hook result"
    assert calls == ["a@example.test"]
    assert (reply.code, reply.message) == ("250", "2.1.0 Sender Ok")
    assert dns_server.total_queries == 0
