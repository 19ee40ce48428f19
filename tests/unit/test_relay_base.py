"""Relay errors, the Relay base class and BlackholeRelay."""

from __future__ import annotations

import re

import pytest

from slimta.core import SlimtaError
from slimta.envelope import Envelope
from slimta.policy import QueuePolicy, RelayPolicy
from slimta.relay import PermanentRelayError, Relay, RelayError, TransientRelayError
from slimta.relay.blackhole import BlackholeRelay
from slimta.smtp.reply import Reply


def test_error_tree() -> None:
    assert issubclass(RelayError, SlimtaError)
    assert issubclass(PermanentRelayError, RelayError)
    assert issubclass(TransientRelayError, RelayError)


@pytest.mark.parametrize(
    ("cls", "wire"),
    [
        (PermanentRelayError, "550 5.0.0 no such user"),
        (TransientRelayError, "450 4.0.0 no such user"),
        (RelayError, "450 4.0.0 no such user"),
    ],
)
def test_default_reply(cls: type[RelayError], wire: str) -> None:
    error = cls("no such user")
    assert str(error) == "no such user"
    assert isinstance(error.reply, Reply)
    assert str(error.reply) == wire


def test_given_reply_is_kept() -> None:
    reply = Reply("554", "5.7.1 Rejected")
    error = PermanentRelayError("rejected", reply)
    assert error.reply is reply


def test_subclass_defaults() -> None:
    class Custom(PermanentRelayError):
        _default_code = "554"
        _default_esc = "5.7.1"

    assert str(Custom("policy").reply) == "554 5.7.1 policy"


class Recorder(RelayPolicy):
    def __init__(self, log: list[str], name: str) -> None:
        self.log = log
        self.name = name

    def apply(self, envelope: Envelope) -> None:
        self.log.append(self.name)
        envelope.recipients.append(self.name)


class Echo(Relay):
    def __init__(self, log: list[str]) -> None:
        super().__init__()
        self.log = log

    def attempt(self, envelope: Envelope, attempts: int) -> Reply:
        self.log.append(f"attempt {attempts}")
        return Reply("250", "2.0.0 Ok")


def test_attempt_runs_policies_in_order_then_attempt() -> None:
    log: list[str] = []
    relay = Echo(log)
    relay.add_policy(Recorder(log, "first"))
    relay.add_policy(Recorder(log, "second"))
    envelope = Envelope("s@x.test", ["r@x.test"])
    reply = relay._attempt(envelope, 3)
    assert log == ["first", "second", "attempt 3"]
    assert envelope.recipients == ["r@x.test", "first", "second"]
    assert isinstance(reply, Reply) and reply.code == "250"


def test_policy_error_stops_the_attempt() -> None:
    class Deny(RelayPolicy):
        def apply(self, envelope: Envelope) -> None:
            raise TransientRelayError("greylisted")

    log: list[str] = []
    relay = Echo(log)
    relay.add_policy(Deny())
    with pytest.raises(TransientRelayError):
        relay._attempt(Envelope("s@x.test", ["r@x.test"]), 0)
    assert log == []


def test_add_policy_accepts_only_relay_policies() -> None:
    relay = Echo([])
    with pytest.raises(TypeError):
        relay.add_policy(QueuePolicy())  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        relay.add_policy(lambda envelope: None)  # type: ignore[arg-type]
    assert relay.relay_policies == []


def test_base_attempt_is_abstract_and_kill_is_harmless() -> None:
    relay = Relay()
    with pytest.raises(NotImplementedError):
        relay.attempt(Envelope(), 0)
    relay.kill()


def test_blackhole_delivers_without_policies() -> None:
    log: list[str] = []
    relay = BlackholeRelay()
    relay.add_policy(Recorder(log, "never"))
    first = relay._attempt(Envelope("s@x.test", ["r@x.test"]), 0)
    second = relay.attempt(Envelope("s@x.test", ["r@x.test"]), 0)
    assert log == []
    for reply in (first, second):
        assert reply.code == "250"
        assert re.fullmatch(r"2\.0\.0 Message Delivered; [0-9a-f]{32}", reply.message or "")
    assert first.message != second.message


def test_public_names() -> None:
    import slimta.relay
    import slimta.relay.blackhole

    assert set(slimta.relay.__all__) == {"PermanentRelayError", "TransientRelayError", "Relay"}
    assert slimta.relay.RelayError is RelayError
    assert slimta.relay.blackhole.__all__ == ["BlackholeRelay"]
