"""slimta.util.dns and slimta.util.ptrlookup without a network.

The record conversion is fed pycares 5's own result dataclasses; the cache
and PtrLookup are driven by AsyncResults the tests complete themselves
(real DNS traffic is in tests/integration/test_util_dns.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import gevent
import pycares
import pytest
from gevent.event import AsyncResult

import slimta.util.dns
import slimta.util.ptrlookup
from slimta.util.dns import (
    DNSCache,
    DNSError,
    DNSResolver,
    MxRecord,
    PtrRecord,
    TlsaRecord,
    TxtRecord,
    _query_type,
    _records,
    reverse_name,
)
from slimta.util.ptrlookup import PtrLookup

pytestmark = pytest.mark.timeout(10)

ENOTFOUND = pycares.errno.ARES_ENOTFOUND
ENODATA = pycares.errno.ARES_ENODATA
ESERVFAIL = pycares.errno.ARES_ESERVFAIL
ETIMEOUT = pycares.errno.ARES_ETIMEOUT


def test_public_names() -> None:
    for name in slimta.util.dns.__all__:
        assert hasattr(slimta.util.dns, name)
    assert {"DNSError", "DNSResolver"} <= set(slimta.util.dns.__all__)
    assert slimta.util.ptrlookup.__all__ == ["PtrLookup"]


# DNSError ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("errno", "name"),
    [(ENOTFOUND, "ARES_ENOTFOUND"), (ENODATA, "ARES_ENODATA"), (ETIMEOUT, "ARES_ETIMEOUT")],
)
def test_dns_error(errno: int, name: str) -> None:
    exc = DNSError(errno)
    assert exc.errno == errno
    assert str(exc) == f"{pycares.errno.strerror(errno)} [{name}]"
    assert isinstance(exc, Exception)


def test_dns_error_unknown_number() -> None:
    assert DNSError(999).errno == 999
    assert str(DNSError(999)).endswith("[ARES_EUNKNOWN]")


# Query types and names ----------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("MX", pycares.QUERY_TYPE_MX),
        ("mx", pycares.QUERY_TYPE_MX),
        ("A", pycares.QUERY_TYPE_A),
        ("AAAA", pycares.QUERY_TYPE_AAAA),
        ("TXT", pycares.QUERY_TYPE_TXT),
        ("PTR", pycares.QUERY_TYPE_PTR),
        ("CNAME", pycares.QUERY_TYPE_CNAME),
        ("TLSA", pycares.QUERY_TYPE_TLSA),
        (pycares.QUERY_TYPE_MX, pycares.QUERY_TYPE_MX),
    ],
)
def test_query_type(given: int | str, expected: int) -> None:
    assert _query_type(given) == expected


@pytest.mark.parametrize("bad", ["BOGUS", "", 65000])
def test_unknown_query_type(bad: int | str) -> None:
    with pytest.raises(ValueError):
        _query_type(bad)
    with pytest.raises(ValueError):
        DNSResolver.query("example.test", bad)


@pytest.mark.parametrize(
    ("ip", "name"),
    [
        ("192.0.2.1", "1.2.0.192.in-addr.arpa"),
        ("127.0.0.1", "1.0.0.127.in-addr.arpa"),
        ("::ffff:192.0.2.1", "1.2.0.192.in-addr.arpa"),
        (
            "2001:db8::1",
            "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa",
        ),
        (
            "fe80::1%eth0",
            "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.e.f.ip6.arpa",
        ),
    ],
)
def test_reverse_name(ip: str, name: str) -> None:
    assert reverse_name(ip) == name


@pytest.mark.parametrize("bad", ["", "example.test", "300.1.1.1", "1.2.3"])
def test_reverse_name_rejects_non_addresses(bad: str) -> None:
    with pytest.raises(ValueError):
        reverse_name(bad)


# Records ---------------------------------------------------------------------


def answer(*records: tuple[int, int, Any]) -> Any:
    """A pycares 5 DNSResult whose answer section holds ``(type, ttl, data)``."""
    return pycares.DNSResult(
        answer=[
            pycares.DNSRecord(name="q.test", type=t, record_class=1, ttl=ttl, data=data)
            for t, ttl, data in records
        ],
        authority=[],
        additional=[],
    )


def test_mx_records_keep_40_names() -> None:
    result = answer(
        (pycares.QUERY_TYPE_MX, 300, pycares.MXRecordData(priority=10, exchange="mx1.test")),
        (pycares.QUERY_TYPE_MX, 200, pycares.MXRecordData(priority=0, exchange="")),
    )
    first, null = _records(result, pycares.QUERY_TYPE_MX)
    assert (first.host, first.priority, first.ttl) == ("mx1.test", 10, 300)
    assert first.exchange == "mx1.test"
    assert first.type == "MX"
    assert (null.host, null.priority) == ("", 0)


def test_cname_records_are_left_out_of_other_answers() -> None:
    result = answer(
        (pycares.QUERY_TYPE_CNAME, 30, pycares.CNAMERecordData(cname="real.test")),
        (pycares.QUERY_TYPE_A, 60, pycares.ARecordData(addr="192.0.2.1")),
    )
    (record,) = _records(result, pycares.QUERY_TYPE_A)
    assert (record.host, record.addr, record.ttl) == ("192.0.2.1", "192.0.2.1", 60)
    (cname,) = _records(result, pycares.QUERY_TYPE_CNAME)
    assert cname.cname == "real.test"
    assert len(_records(result, pycares.QUERY_TYPE_ANY)) == 2


def test_txt_text_and_bytes() -> None:
    result = answer(
        (pycares.QUERY_TYPE_TXT, 60, pycares.TXTRecordData(data=b"v=spf1 -all")),
        (pycares.QUERY_TYPE_TXT, 60, pycares.TXTRecordData(data=b"caf\xc3\xa9 \xff")),
    )
    spf, odd = _records(result, pycares.QUERY_TYPE_TXT)
    assert spf == TxtRecord("v=spf1 -all", b"v=spf1 -all", 60)
    assert odd.data == b"caf\xc3\xa9 \xff"
    assert odd.text == "café \ufffd"


def test_ptr_and_tlsa_records() -> None:
    (ptr,) = _records(
        answer((pycares.QUERY_TYPE_PTR, 5, pycares.PTRRecordData(dname="host.test"))),
        pycares.QUERY_TYPE_PTR,
    )
    assert ptr == PtrRecord("host.test", 5)
    assert (ptr.name, ptr.dname, ptr.aliases) == ("host.test", "host.test", ())
    data = pycares.TLSARecordData(
        cert_usage=3, selector=1, matching_type=1, cert_association_data=b"\x01\x02"
    )
    (tlsa,) = _records(answer((pycares.QUERY_TYPE_TLSA, 9, data)), pycares.QUERY_TYPE_TLSA)
    assert tlsa == TlsaRecord(3, 1, 1, b"\x01\x02", 9)
    assert (tlsa.usage, tlsa.selector, tlsa.mtype, tlsa.cert) == (3, 1, 1, b"\x01\x02")


def test_records_are_immutable() -> None:
    record = MxRecord("mx.test", 10, 60)
    with pytest.raises(AttributeError):
        record.host = "other.test"  # type: ignore[misc]


# DNSCache ----------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeQueries:
    """Stands in for DNSResolver.query: the test completes each lookup."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, int, AsyncResult]] = []

    def __call__(self, name: str, query_type: int) -> AsyncResult:
        ar = AsyncResult()
        self.sent.append((name, query_type, ar))
        return ar

    def answer(self, value: list[Any] | BaseException, index: int = -1) -> None:
        ar = self.sent[index][2]
        if isinstance(value, BaseException):
            ar.set_exception(value)
        else:
            ar.set(value)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def queries() -> FakeQueries:
    return FakeQueries()


@pytest.fixture
def cache(clock: FakeClock, queries: FakeQueries) -> DNSCache:
    return DNSCache(queries, clock=clock, negative_ttl=30.0)


def get(ar: AsyncResult) -> Any:
    return ar.get(timeout=2.0)


def settle() -> None:
    """Let the hub run the completion callbacks already due."""
    gevent.sleep(0)
    gevent.sleep(0)


MX = [MxRecord("mx1.test", 10, 300), MxRecord("mx2.test", 20, 120)]


def test_cache_keeps_answers_until_the_smallest_ttl(
    cache: DNSCache, queries: FakeQueries, clock: FakeClock
) -> None:
    first = cache.query("Example.Test.", "MX")
    queries.answer(MX)
    assert get(first) == MX
    assert [q[:2] for q in queries.sent] == [("example.test", pycares.QUERY_TYPE_MX)]
    settle()
    clock.now += 119
    assert get(cache.query("example.test", pycares.QUERY_TYPE_MX)) == MX
    assert (cache.lookups, cache.hits, len(queries.sent)) == (1, 1, 1)
    clock.now += 1
    again = cache.query("example.test", "MX")
    assert len(queries.sent) == 2
    assert cache.lookups == 2
    queries.answer(MX[:1])
    assert get(again) == MX[:1]


def test_cache_hands_out_fresh_lists(cache: DNSCache, queries: FakeQueries) -> None:
    first = cache.query("example.test", "MX")
    queries.answer(list(MX))
    get(first).clear()
    settle()
    assert get(cache.query("example.test", "MX")) == MX


@pytest.mark.parametrize("errno", [ENOTFOUND, ENODATA])
def test_cache_keeps_negative_answers_for_negative_ttl(
    cache: DNSCache, queries: FakeQueries, clock: FakeClock, errno: int
) -> None:
    first = cache.query("gone.test", "MX")
    queries.answer(DNSError(errno))
    with pytest.raises(DNSError) as caught:
        get(first)
    assert caught.value.errno == errno
    settle()
    clock.now += 29
    with pytest.raises(DNSError) as caught:
        get(cache.query("gone.test", "MX"))
    assert caught.value.errno == errno
    assert (cache.lookups, cache.hits) == (1, 1)
    clock.now += 1
    cache.query("gone.test", "MX")
    assert cache.lookups == 2


@pytest.mark.parametrize("errno", [ESERVFAIL, ETIMEOUT, pycares.errno.ARES_ECONNREFUSED])
def test_cache_never_keeps_other_failures(
    cache: DNSCache, queries: FakeQueries, errno: int
) -> None:
    first = cache.query("flaky.test", "MX")
    queries.answer(DNSError(errno))
    with pytest.raises(DNSError):
        get(first)
    settle()
    cache.query("flaky.test", "MX")
    assert cache.lookups == 2
    assert len(cache) == 0


def test_cache_merges_identical_queries_in_flight(cache: DNSCache, queries: FakeQueries) -> None:
    waiting = [cache.query("example.test", "MX") for _ in range(20)]
    other = cache.query("example.test", "A")
    assert len(queries.sent) == 2
    assert (cache.lookups, cache.joined) == (2, 19)
    queries.answer(MX, index=0)
    results = [get(ar) for ar in waiting]
    assert all(result == MX for result in results)
    assert len({id(result) for result in results}) == 20
    assert not other.ready()


def test_cache_gives_each_waiter_its_own_error(cache: DNSCache, queries: FakeQueries) -> None:
    waiting = [cache.query("bad.test", "A") for _ in range(3)]
    queries.answer(DNSError(ESERVFAIL))
    errors = []
    for ar in waiting:
        with pytest.raises(DNSError) as caught:
            get(ar)
        errors.append(caught.value)
    assert [e.errno for e in errors] == [ESERVFAIL] * 3
    assert len({id(e) for e in errors}) == 3


def test_cache_skips_ttl_zero(cache: DNSCache, queries: FakeQueries) -> None:
    first = cache.query("zero.test", "A")
    queries.answer([MxRecord("x.test", 0, 0)])
    get(first)
    settle()
    cache.query("zero.test", "A")
    assert cache.lookups == 2


def test_cache_caps_ttl(clock: FakeClock, queries: FakeQueries) -> None:
    cache = DNSCache(queries, clock=clock, max_ttl=10.0)
    first = cache.query("long.test", "MX")
    queries.answer([MxRecord("mx.test", 1, 86400)])
    get(first)
    settle()
    clock.now += 10
    cache.query("long.test", "MX")
    assert cache.lookups == 2


def test_cache_bounds_its_size(clock: FakeClock, queries: FakeQueries) -> None:
    cache = DNSCache(queries, clock=clock, max_entries=3)
    for n in range(5):
        ar = cache.query(f"n{n}.test", "MX")
        queries.answer([MxRecord("mx.test", 1, 60 + n)])
        get(ar)
        settle()
    assert len(cache) == 3
    get(cache.query("n4.test", "MX"))
    assert cache.hits == 1
    cache.query("n0.test", "MX")
    assert cache.lookups == 6


def test_cache_clear_forgets_answers_and_lookups_in_flight(
    cache: DNSCache, queries: FakeQueries
) -> None:
    first = cache.query("example.test", "MX")
    queries.answer(MX)
    get(first)
    settle()
    in_flight = cache.query("other.test", "MX")
    cache.clear()
    assert len(cache) == 0
    after = cache.query("other.test", "MX")
    assert cache.lookups == 3
    queries.answer(MX, index=1)
    assert get(in_flight) == MX
    settle()
    assert len(cache) == 0
    assert not after.ready()


def test_resolver_query_cached_uses_its_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    queries = FakeQueries()
    monkeypatch.setattr(DNSResolver, "cache", DNSCache(queries))
    ar = DNSResolver.query_cached("example.test", "MX")
    queries.answer(MX)
    assert get(ar) == MX


def test_cache_peek_answers_only_from_the_cache(
    cache: DNSCache, queries: FakeQueries, clock: FakeClock
) -> None:
    assert cache.peek("example.test", "MX") is None
    assert queries.sent == []  # peeking never looks up
    first = cache.query("example.test", "MX")
    queries.answer(MX)
    get(first)
    settle()
    peeked = cache.peek("EXAMPLE.test.", pycares.QUERY_TYPE_MX)
    assert peeked == MX
    assert isinstance(peeked, list)
    peeked.clear()  # a fresh list: the cache keeps its own
    assert cache.peek("example.test", "MX") == MX
    gone = cache.query("gone.test", "A")
    queries.answer(DNSError(ENOTFOUND))
    with pytest.raises(DNSError):
        get(gone)
    settle()
    assert cache.peek("gone.test", "A") == ENOTFOUND
    clock.now += 121
    assert cache.peek("example.test", "MX") is None
    assert cache.hits == 3


# PtrLookup ---------------------------------------------------------------------


@pytest.fixture
def ptr_queries(monkeypatch: pytest.MonkeyPatch) -> FakeQueries:
    queries = FakeQueries()
    monkeypatch.setattr(DNSResolver, "cache", DNSCache(queries))
    return queries


def started(ip: str) -> PtrLookup:
    lookup = PtrLookup(ip)
    lookup.start()
    gevent.sleep(0)
    return lookup


def test_ptr_cached_needs_no_lookup(ptr_queries: FakeQueries) -> None:
    assert PtrLookup.cached("192.0.2.1") == (False, None)
    assert PtrLookup.cached("not an address") == (True, None)
    lookup = started("192.0.2.1")
    ptr_queries.answer([PtrRecord("host.test", 60)])
    assert lookup.finish(runtime=2.0) == "host.test"
    assert PtrLookup.cached("192.0.2.1") == (True, "host.test")
    other = started("192.0.2.2")
    ptr_queries.answer(DNSError(ENOTFOUND))
    assert other.finish(runtime=2.0) is None
    assert PtrLookup.cached("192.0.2.2") == (True, None)
    assert len(ptr_queries.sent) == 2


def test_ptr_lookup_finds_the_name(ptr_queries: FakeQueries) -> None:
    lookup = started("192.0.2.1")
    assert ptr_queries.sent[0][:2] == ("1.2.0.192.in-addr.arpa", pycares.QUERY_TYPE_PTR)
    ptr_queries.answer([PtrRecord("host.test", 60)])
    assert lookup.finish(runtime=2.0) == "host.test"
    assert lookup.get() == "host.test"


@pytest.mark.parametrize("errno", [ENOTFOUND, ENODATA])
def test_ptr_lookup_no_name_is_quiet(
    ptr_queries: FakeQueries, caplog: pytest.LogCaptureFixture, errno: int
) -> None:
    caplog.set_level(logging.DEBUG, "slimta.util.ptrlookup")
    lookup = started("192.0.2.1")
    ptr_queries.answer(DNSError(errno))
    assert lookup.finish(runtime=2.0) is None
    assert lookup.successful()
    assert not caplog.records


def test_ptr_lookup_logs_other_failures(
    ptr_queries: FakeQueries, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, "slimta.util.ptrlookup")
    lookup = started("192.0.2.1")
    ptr_queries.answer(DNSError(ESERVFAIL))
    assert lookup.finish(runtime=2.0) is None
    assert lookup.successful()
    assert "ARES_ESERVFAIL" in caplog.text


def test_ptr_lookup_logs_unexpected_errors(
    ptr_queries: FakeQueries, caplog: pytest.LogCaptureFixture
) -> None:
    lookup = started("192.0.2.1")
    ptr_queries.answer(RuntimeError("boom"))
    assert lookup.finish(runtime=2.0) is None
    assert lookup.successful()
    assert "RuntimeError" in caplog.text


@pytest.mark.parametrize("ip", ["", "not-an-ip", "/run/smtp.sock"])
def test_ptr_lookup_of_a_non_address_is_none(ptr_queries: FakeQueries, ip: str) -> None:
    lookup = started(ip)
    assert lookup.finish(runtime=2.0) is None
    assert not ptr_queries.sent


def test_finish_without_runtime_does_not_wait(ptr_queries: FakeQueries) -> None:
    lookup = started("192.0.2.1")
    assert lookup.finish() is None
    gevent.sleep(0)
    assert lookup.dead
    # The answer arriving later changes nothing.
    ptr_queries.answer([PtrRecord("late.test", 60)])
    assert lookup.finish() is None


def test_finish_waits_only_the_rest_of_runtime(ptr_queries: FakeQueries) -> None:
    lookup = started("192.0.2.1")
    assert lookup.start_time is not None
    # As if the lookup had started 0.9 s ago: 0.1 s of a 1.0 s budget is left.
    lookup.start_time -= 0.9
    began = time.monotonic()
    assert lookup.finish(runtime=1.0) is None
    waited = time.monotonic() - began
    assert waited < 0.6, f"waited {waited:.2f}s, not the rest of runtime"
    gevent.sleep(0)
    assert lookup.dead


def test_finish_past_runtime_returns_at_once(ptr_queries: FakeQueries) -> None:
    lookup = started("192.0.2.1")
    assert lookup.start_time is not None
    lookup.start_time -= 10.0
    began = time.monotonic()
    assert lookup.finish(runtime=5.0) is None
    assert time.monotonic() - began < 0.5


def test_finish_of_an_unstarted_lookup(ptr_queries: FakeQueries) -> None:
    lookup = PtrLookup("192.0.2.1")
    assert lookup.finish(runtime=1.0) is None
    assert lookup.start_time is None


class FakeSocket:
    def __init__(self, peer: Any, local: Any) -> None:
        self.peer = peer
        self.local = local

    def getpeername(self) -> Any:
        return self.peer

    def getsockname(self) -> Any:
        return self.local


@pytest.mark.parametrize(
    ("method", "ip", "port"),
    [
        (PtrLookup.from_getpeername, "192.0.2.1", 40000),
        (PtrLookup.from_getsockname, "2001:db8::25", 25),
    ],
)
def test_from_socket_names(method: Callable[..., Any], ip: str, port: int) -> None:
    sock = FakeSocket(("192.0.2.1", 40000), ("2001:db8::25", 25, 0, 0))
    lookup, got_port = method(sock)
    assert isinstance(lookup, PtrLookup)
    assert (lookup.ip, got_port) == (ip, port)
    assert not lookup.started


def test_from_unix_socket() -> None:
    lookup, port = PtrLookup.from_getpeername(FakeSocket("/run/smtp.sock", ""))
    assert (lookup.ip, port) == ("/run/smtp.sock", None)
