"""MxSmtpRelay's pure parts: domains, MX ordering, null MX, relay caching.

DNS answers are given as plain record-like objects to the functions that
interpret them; the lookups themselves are tested against a real DNS server
in tests/integration/test_mx_relay.py.
"""

from __future__ import annotations

import random
import ssl
from collections import Counter
from types import SimpleNamespace
from typing import Any

import pytest

from slimta.envelope import Envelope
from slimta.relay import AttemptResult, PermanentRelayError, Relay
from slimta.relay.smtp.mx import (
    MxSmtpRelay,
    NoDomainError,
    _destination_domain,
    _dns_name,
    _is_null_mx,
    _order_mx,
    _records_from_answer,
)
from slimta.relay.smtp.static import StaticSmtpRelay
from slimta.smtp.reply import Reply

NO_DOMAIN = ("550", "5.1.5")
NULL_MX = ("556", "5.1.10")


def is_(reply: Reply, named: tuple[str, str]) -> bool:
    return reply.code == named[0] and reply.enhanced_status_code == named[1]


def mx(priority: int, host: str) -> SimpleNamespace:
    """A record shaped like DNSResolver's MX answers."""
    return SimpleNamespace(host=host, priority=priority, ttl=300)


# ---------------------------------------------------------------- the domain
@pytest.mark.parametrize(
    ("recipients", "domain"),
    [
        (["user@Example.COM"], "example.com"),
        (['"a@b"@example.org'], "example.org"),
        (["a@one.test", "b@two.test"], "one.test"),
        (["a@sub.EXAMPLE.net"], "sub.example.net"),
    ],
)
def test_destination_domain(recipients: list[str], domain: str) -> None:
    assert _destination_domain(Envelope("s@x.test", recipients)) == domain


@pytest.mark.parametrize("rcpt", ["postmaster", "user@", ""])
def test_no_domain(rcpt: str) -> None:
    with pytest.raises(NoDomainError) as info:
        _destination_domain(Envelope("s@x.test", [rcpt]))
    err = info.value
    assert isinstance(err, PermanentRelayError)
    assert err.recipient == rcpt
    assert is_(err.reply, NO_DOMAIN)
    assert err.reply.message == f"5.1.5 Recipient address has no domain: {rcpt}"


def test_no_domain_error_alone() -> None:
    err = NoDomainError("postmaster")
    assert str(err.reply) == "550 5.1.5 Recipient address has no domain: postmaster"
    assert err.recipient == "postmaster"


def test_no_recipients_is_permanent() -> None:
    with pytest.raises(PermanentRelayError) as info:
        _destination_domain(Envelope("s@x.test", []))
    assert info.value.reply.code == "554"


def test_idn_domain_queried_as_a_labels() -> None:
    assert _dns_name("bücher.example") == "xn--bcher-kva.example"
    assert _dns_name("example.com") == "example.com"


# ------------------------------------------------------------------ null MX
def test_records_from_answer() -> None:
    answer = [mx(20, "MX2.example.com."), mx(10, "mx1.example.com")]
    assert _records_from_answer("example.com", answer) == [
        (20, "mx2.example.com"),
        (10, "mx1.example.com"),
    ]


@pytest.mark.parametrize(
    "answer",
    [
        [mx(0, "")],
        [mx(0, ".")],
        # RFC 7505 forbids mixing; treated as null like Postfix does.
        [mx(0, ""), mx(10, "mx.example.com")],
    ],
)
def test_null_mx(answer: list[SimpleNamespace]) -> None:
    with pytest.raises(PermanentRelayError) as info:
        _records_from_answer("nomail.test", answer)
    assert is_(info.value.reply, NULL_MX)
    assert "nomail.test" in (info.value.reply.message or "")


def test_is_null_mx() -> None:
    assert _is_null_mx([(0, "")])
    assert not _is_null_mx([(0, "mx.test")])
    assert not _is_null_mx([])


# ----------------------------------------------------------------- ordering
def test_order_by_preference() -> None:
    records = [(30, "c"), (10, "a"), (20, "b")]
    assert _order_mx(records, random.Random(1)) == [(10, "a"), (20, "b"), (30, "c")]


def test_equal_preferences_in_random_order() -> None:
    records = [(10, "a"), (10, "b"), (10, "c"), (5, "first"), (99, "last")]
    seen: Counter[tuple[str, ...]] = Counter()
    rng = random.Random(42)
    for _ in range(600):
        ordered = _order_mx(records, rng)
        assert ordered[0] == (5, "first") and ordered[-1] == (99, "last")
        assert sorted(ordered) == sorted(records)
        seen[tuple(host for _, host in ordered[1:4])] += 1
    # All six orders of a, b, c occur, none far from 1/6 of the time.
    assert len(seen) == 6
    assert all(60 < n < 140 for n in seen.values())


def test_seeded_order_is_repeatable() -> None:
    records = [(10, h) for h in "abcdefgh"]
    assert _order_mx(records, random.Random(7)) == _order_mx(records, random.Random(7))


# ---------------------------------------------------------------- choose_mx
def test_choose_mx_rotates_with_attempts() -> None:
    relay = MxSmtpRelay()
    records = [(10, "a"), (20, "b"), (30, "c")]
    assert [relay.choose_mx(records, n) for n in range(5)] == ["a", "b", "c", "a", "b"]


def test_try_order_chosen_first_then_preference() -> None:
    relay = MxSmtpRelay()
    records = [(10, "a"), (20, "b"), (30, "c")]
    assert relay._try_order(records, 0) == ["a", "b", "c"]
    assert relay._try_order(records, 1) == ["b", "a", "c"]
    assert relay._try_order(records, 2) == ["c", "a", "b"]


def test_try_order_limit_and_duplicates() -> None:
    relay = MxSmtpRelay()
    relay.max_mx_tries = 2
    assert relay._try_order([(10, "a"), (20, "a"), (30, "b"), (40, "c")], 0) == ["a", "b"]


def test_choose_mx_override_outside_records() -> None:
    class Custom(MxSmtpRelay):
        def choose_mx(self, records: Any, attempts: int) -> str:
            return "smarthost.test"

    assert Custom()._try_order([(10, "a")], 0) == ["smarthost.test", "a"]


# ---------------------------------------------------------- static relays
def test_static_relay_cached_per_host_and_port() -> None:
    ctx = ssl.create_default_context()
    relay = MxSmtpRelay(ctx, pool_size=3, connect_timeout=2.0, ehlo_as="me.test")
    one = relay._get_static_relay("mx1.test", 25)
    assert relay._get_static_relay("mx1.test", 25) is one
    assert relay._get_static_relay("mx1.test", 2525) is not one
    assert relay._get_static_relay("mx2.test", 25) is not one
    assert (one.host, one.port, one.pool_size) == ("mx1.test", 25, 3)
    assert one.context is ctx
    assert one.client_kwargs == {"connect_timeout": 2.0, "ehlo_as": "me.test"}


def test_default_context_verifies() -> None:
    relay = MxSmtpRelay()
    assert relay.context.verify_mode == ssl.CERT_REQUIRED
    assert relay.context.check_hostname
    assert relay._get_static_relay("mx.test", 25).context is relay.context


def test_new_static_relay_override() -> None:
    made: list[tuple[str, int]] = []

    class Custom(MxSmtpRelay):
        def new_static_relay(self, destination: str, port: int) -> StaticSmtpRelay:
            made.append((destination, port))
            return StaticSmtpRelay(destination, port, pool_size=1)

    relay = Custom()
    relay._get_static_relay("mx.test", 25)
    relay._get_static_relay("mx.test", 25)
    assert made == [("mx.test", 25)]


def test_idle_static_relays_dropped_above_limit() -> None:
    relay = MxSmtpRelay()
    relay.max_static_relays = 3
    first = [relay._get_static_relay(f"mx{i}.test", 25) for i in range(3)]
    first[0].queue.append(("pending", None))  # one relay still has work
    relay._get_static_relay("mx9.test", 25)
    assert set(relay._relays) == {("mx0.test", 25), ("mx9.test", 25)}


def test_port_extension() -> None:
    relay = MxSmtpRelay(port=2525, pool_size=1)
    assert relay.port == 2525
    assert "port" not in relay.client_kwargs


# ----------------------------------------------------------------- force_mx
class RecordingStatic(StaticSmtpRelay):
    def attempt(self, envelope: Envelope, attempts: int) -> AttemptResult:
        return Reply("250", f"2.0.0 {self.host}:{self.port}")


class NoDnsRelay(MxSmtpRelay):
    def new_static_relay(self, destination: str, port: int) -> StaticSmtpRelay:
        return RecordingStatic(destination, port)

    def _query(self, name: str, qtype: str) -> list[Any]:
        raise AssertionError(f"DNS consulted for {name} {qtype}")


def test_force_mx_bypasses_dns() -> None:
    relay = NoDnsRelay()
    relay.force_mx("Example.COM", "smarthost.test", 2525)
    relay.force_mx("other.test", "mx.other.test")
    result = relay.attempt(Envelope("s@x.test", ["a@example.com"]), 0)
    assert isinstance(result, Reply) and result.message == "2.0.0 smarthost.test:2525"
    result = relay.attempt(Envelope("s@x.test", ["a@OTHER.test"]), 3)
    assert isinstance(result, Reply) and result.message == "2.0.0 mx.other.test:25"


def test_no_domain_before_dns() -> None:
    with pytest.raises(NoDomainError):
        NoDnsRelay().attempt(Envelope("s@x.test", ["postmaster"]), 0)


def test_kill_kills_static_relays() -> None:
    killed: list[str] = []

    class Killable(RecordingStatic):
        def kill(self) -> None:
            killed.append(self.host)

    class Custom(MxSmtpRelay):
        def new_static_relay(self, destination: str, port: int) -> StaticSmtpRelay:
            return Killable(destination, port)

    relay = Custom()
    relay._get_static_relay("a.test", 25)
    relay._get_static_relay("b.test", 25)
    relay.kill()
    assert sorted(killed) == ["a.test", "b.test"]


def test_is_a_relay() -> None:
    assert issubclass(MxSmtpRelay, Relay)
