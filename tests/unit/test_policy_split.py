"""slimta.policy.split: one copy per recipient or per domain, deep and with DSN data."""

from __future__ import annotations

import slimta.policy.split as split_module
from slimta.envelope import Envelope
from slimta.policy import QueuePolicy
from slimta.policy.split import RecipientDomainSplit, RecipientSplit
from slimta.queue import Queue
from slimta.queue.dict import DictStorage


def envelope_for(*recipients: str) -> Envelope:
    envelope = Envelope("s@example.com", list(recipients))
    envelope.parse(b"Subject: hi\r\n\r\nbody\r\n")
    envelope.client = {"ip": "192.0.2.1", "auth": ("user", None), "extra": {"k": ["v"]}}
    envelope.dsn_notify = {rcpt: ("FAILURE",) for rcpt in recipients}
    envelope.dsn_orcpt = {rcpt: f"rfc822;{rcpt}" for rcpt in recipients}
    return envelope


def test_public_names() -> None:
    assert split_module.__all__ == ["RecipientDomainSplit", "RecipientSplit"]


def test_recipient_split_keeps_single_recipient_messages() -> None:
    assert RecipientSplit().apply(envelope_for()) is None
    assert RecipientSplit().apply(envelope_for("a@x.example")) is None


def test_recipient_split() -> None:
    original = envelope_for("a@x.example", "b@y.example", "c@x.example")
    copies = RecipientSplit().apply(original)
    assert copies is not None
    assert [env.recipients for env in copies] == [["a@x.example"], ["b@y.example"], ["c@x.example"]]
    for env in copies:
        (rcpt,) = env.recipients
        assert env.dsn_notify == {rcpt: ("FAILURE",)}
        assert env.dsn_orcpt == {rcpt: f"rfc822;{rcpt}"}
        assert env.sender == "s@example.com"
        assert env.flatten() == original.flatten()
    assert original.recipients == ["a@x.example", "b@y.example", "c@x.example"]


def check_independent(original: Envelope, copies: list[Envelope]) -> None:
    """Changing one copy changes neither the others nor the original."""
    before = [(env.flatten(), env.client, env.dsn_notify, list(env.recipients)) for env in copies]
    original_before = (original.flatten(), repr(original.client), dict(original.dsn_notify or {}))
    first = copies[0]
    first.prepend_header("X-Only", "first")
    assert first.headers is not None
    first.headers["X-Also"] = "first"
    first.client["extra"]["k"].append("changed")
    first.client["ip"] = "198.51.100.1"
    first.recipients.append("added@z.example")
    assert first.dsn_notify is not None
    first.dsn_notify["added@z.example"] = ("NEVER",)
    for env, (flat, client, notify, rcpts) in zip(copies[1:], before[1:], strict=True):
        assert env.flatten() == flat
        assert env.client == {"ip": "192.0.2.1", "auth": ("user", None), "extra": {"k": ["v"]}}
        assert env.client == client
        assert env.dsn_notify == notify
        assert env.recipients == rcpts
    assert (original.flatten(), repr(original.client), original.dsn_notify) == original_before


def test_recipient_split_copies_are_deep() -> None:
    original = envelope_for("a@x.example", "b@y.example", "c@x.example")
    copies = RecipientSplit().apply(original)
    assert copies is not None
    check_independent(original, copies)


def test_recipient_split_copies_of_parsed_headers_are_deep() -> None:
    original = envelope_for("a@x.example", "b@y.example")
    assert original.headers is not None  # parsed before the split
    copies = RecipientSplit().apply(original)
    assert copies is not None
    check_independent(original, copies)


def test_domain_split_groups_by_lower_cased_domain() -> None:
    original = envelope_for(
        "a@X.example", "postmaster", "b@y.example", "c@x.EXAMPLE", "d@", "e@y.example"
    )
    copies = RecipientDomainSplit().apply(original)
    assert copies is not None
    assert [env.recipients for env in copies] == [
        ["a@X.example", "c@x.EXAMPLE"],
        ["b@y.example", "e@y.example"],
        ["postmaster"],
        ["d@"],
    ]
    for env in copies:
        assert env.dsn_notify == {rcpt: ("FAILURE",) for rcpt in env.recipients}
        assert env.dsn_orcpt == {rcpt: f"rfc822;{rcpt}" for rcpt in env.recipients}
    check_independent(original, copies)


def test_domain_split_keeps_single_group_messages() -> None:
    assert RecipientDomainSplit().apply(envelope_for()) is None
    assert RecipientDomainSplit().apply(envelope_for("a@x.example", "b@X.Example")) is None
    assert RecipientDomainSplit().apply(envelope_for("postmaster")) is None
    assert RecipientDomainSplit().apply(envelope_for("postmaster", "abuse")) is not None


def test_split_without_dsn_parameters() -> None:
    original = Envelope("s@example.com", ["a@x.example", "b@y.example"])
    for policy in (RecipientSplit(), RecipientDomainSplit()):
        copies = policy.apply(original)
        assert copies is not None
        assert all(env.dsn_notify is None and env.dsn_orcpt is None for env in copies)


def test_split_in_a_queue_later_policies_see_each_copy_alone() -> None:
    class MarkA(QueuePolicy):
        def apply(self, envelope: Envelope) -> None:
            if envelope.recipients == ["a@x.example"]:
                envelope.prepend_header("X-For-A", "yes")
                envelope.client["marked"] = True

    store = DictStorage()
    queue = Queue(store)
    queue.add_policy(RecipientDomainSplit())
    queue.add_policy(MarkA())
    results = queue.enqueue(envelope_for("a@x.example", "b@y.example"))
    stored = {}
    for _, id in results:
        assert isinstance(id, str)
        env, _ = store.get(id)
        stored[env.recipients[0]] = env
    assert stored["a@x.example"].flatten()[0].startswith(b"X-For-A: yes\r\n")
    assert b"X-For-A" not in stored["b@y.example"].flatten()[0]
    assert "marked" not in stored["b@y.example"].client
    assert stored["b@y.example"].dsn_orcpt == {"b@y.example": "rfc822;b@y.example"}
