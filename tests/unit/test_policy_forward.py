"""slimta.policy.forward: regex rewriting of recipients."""

from __future__ import annotations

import re

import slimta.policy.forward as forward_module
from slimta.envelope import Envelope
from slimta.policy.forward import Forward


def envelope_for(*recipients: str) -> Envelope:
    return Envelope("s@example.com", list(recipients))


def test_public_names() -> None:
    assert forward_module.__all__ == ["Forward"]


def test_no_mapping_changes_nothing() -> None:
    envelope = envelope_for("a@example.com")
    Forward().apply(envelope)
    assert envelope.recipients == ["a@example.com"]


def test_string_and_compiled_patterns() -> None:
    forward = Forward()
    forward.add_mapping(r"@old\.example$", "@new.example")
    forward.add_mapping(re.compile(r"^postmaster@", re.IGNORECASE), "admin@")
    assert [pattern.pattern for pattern, _, _ in forward.mapping] == [
        r"@old\.example$",
        "^postmaster@",
    ]
    envelope = envelope_for("a@old.example", "PostMaster@x.example", "b@other.example")
    forward.apply(envelope)
    assert envelope.recipients == ["a@new.example", "admin@x.example", "b@other.example"]


def test_first_matching_mapping_wins() -> None:
    forward = Forward()
    forward.add_mapping(r"^a@", "first@")
    forward.add_mapping(r"^a@", "second@")
    forward.add_mapping(r"^first@", "chained@")
    envelope = envelope_for("a@x.example")
    forward.apply(envelope)
    assert envelope.recipients == ["first@x.example"]


def test_empty_result_tries_the_next_mapping() -> None:
    forward = Forward()
    forward.add_mapping(r"^.*$", "")
    forward.add_mapping(r"^a", "b")
    envelope = envelope_for("a@x.example")
    forward.apply(envelope)
    assert envelope.recipients == ["b@x.example"]


def test_match_without_change_stops_the_search() -> None:
    forward = Forward()
    forward.add_mapping(r"^(a)@", r"\1@")
    forward.add_mapping(r"^a@", "other@")
    envelope = envelope_for("a@x.example")
    forward.apply(envelope)
    assert envelope.recipients == ["a@x.example"]


def test_count_and_function_replacement() -> None:
    forward = Forward()
    forward.add_mapping(r"a", "b", count=1)
    envelope = envelope_for("aaa@x.example")
    forward.apply(envelope)
    assert envelope.recipients == ["baa@x.example"]

    forward = Forward()
    forward.add_mapping(r"^(\w+)@", lambda match: match.group(1).upper() + "@")
    envelope = envelope_for("joe@x.example")
    forward.apply(envelope)
    assert envelope.recipients == ["JOE@x.example"]


def test_dsn_parameters_follow_the_new_address() -> None:
    forward = Forward()
    forward.add_mapping(r"@old\.example$", "@new.example")
    envelope = envelope_for("a@old.example", "b@keep.example")
    envelope.dsn_notify = {"a@old.example": ("NEVER",), "b@keep.example": ("FAILURE",)}
    envelope.dsn_orcpt = {"a@old.example": "rfc822;a@old.example"}
    forward.apply(envelope)
    assert envelope.dsn_notify == {"a@new.example": ("NEVER",), "b@keep.example": ("FAILURE",)}
    assert envelope.dsn_orcpt == {"a@new.example": "rfc822;a@old.example"}


def test_dsn_parameters_of_swapped_and_merged_recipients() -> None:
    forward = Forward()
    forward.add_mapping(r"^a@", "b@")
    forward.add_mapping(r"^b@", "c@")
    forward.add_mapping(r"^d@", "c@")
    envelope = envelope_for("a@x", "b@x", "d@x")
    envelope.dsn_notify = {"a@x": ("NEVER",), "b@x": ("DELAY",), "d@x": ("SUCCESS",)}
    forward.apply(envelope)
    assert envelope.recipients == ["b@x", "c@x", "c@x"]
    # c@x came from b@x first, then from d@x: the first one's entry is kept.
    assert envelope.dsn_notify == {"b@x": ("NEVER",), "c@x": ("DELAY",)}


def test_without_dsn_parameters() -> None:
    forward = Forward()
    forward.add_mapping(r"^a@", "b@")
    envelope = envelope_for("a@x")
    forward.apply(envelope)
    assert envelope.dsn_notify is None and envelope.dsn_orcpt is None
