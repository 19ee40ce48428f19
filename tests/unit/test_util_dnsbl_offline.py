"""slimta.util.dnsbl without DNS: query names and the check_dnsbl decorator."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from slimta.smtp.reply import Reply
from slimta.util.dnsbl import DnsBlocklist, check_dnsbl

NIBBLES_2001_DB8_1 = "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2"


@pytest.mark.parametrize(
    ("ip", "name"),
    [
        # RFC 5782 2.1: the octets reversed.
        ("192.0.2.1", "1.2.0.192.bl.test"),
        ("127.0.0.2", "2.0.0.127.bl.test"),
        (ipaddress.ip_address("192.0.2.1"), "1.2.0.192.bl.test"),
        # RFC 5782 2.4: the 32 nibbles reversed.
        ("2001:db8::1", f"{NIBBLES_2001_DB8_1}.bl.test"),
        ("2001:DB8:0:0:0:0:0:1", f"{NIBBLES_2001_DB8_1}.bl.test"),
        ("fe80::1%eth0", "1." + "0." * 27 + "0.8.e.f.bl.test"),
        # A dual-stack listener's view of an IPv4 client.
        ("::ffff:192.0.2.1", "1.2.0.192.bl.test"),
    ],
)
def test_query_name(ip: Any, name: str) -> None:
    assert DnsBlocklist("bl.test")._query_name(ip) == name
    assert DnsBlocklist("bl.test.")._query_name(ip) == name


@pytest.mark.parametrize(
    "ip", [None, "", "unknown", "/run/slimta.sock", "192.0.2", "256.0.0.1", "::g", 3, b"1.2.3.4"]
)
def test_no_query_name_for_what_is_not_an_ip(ip: Any) -> None:
    assert DnsBlocklist("bl.test")._query_name(ip) is None


def test_repr() -> None:
    assert repr(DnsBlocklist("bl.test")) == "DnsBlocklist('bl.test')"


class FakeChecker:
    """Stands for a DnsBlocklist or a DnsBlocklistGroup."""

    def __init__(self, answer: object) -> None:
        self.answer = answer
        self.calls: list[tuple[Any, float | None]] = []

    def get(self, ip: Any, timeout: float | None = None) -> object:
        self.calls.append((ip, timeout))
        return self.answer


class FakeSession:
    def __init__(self, address: Any) -> None:
        self.address = address


def validators(checker: Any, address: Any = ("192.0.2.1", 4321), **options: Any) -> Any:
    class Validators:
        def __init__(self) -> None:
            self.session = FakeSession(address)
            self.calls: list[tuple[Any, ...]] = []

        @check_dnsbl(checker, **options)
        def handle_rcpt(self, reply: Reply, recipient: str, params: dict[str, Any]) -> str:
            """The RCPT hook."""
            self.calls.append((recipient, params))
            return "called"

    return Validators()


@pytest.mark.parametrize("answer", [True, {"bl.test"}])
def test_listed_client_gets_the_match_reply(answer: object) -> None:
    checker = FakeChecker(answer)
    hooks = validators(checker)
    reply = Reply("250", "2.1.5 Ok")
    assert hooks.handle_rcpt(reply, "b@example.test", {}) is None
    assert (reply.code, reply.message) == ("550", "5.7.1 Access denied")
    assert hooks.calls == []
    assert checker.calls == [("192.0.2.1", 10.0)]


@pytest.mark.parametrize("answer", [False, set()])
def test_unlisted_client_gets_the_hook(answer: object) -> None:
    checker = FakeChecker(answer)
    hooks = validators(checker)
    reply = Reply("250", "2.1.5 Ok")
    assert hooks.handle_rcpt(reply, "b@example.test", {"x": 1}) == "called"
    assert (reply.code, reply.message) == ("250", "2.1.5 Ok")
    assert hooks.calls == [("b@example.test", {"x": 1})]


def test_options() -> None:
    checker = FakeChecker(True)
    hooks = validators(checker, match_code="554", match_message="5.7.1 Go away", timeout=2.5)
    reply = Reply("250", "2.1.5 Ok")
    hooks.handle_rcpt(reply, "b@example.test", {})
    assert (reply.code, reply.message) == ("554", "5.7.1 Go away")
    assert checker.calls == [("192.0.2.1", 2.5)]


def test_positional_options() -> None:
    checker = FakeChecker(True)
    hooks = validators(checker)
    decorated = check_dnsbl(checker, "521", "5.7.1 No", 1.0)(type(hooks).handle_rcpt)
    reply = Reply("250", "2.1.5 Ok")
    decorated(hooks, reply, "b@example.test", {})
    assert (reply.code, reply.message) == ("521", "5.7.1 No")


def test_a_list_name_makes_a_blocklist() -> None:
    # Not called: only the wrapping is checked here, without DNS.
    hooks = validators("bl.test")
    assert type(hooks).handle_rcpt.__name__ == "handle_rcpt"
    assert type(hooks).handle_rcpt.__doc__ == "The RCPT hook."


@pytest.mark.parametrize(
    "address", [None, (), (None, None), ("/run/slimta.sock",), "/run/slimta.sock", [b"1.2.3.4"]]
)
def test_session_without_an_ip_gets_the_hook_unchecked(address: Any) -> None:
    checker = FakeChecker(True)
    hooks = validators(checker, address=address)
    reply = Reply("250", "2.1.5 Ok")
    assert hooks.handle_rcpt(reply, "b@example.test", {}) == "called"
    assert checker.calls == []
