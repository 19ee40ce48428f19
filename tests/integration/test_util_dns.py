"""slimta.util.dns against a real DNS server (tests/dnsserver.py) over UDP/TCP."""

from __future__ import annotations

import time
from collections.abc import Iterator

import gevent
import gevent.event
import pycares
import pytest

import dnsserver
from dnsserver import DnsServer
from slimta.util.dns import DNSCache, DNSError, DNSResolver

pytestmark = pytest.mark.timeout(30)

dns_server = dnsserver.dns_server

#: Seconds any single lookup may take before the test fails.
WAIT = 5.0

ZONE = {
    "example.test": {
        "MX": [(300, "20 mx2.example.test."), (120, "10 mx1.example.test.")],
        "TXT": [(60, '"v=spf1 -all"'), (60, '"part one " "part two"')],
    },
    "mx1.example.test": {"A": [(300, "192.0.2.1")], "AAAA": [(250, "2001:db8::1")]},
    "nullmx.test": {"MX": [(3600, "0 .")]},
    "alias.test": {"CNAME": [(30, "example.test.")]},
    "1.0.0.127.in-addr.arpa": {"PTR": [(600, "client.example.test.")]},
    "_25._tcp.mx1.example.test": {"TLSA": [(300, "3 1 1 " + "0123456789abcdef" * 4)]},
}


@pytest.fixture
def zone(dns_server: DnsServer) -> DnsServer:
    for name, types in ZONE.items():
        for rtype, records in types.items():
            dns_server.set(name, rtype, records)
    return dns_server


def lookup(name: str, rtype: str | int) -> list:
    return DNSResolver.query(name, rtype).get(timeout=WAIT)


def failure(name: str, rtype: str | int) -> DNSError:
    with pytest.raises(DNSError) as caught:
        lookup(name, rtype)
    return caught.value


def test_mx(zone: DnsServer) -> None:
    records = sorted(lookup("example.test", "MX"), key=lambda r: r.priority)
    assert [(r.priority, r.host, r.ttl) for r in records] == [
        (10, "mx1.example.test", 120),
        (20, "mx2.example.test", 300),
    ]
    assert zone.queries[("example.test.", "MX")] == 1


def test_query_type_may_be_a_pycares_constant(zone: DnsServer) -> None:
    assert len(lookup("example.test", pycares.QUERY_TYPE_MX)) == 2


def test_null_mx(zone: DnsServer) -> None:
    (record,) = lookup("nullmx.test", "MX")
    assert (record.priority, record.host) == (0, "")


def test_a_and_aaaa(zone: DnsServer) -> None:
    assert [(r.host, r.ttl) for r in lookup("mx1.example.test", "A")] == [("192.0.2.1", 300)]
    assert [(r.host, r.ttl) for r in lookup("mx1.example.test", "AAAA")] == [("2001:db8::1", 250)]


def test_txt(zone: DnsServer) -> None:
    records = lookup("example.test", "TXT")
    assert sorted(r.text for r in records) == ["part one part two", "v=spf1 -all"]
    assert sorted(r.data for r in records) == [b"part one part two", b"v=spf1 -all"]


def test_ptr(zone: DnsServer) -> None:
    (record,) = lookup("1.0.0.127.in-addr.arpa", "PTR")
    assert (record.name, record.ttl) == ("client.example.test", 600)


def test_cname(zone: DnsServer) -> None:
    (record,) = lookup("alias.test", "CNAME")
    assert record.cname == "example.test"
    # Through the alias only the MX records come back, not the CNAME.
    assert sorted(r.host for r in lookup("alias.test", "MX")) == [
        "mx1.example.test",
        "mx2.example.test",
    ]


def test_tlsa(zone: DnsServer) -> None:
    (record,) = lookup("_25._tcp.mx1.example.test", "TLSA")
    assert (record.cert_usage, record.selector, record.matching_type) == (3, 1, 1)
    assert record.cert_association_data == bytes.fromhex("0123456789abcdef" * 4)


def test_nxdomain(zone: DnsServer) -> None:
    exc = failure("nowhere.test", "MX")
    assert exc.errno == pycares.errno.ARES_ENOTFOUND
    assert "[ARES_ENOTFOUND]" in str(exc)


def test_nodata(zone: DnsServer) -> None:
    assert failure("mx1.example.test", "MX").errno == pycares.errno.ARES_ENODATA


def test_servfail(zone: DnsServer) -> None:
    zone.fail("example.test")
    errno = failure("example.test", "MX").errno
    assert errno == pycares.errno.ARES_ESERVFAIL
    assert errno not in (pycares.errno.ARES_ENOTFOUND, pycares.errno.ARES_ENODATA)
    zone.heal("example.test")
    assert len(lookup("example.test", "MX")) == 2


def test_international_name(dns_server: DnsServer) -> None:
    dns_server.set("xn--exmple-cua.test", "A", [(60, "192.0.2.3")])
    assert lookup("exämple.test", "A")[0].host == "192.0.2.3"


@pytest.mark.parametrize("name", ["bad..name", "a" * 64 + ".test", "\udcff.test"])
def test_bad_name(dns_server: DnsServer, name: str) -> None:
    assert failure(name, "A").errno == pycares.errno.ARES_EBADNAME
    assert dns_server.total_queries == 0


def test_zone_changes_at_runtime(zone: DnsServer) -> None:
    zone.set("new.test", "A", [(60, "192.0.2.7")])
    assert lookup("new.test", "A")[0].host == "192.0.2.7"
    zone.remove("new.test", "A")
    assert failure("new.test", "A").errno == pycares.errno.ARES_ENODATA
    zone.remove("new.test")
    assert failure("new.test", "A").errno == pycares.errno.ARES_ENOTFOUND
    assert zone.count("new.test", "A") == 3


def test_never_answered_times_out_within_the_timeout(dns_server: DnsServer) -> None:
    dns_server.drop("silent.test")
    with dns_server.slimta_resolver(timeout=0.3, tries=1):
        began = time.monotonic()
        exc = failure("silent.test", "A")
        took = time.monotonic() - began
    assert exc.errno == pycares.errno.ARES_ETIMEOUT
    assert took < 0.3 + 0.5, f"timed out after {took:.2f}s"
    assert dns_server.count("silent.test", "A") == 1


def test_hub_runs_during_a_lookup(dns_server: DnsServer) -> None:
    dns_server.drop("silent.test")
    ticks = 0
    ticked = gevent.event.Event()

    def ticker() -> None:
        nonlocal ticks
        while True:
            gevent.sleep(0.01)
            ticks += 1
            if ticks == 5:
                ticked.set()

    with dns_server.slimta_resolver(timeout=0.5, tries=1):
        pending = DNSResolver.query("silent.test", "A")
        greenlet = gevent.spawn(ticker)
        try:
            # The ticker gets to run while the lookup is outstanding.
            assert ticked.wait(WAIT)
            assert not pending.ready()
            with pytest.raises(DNSError):
                pending.get(timeout=WAIT)
        finally:
            greenlet.kill()


def test_many_concurrent_lookups(dns_server: DnsServer) -> None:
    for n in range(200):
        dns_server.set(f"h{n}.bulk.test", "A", [(60, f"10.0.{n // 250}.{n % 250}")])
    pending = [DNSResolver.query(f"h{n}.bulk.test", "A") for n in range(200)]
    for n, ar in enumerate(pending):
        assert ar.get(timeout=WAIT)[0].host == f"10.0.{n // 250}.{n % 250}"
    assert dns_server.total_queries == 200


def test_big_answer_comes_over_tcp(dns_server: DnsServer) -> None:
    texts = [f'"{n:02d}{"x" * 200}"' for n in range(12)]
    dns_server.set("big.test", "TXT", [(60, t) for t in texts])
    records = lookup("big.test", "TXT")
    assert sorted(r.text for r in records) == sorted(t.strip('"') for t in texts)
    # Truncated over UDP, then asked again over TCP.
    assert dns_server.count("big.test", "TXT") == 2


def test_configure_cancels_pending_queries_and_returns_settings(dns_server: DnsServer) -> None:
    dns_server.drop("silent.test")
    pending = DNSResolver.query("silent.test", "A")
    address = f"127.0.0.1:{dns_server.port}"
    previous = DNSResolver.configure(servers=[address], timeout=2.0, tries=1)
    assert previous["servers"] == [address]
    with pytest.raises(DNSError) as caught:
        pending.get(timeout=WAIT)
    assert caught.value.errno == pycares.errno.ARES_ECANCELLED
    assert DNSResolver.configure(**previous) == {
        "servers": [address],
        "timeout": 2.0,
        "tries": 1,
    }


def test_a_channel_of_your_own(dns_server: DnsServer) -> None:
    # A plain pycares 5 channel answers on c-ares' own thread.
    dns_server.set("own.test", "A", [(60, "192.0.2.42")])
    DNSResolver.channel = pycares.Channel(
        servers=[f"127.0.0.1:{dns_server.port}"], timeout=1.0, tries=1
    )
    try:
        assert lookup("own.test", "A")[0].host == "192.0.2.42"
        assert failure("missing.test", "A").errno == pycares.errno.ARES_ENOTFOUND
    finally:
        channel = DNSResolver.channel
        DNSResolver.channel = None
        channel.close()


# The TTL cache against the server's counters ------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def cache(clock: Clock) -> Iterator[DNSCache]:
    yield DNSCache(clock=clock, negative_ttl=30.0)


def cached(cache: DNSCache, name: str, rtype: str) -> list:
    return cache.query(name, rtype).get(timeout=WAIT)


def settle() -> None:
    gevent.sleep(0)
    gevent.sleep(0)


def test_cache_hit_sends_no_query(zone: DnsServer, cache: DNSCache, clock: Clock) -> None:
    first = cached(cache, "example.test", "MX")
    settle()
    clock.now += 119
    assert cached(cache, "example.test", "MX") == first
    assert zone.count("example.test", "MX") == 1
    assert (cache.lookups, cache.hits) == (1, 1)


def test_cache_expiry_sends_a_new_query(zone: DnsServer, cache: DNSCache, clock: Clock) -> None:
    cached(cache, "example.test", "MX")
    settle()
    clock.now += 120  # the smaller TTL of the two MX records
    zone.set("example.test", "MX", [(300, "5 mx9.example.test.")])
    assert [r.host for r in cached(cache, "example.test", "MX")] == ["mx9.example.test"]
    assert zone.count("example.test", "MX") == 2
    assert cache.lookups == 2


def test_cache_keeps_nxdomain_for_a_while(zone: DnsServer, cache: DNSCache, clock: Clock) -> None:
    for _ in range(3):
        with pytest.raises(DNSError) as caught:
            cached(cache, "nowhere.test", "MX")
        assert caught.value.errno == pycares.errno.ARES_ENOTFOUND
        settle()
    assert zone.count("nowhere.test", "MX") == 1
    clock.now += 30
    with pytest.raises(DNSError):
        cached(cache, "nowhere.test", "MX")
    assert zone.count("nowhere.test", "MX") == 2


def test_cache_keeps_nodata_for_a_while(zone: DnsServer, cache: DNSCache) -> None:
    for _ in range(3):
        with pytest.raises(DNSError) as caught:
            cached(cache, "mx1.example.test", "MX")
        assert caught.value.errno == pycares.errno.ARES_ENODATA
        settle()
    assert zone.count("mx1.example.test", "MX") == 1


def test_cache_does_not_keep_servfail(zone: DnsServer, cache: DNSCache) -> None:
    zone.fail("example.test")
    for _ in range(3):
        with pytest.raises(DNSError) as caught:
            cached(cache, "example.test", "MX")
        assert caught.value.errno == pycares.errno.ARES_ESERVFAIL
        settle()
    assert zone.count("example.test", "MX") == 3
    zone.heal("example.test")
    assert len(cached(cache, "example.test", "MX")) == 2


def test_cache_merges_concurrent_identical_queries(zone: DnsServer, cache: DNSCache) -> None:
    pending = [cache.query("example.test", "MX") for _ in range(50)]
    pending += [cache.query("EXAMPLE.test.", "MX") for _ in range(50)]
    results = [ar.get(timeout=WAIT) for ar in pending]
    assert all(len(r) == 2 for r in results)
    assert zone.count("example.test", "MX") == 1
    assert (cache.lookups, cache.joined) == (1, 99)


def test_resolver_cache_is_emptied_by_the_fixture(zone: DnsServer) -> None:
    assert len(DNSResolver.cache) == 0
    DNSResolver.query_cached("example.test", "MX").get(timeout=WAIT)
    settle()
    DNSResolver.query_cached("example.test", "MX").get(timeout=WAIT)
    assert zone.count("example.test", "MX") == 1
    assert len(DNSResolver.cache) == 1
