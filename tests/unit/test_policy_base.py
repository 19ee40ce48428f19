"""The policy base classes."""

from __future__ import annotations

import pytest

from slimta.core import SlimtaError
from slimta.envelope import Envelope
from slimta.policy import PolicyError, QueuePolicy, RelayPolicy


def test_policy_error_is_a_slimta_error() -> None:
    assert issubclass(PolicyError, SlimtaError)


def test_base_apply_is_abstract() -> None:
    with pytest.raises(NotImplementedError):
        QueuePolicy().apply(Envelope())
    with pytest.raises(NotImplementedError):
        RelayPolicy().apply(Envelope())


def test_subclasses() -> None:
    class Split(QueuePolicy):
        def apply(self, envelope: Envelope) -> list[Envelope]:
            return [envelope.copy([rcpt]) for rcpt in envelope.recipients]

    class Mark(RelayPolicy):
        def apply(self, envelope: Envelope) -> None:
            envelope.prepend_header("X-Mark", "1")

    products = Split().apply(Envelope("s@x.test", ["a@x.test", "b@x.test"]))
    assert [env.recipients for env in products] == [["a@x.test"], ["b@x.test"]]
    envelope = Envelope("s@x.test", ["a@x.test"])
    envelope.parse(b"Subject: hi\r\n\r\nbody")
    Mark().apply(envelope)
    assert envelope.flatten()[0].startswith(b"X-Mark: 1\r\n")


def test_public_names() -> None:
    import slimta.policy

    assert set(slimta.policy.__all__) == {
        "PolicyError",
        "QueuePolicy",
        "RelayPolicy",
        "apply_queue_policies",
    }


def test_apply_queue_policies_runs_later_policies_on_each_product() -> None:
    from slimta.envelope import Envelope
    from slimta.policy import QueuePolicy, apply_queue_policies

    class Split(QueuePolicy):
        def apply(self, envelope: Envelope) -> list[Envelope]:
            return [envelope.copy([rcpt]) for rcpt in envelope.recipients]

    class Tag(QueuePolicy):
        def apply(self, envelope: Envelope) -> None:
            envelope.sender = "tagged@example.com"

    result = apply_queue_policies([Split(), Tag()], Envelope("s@example.com", ["a@x", "b@x"]))
    assert [(env.sender, env.recipients) for env in result] == [
        ("tagged@example.com", ["a@x"]),
        ("tagged@example.com", ["b@x"]),
    ]
    # A policy that returns nothing (or an empty list) keeps the envelope.
    original = Envelope("s@example.com", ["a@x"])
    assert apply_queue_policies([Tag()], original) == [original]
