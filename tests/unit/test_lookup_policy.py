"""LookupPolicy on real Envelopes: alias, verp, add_headers, failures."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from slimta.edge import Edge
from slimta.envelope import Envelope
from slimta.lookup import LookupFailed
from slimta.lookup.drivers import DictLookup, LookupBase
from slimta.lookup.policy import LookupPolicy, verp_address
from slimta.policy import QueuePolicy
from slimta.queue import Queue
from slimta.queue.dict import DictStorage

MESSAGE = b"From: s@example.com\r\nSubject: hi\r\n\r\nbody\r\n"


def envelope(sender: str = "sender@example.com", rcpts: list[str] | None = None) -> Envelope:
    env = Envelope(sender, rcpts if rcpts is not None else ["rcpt@example.com"])
    env.parse(MESSAGE)
    return env


def policy(table: dict[str, dict[str, Any]], **kwargs: Any) -> LookupPolicy:
    return LookupPolicy(DictLookup(table, "{address}"), **kwargs)


def header_names(env: Envelope) -> list[str]:
    headers, _ = env.flatten()
    return [line.split(b":", 1)[0].decode() for line in headers.split(b"\r\n") if b":" in line]


class Failing(LookupBase):
    def __init__(self, fail_on: str | None = None) -> None:
        self.fail_on = fail_on

    def lookup(self, **kwargs: Any) -> dict[str, Any] | None:
        if self.fail_on is None or kwargs["address"] == self.fail_on:
            raise LookupFailed("database is locked")
        return {"alias": "changed@example.com", "add_headers": '{"X-Seen": "1"}'}


def test_is_a_queue_policy_with_4_0_defaults() -> None:
    p = LookupPolicy(DictLookup({}, "{address}"))
    assert isinstance(p, QueuePolicy)
    assert (p.on_sender, p.on_rcpts) == (False, True)


def test_recipient_alias() -> None:
    env = envelope(rcpts=["a@example.com", "b@example.com"])
    result = policy({"b@example.com": {"alias": "c@example.org"}}).apply(env)
    assert result is None
    assert env.recipients == ["a@example.com", "c@example.org"]
    assert env.sender == "sender@example.com"


def test_sender_alias_only_with_on_sender() -> None:
    table = {"sender@example.com": {"alias": "new@example.com"}}
    env = envelope()
    policy(table).apply(env)
    assert env.sender == "sender@example.com"
    policy(table, on_sender=True, on_rcpts=False).apply(env)
    assert env.sender == "new@example.com"


def test_null_sender_is_not_looked_up() -> None:
    class Must(LookupBase):
        def lookup(self, **kwargs: Any) -> dict[str, Any] | None:
            raise AssertionError(kwargs)

    env = envelope(sender="")
    assert LookupPolicy(Must(), on_sender=True, on_rcpts=False).apply(env) is None
    assert env.sender == ""


def test_alias_moves_dsn_requests() -> None:
    env = envelope(rcpts=["a@example.com"])
    env.dsn_notify = {"a@example.com": ("FAILURE",)}
    env.dsn_orcpt = {"a@example.com": "rfc822;a@example.com"}
    policy({"a@example.com": {"alias": "b@example.com"}}).apply(env)
    assert env.dsn_notify == {"b@example.com": ("FAILURE",)}
    assert env.dsn_orcpt == {"b@example.com": "rfc822;a@example.com"}


@pytest.mark.parametrize("alias", ["x@y\r\nRCPT TO:<evil@z>", "<x@y>", "", 5, ["a@b"]])
def test_bad_alias_is_ignored(alias: object, caplog: pytest.LogCaptureFixture) -> None:
    env = envelope()
    with caplog.at_level(logging.WARNING):
        policy({"rcpt@example.com": {"alias": alias}}).apply(env)
    assert env.recipients == ["rcpt@example.com"]


def test_add_headers_json_text_and_mapping() -> None:
    env = envelope(rcpts=["a@example.com", "b@example.com", "c@example.com"])
    table = {
        "a@example.com": {"add_headers": '{"X-One": "1", "X-Two": "2"}'},
        "b@example.com": {"add_headers": {"X-Three": 3}},
        # The same header again: added once.
        "c@example.com": {"add_headers": '{"X-One": "1"}'},
    }
    policy(table).apply(env)
    names = header_names(env)
    assert names.count("X-One") == 1
    assert {"X-One", "X-Two", "X-Three", "From", "Subject"} <= set(names)
    assert env.headers is not None
    assert env.headers["X-Three"] == "3"
    assert env.headers["Subject"] == "hi"


@pytest.mark.parametrize(
    "raw",
    [
        "not json",
        '["X-A", "1"]',
        '{"Bad Name": "1"}',
        '{"X-Inject": "a\\r\\nBcc: evil@example.com"}',
        '{"X-Obj": {"a": 1}}',
    ],
)
def test_bad_add_headers_are_skipped(raw: str) -> None:
    env = envelope()
    before = env.flatten()
    policy({"rcpt@example.com": {"add_headers": raw}}).apply(env)
    assert env.flatten() == before
    assert b"Bcc" not in env.flatten()[0]


def test_verp_on_a_recipient_splits_it_off() -> None:
    env = envelope(
        sender="list-bounces@lists.example.com",
        rcpts=["a@example.com", "b@host.example", "c@example.com"],
    )
    env.dsn_notify = {"b@host.example": ("FAILURE",)}
    result = policy({"b@host.example": {"verp": True}}).apply(env)
    assert result is not None
    assert [(e.sender, e.recipients) for e in result] == [
        ("list-bounces@lists.example.com", ["a@example.com", "c@example.com"]),
        ("list-bounces+b=host.example@lists.example.com", ["b@host.example"]),
    ]
    assert result[1].dsn_notify == {"b@host.example": ("FAILURE",)}
    assert result[1].flatten() == result[0].flatten()


def test_verp_uses_the_aliased_addresses() -> None:
    env = envelope(sender="s@example.com", rcpts=["a@example.com"])
    table = {
        "s@example.com": {"alias": "bounces@example.net"},
        "a@example.com": {"alias": "real@host.example", "verp": "1"},
    }
    result = policy(table, on_sender=True).apply(env)
    assert result is not None
    assert [(e.sender, e.recipients) for e in result] == [
        ("bounces+real=host.example@example.net", ["real@host.example"])
    ]


def test_verp_in_the_sender_record_applies_to_all() -> None:
    env = envelope(sender="s@example.com", rcpts=["a@x.example", "postmaster"])
    result = policy({"s@example.com": {"verp": 1}}, on_sender=True).apply(env)
    assert result is not None
    assert [(e.sender, e.recipients) for e in result] == [
        ("s+a=x.example@example.com", ["a@x.example"]),
        ("s+postmaster@example.com", ["postmaster"]),
    ]


@pytest.mark.parametrize("value", [False, 0, None, "", "0", "false", "No", " off "])
def test_verp_false_values(value: object) -> None:
    env = envelope()
    assert policy({"rcpt@example.com": {"verp": value}}).apply(env) is None
    assert env.sender == "sender@example.com"


def test_verp_keeps_a_null_sender_null() -> None:
    env = envelope(sender="")
    assert policy({"rcpt@example.com": {"verp": True}}).apply(env) is None
    assert env.sender == ""


def test_verp_address() -> None:
    assert verp_address("a@b.example", "c@d.example") == "a+c=d.example@b.example"


def test_failure_leaves_the_envelope_unchanged() -> None:
    env = envelope(sender="s@example.com", rcpts=["ok@example.com", "bad@example.com"])
    before = (env.sender, list(env.recipients), env.flatten())
    p = LookupPolicy(Failing(fail_on="bad@example.com"), on_sender=True)
    with pytest.raises(LookupFailed):
        p.apply(env)
    assert (env.sender, env.recipients, env.flatten()) == before


def test_failure_in_the_queue_is_a_transient_refusal_at_the_edge() -> None:
    store = DictStorage()
    queue = Queue(store)
    queue.add_policy(LookupPolicy(Failing()))
    env = envelope()
    with pytest.raises(LookupFailed):
        queue.enqueue(env)
    assert list(store.load()) == []
    handoff = Edge(queue, "mx.test").handoff_result(envelope())
    assert not handoff.accepted
    assert (handoff.reply.code, handoff.reply.enhanced_status_code) == ("451", "4.3.0")
    assert list(store.load()) == []


def test_policy_in_the_queue_stores_the_rewritten_message() -> None:
    store = DictStorage()
    queue = Queue(store)
    queue.add_policy(
        policy(
            {
                "a@example.com": {"alias": "z@example.com"},
                "b@example.com": {"verp": True},
            }
        )
    )
    results = queue.enqueue(envelope(rcpts=["a@example.com", "b@example.com"]))
    assert len(results) == 2
    stored = [store.get(str(id))[0] for _, id in results]
    assert [(e.sender, e.recipients) for e in stored] == [
        ("sender@example.com", ["z@example.com"]),
        ("sender+b=example.com@example.com", ["b@example.com"]),
    ]
